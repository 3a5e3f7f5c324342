"""Markdown summary table (mean ± std over seeds) of benchmark result documents (BENCHMARK.md "Output")."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PARTS: tuple[str, ...] = ("fm_global", "fm_personal", "small")
PART_METRICS: tuple[str, ...] = ("acc_final", "acc_avg", "forgetting", "bwt")
TOP_METRICS: tuple[str, ...] = (
    "bytes_up_per_client_round",
    "bytes_down_per_client_round",
    "wall_s",
    "peak_rss_mb",
)

#: (mean, std over seeds with ddof=0, number of non-null values); mean/std are None when n == 0.
Stat = tuple[float | None, float | None, int]

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

DASH = "–"


def _number(value: Any) -> float | None:
    """A finite float, or None for null / missing / non-numeric / NaN / inf."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _row_values(row: dict[str, Any]) -> dict[str, float | None]:
    """Flatten one result row into {metric key: value}."""
    out: dict[str, float | None] = {}
    for part in PARTS:
        block = row.get(part)
        for metric in PART_METRICS:
            key = f"{part}.{metric}"
            out[key] = _number(block.get(metric)) if isinstance(block, dict) else None
    for metric in TOP_METRICS:
        out[metric] = _number(row.get(metric))
    return out


def mean_std(values: Sequence[float | None]) -> Stat:
    """Mean and population std (ddof=0) of the non-null values, with their count."""
    xs = [v for v in values if v is not None]
    if not xs:
        return (None, None, 0)
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / len(xs)
    return (m, math.sqrt(var), len(xs))


def method_order(doc: dict[str, Any]) -> list[str]:
    """Method names in the order they first appear in doc["results"]."""
    seen: dict[str, None] = {}
    for row in doc.get("results") or []:
        seen.setdefault(str(row.get("method")), None)
    return list(seen)


def summarize(doc: dict[str, Any]) -> dict[str, dict[str, Stat]]:
    """{method: {metric: (mean, std, n)}} over the seeds of each method; nulls are skipped.

    Metric keys are "<part>.<metric>" for part in fm_global/fm_personal/small and metric in
    acc_final/acc_avg/forgetting/bwt, plus the top-level bytes/wall/RSS keys. Values are raw
    (fractions, bytes, seconds); formatting happens in markdown_table().
    """
    per_method: dict[str, dict[str, list[float | None]]] = {}
    for row in doc.get("results") or []:
        cols = per_method.setdefault(str(row.get("method")), {})
        for key, value in _row_values(row).items():
            cols.setdefault(key, []).append(value)
    return {
        method: {key: mean_std(vals) for key, vals in cols.items()}
        for method, cols in ((m, per_method[m]) for m in method_order(doc))
    }


def format_stat(stat: Stat, kind: str) -> str:
    """'mean ± std' (just 'mean' for one value, '–' for none) in the units of `kind` (pct | kb | s)."""
    mean, std, n = stat
    if mean is None or n == 0:
        return DASH
    if kind == "pct":
        scale, digits = 100.0, 1
    elif kind == "kb":
        scale, digits = 1e-3, 0
    elif kind == "s":
        scale, digits = 1.0, 0
    else:
        raise ValueError(f"unknown column kind {kind!r}")
    text = _fmt(mean * scale, digits)
    if n > 1 and std is not None:
        text += f" ± {_fmt(std * scale, digits)}"
    return text


def _fmt(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    # "-0.0" only says the value rounded to zero from below; show it as "0.0".
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


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
