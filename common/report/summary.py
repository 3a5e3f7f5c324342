"""Mean ± std over seeds of every metric of a result document (BENCHMARK.md "Output"), and its formatting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

PARTS: tuple[str, ...] = ("fm_global", "fm_personal", "small")
PART_TITLES: dict[str, str] = {
    "fm_global": "FM-global",
    "fm_personal": "FM-personal",
    "small": "small models",
}
PART_METRICS: tuple[str, ...] = ("acc_final", "acc_avg", "forgetting", "bwt")
TOP_METRICS: tuple[str, ...] = (
    "bytes_up_per_client_round",
    "bytes_down_per_client_round",
    "wall_s",
    "peak_rss_mb",
)

#: (mean, std over seeds with ddof=0, number of non-null values); mean/std are None when n == 0.
Stat = tuple[float | None, float | None, int]

DASH = "–"

# kind -> (scale applied to the raw value, digits after the point)
_KINDS: dict[str, tuple[float, int]] = {"pct": (100.0, 1), "kb": (1e-3, 0), "s": (1.0, 0), "mb": (1.0, 0)}


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
    (fractions, bytes, seconds); formatting happens in format_stat().
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
    """'mean ± std' (just 'mean' for one value, '–' for none) in the units of `kind` (pct | kb | s | mb)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown column kind {kind!r}")
    mean, std, n = stat
    if mean is None or n == 0:
        return DASH
    scale, digits = _KINDS[kind]
    text = _fmt(mean * scale, digits)
    if n > 1 and std is not None:
        text += f" ± {_fmt(std * scale, digits)}"
    return text


def _fmt(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    # "-0.0" only says the value rounded to zero from below; show it as "0.0".
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text
