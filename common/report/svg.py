"""A dependency-free inline SVG line chart (for pages that must not load anything, e.g. the dashboard)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
LEFT, RIGHT, TOP, BOTTOM = 58, 210, 34, 46  # margins; the legend sits in the right one


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]  # (x, y), drawn in the given order


@dataclass(frozen=True)
class _Frame:
    """Maps data coordinates to pixels inside the plot area."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int
    height: int

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (self.width - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return self.height - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (self.height - TOP - BOTTOM)


def _x_domain(xs: list[float]) -> tuple[float, float]:
    lo, hi = min(xs), max(xs)
    pad = 0.5 if hi - lo < 1e-9 else 0.04 * (hi - lo)  # keep the end points off the axes
    return lo - pad, hi + pad


def _y_domain(ys: list[float]) -> tuple[float, float, bool]:
    """(low, high, as percent): fractions get a fixed 0..100 % axis, anything else a padded range."""
    lo, hi = min(ys), max(ys)
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0, True
    lo, hi = min(lo, 0.0), hi if hi > lo else lo + 1.0
    return lo, hi + 0.05 * (hi - lo), False


def _fmt_y(value: float, percent: bool) -> str:
    return f"{value * 100:.0f}%" if percent else f"{value:.3g}"


def _axes(frame: _Frame, percent: bool, x_label: str, y_label: str) -> list[str]:
    out = []
    for i in range(6):
        y = frame.y0 + (frame.y1 - frame.y0) * i / 5
        py = frame.py(y)
        right = frame.width - RIGHT
        out.append(f'<line x1="{LEFT}" x2="{right}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e3e7ec"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{_fmt_y(y, percent)}</text>')
    lo, hi = math.ceil(frame.x0), math.floor(frame.x1)
    step = max(1, math.ceil((hi - lo + 1) / 12))
    for x in range(lo, hi + 1, step):
        px = frame.px(x)
        out.append(f'<text x="{px:.1f}" y="{frame.height - BOTTOM + 16}" text-anchor="middle">{x}</text>')
    base = frame.height - BOTTOM
    out.append(f'<line x1="{LEFT}" x2="{frame.width - RIGHT}" y1="{base}" y2="{base}" stroke="#8a94a3"/>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{base}" stroke="#8a94a3"/>')
    mid_x = (LEFT + frame.width - RIGHT) / 2
    out.append(f'<text x="{mid_x:.1f}" y="{frame.height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    mid_y = (TOP + base) / 2
    rotate = f"translate(14 {mid_y:.1f}) rotate(-90)"
    out.append(f'<text transform="{rotate}" text-anchor="middle">{escape(y_label)}</text>')
    return out


def _series(frame: _Frame, index: int, s: Series, percent: bool) -> list[str]:
    color = PALETTE[index % len(PALETTE)]
    coords = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in s.points)
    label = escape(s.label)
    out = [
        f'<polyline class="series" data-series="{label}" points="{coords}" fill="none" '
        f'stroke="{color}" stroke-width="2"/>'
    ]
    for x, y in s.points:
        out.append(
            f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3.5" fill="{color}">'
            f"<title>{label}: {x:g} → {_fmt_y(y, percent) if percent else f'{y:.4g}'}</title></circle>"
        )
    ly = TOP + 6 + 18 * index
    lx = frame.width - RIGHT + 14
    out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/>')
    out.append(f'<text class="legend" x="{lx + 24}" y="{ly + 4}">{label}</text>')
    return out


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 760,
    height: int = 290,
    element_id: str = "chart",
) -> str:
    """An <svg> element with one polyline per series (fractions in [0, 1] are shown as %); '' when empty."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return ""
    xs = [float(x) for s in drawn for x, _ in s.points]
    ys = [float(y) for s in drawn for _, y in s.points]
    y0, y1, percent = _y_domain(ys)
    frame = _Frame(*_x_domain(xs), y0, y1, width, height)
    body = _axes(frame, percent, x_label, y_label)
    for index, s in enumerate(drawn):
        body += _series(frame, index, s, percent)
    return (
        f'<svg id="{escape(element_id)}" class="chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="12">'
        f"<title>{escape(title)}</title>"
        f'<text x="{LEFT}" y="20" font-size="14" font-weight="600">{escape(title)}</text>'
        + "".join(body)
        + "</svg>"
    )
