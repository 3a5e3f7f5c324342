"""Markdown summary table (mean ± std over seeds) of benchmark result documents (BENCHMARK.md "Output")."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The statistics live in common.report.summary (installed with the project, used by fcl-report);
# they are re-exported here so `benchmarks.table.summarize` etc. keep working.
from common.report.summary import (
    DASH,
    PART_METRICS,
    PARTS,
    TOP_METRICS,
    Stat,
    format_stat,
    mean_std,
    method_order,
    summarize,
)

__all__ = [
    "COLUMNS",
    "DASH",
    "PARTS",
    "PART_METRICS",
    "TOP_METRICS",
    "Stat",
    "format_stat",
    "main",
    "markdown_table",
    "mean_std",
    "method_order",
    "summarize",
]

# (metric key in summarize(), column header, kind) — kind selects the formatting.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("fm_global.acc_final", "FM-global acc_final (%)", "pct"),
    ("fm_global.acc_avg", "FM-global acc_avg (%)", "pct"),
    ("fm_global.forgetting", "FM-global forgetting (pp)", "pct"),
    ("fm_global.bwt", "FM-global BWT (pp)", "pct"),
    ("fm_personal.acc_final", "FM-personal acc_final (%)", "pct"),
    ("small.acc_final", "small acc_final (%)", "pct"),
    ("small.forgetting", "small forgetting (pp)", "pct"),
    ("bytes_up_per_client_round", "bytes up/round (kB)", "kb"),
    ("wall_s", "wall (s)", "s"),
)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(doc: dict[str, Any]) -> str:
    """A Markdown section for one result document: scenario heading, a context line, then the table."""
    summary = summarize(doc)
    seeds = doc.get("seeds") or sorted({r.get("seed") for r in doc.get("results") or []}, key=str)
    lines = [
        f"## {doc.get('scenario', '?')}",
        "",
        f"FM `{doc.get('fm', '?')}`, seeds {', '.join(str(s) for s in seeds)}; mean ± std over seeds "
        "(std with ddof=0). Accuracies in %, forgetting/BWT in percentage points.",
        "",
        *(
            [
                f"Produced by `{doc['command']}`"
                + (f" (evaluated on the {doc['eval_split']} split)." if doc.get("eval_split") else "."),
                "",
            ]
            if doc.get("command")
            else []
        ),
        "| method | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for method, stats in summary.items():
        cells = [format_stat(stats.get(key, (None, None, 0)), kind) for key, _, kind in COLUMNS]
        lines.append(f"| {_escape(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print one table per file, optionally also write them all to --markdown-out."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.table", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="result JSON files (benchmarks.run --out)")
    parser.add_argument("--markdown-out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    sections: list[str] = []
    for path in args.files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
            print(f"error: {path} has no 'results' list", file=sys.stderr)
            return 2
        sections.append(markdown_table(doc))
    text = "\n".join(sections)
    print(text, end="")
    if args.markdown_out is not None:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
