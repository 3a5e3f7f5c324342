"""Merge result documents of one scenario run one seed per process: `python -m benchmarks.merge OUT IN...`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


class MergeError(ValueError):
    """The documents cannot be one result: they differ in what was run, or repeat a (method, seed)."""


SAME = ("scenario", "fm", "eval_split", "config")  # what every merged document must agree on


def merge(docs: list[dict[str, Any]], note: str = "") -> dict[str, Any]:
    """One document: the results of all `docs`, seeds in order; `command` lists each run's command."""
    if not docs:
        raise MergeError("nothing to merge")
    first = docs[0]
    for doc in docs[1:]:
        for key in SAME:
            if doc.get(key) != first.get(key):
                raise MergeError(f"documents differ in {key!r}: {first.get(key)!r} vs {doc.get(key)!r}")
    results = [r for doc in docs for r in doc["results"]]
    seen: set[tuple[str, int]] = set()
    for r in results:
        run = (r["method"], r["seed"])
        if run in seen:
            raise MergeError(f"method {run[0]!r} seed {run[1]} appears twice")
        seen.add(run)
    results.sort(key=lambda r: r["seed"])  # stable: each seed keeps its method order
    command = "; ".join(doc["command"] for doc in docs) + (f" ({note})" if note else "")
    seeds = sorted({int(r["seed"]) for r in results})
    return {**{k: first.get(k) for k in SAME}, "seeds": seeds, "command": command, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--note", default="", help="how the runs were made (appended to the command)")
    args = parser.parse_args(argv)
    try:
        doc = merge([json.loads(p.read_text()) for p in args.inputs], args.note)
    except MergeError as exc:
        parser.error(str(exc))
    ordered = {k: doc[k] for k in ("scenario", "fm", "seeds", "eval_split", "command", "config", "results")}
    args.out.write_text(json.dumps(ordered, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
