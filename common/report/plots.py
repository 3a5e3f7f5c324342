"""Accuracy-over-tasks curves, R[t][j] heat-maps and communication bars (PNG, Agg) of a result document."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.report.summary import PART_TITLES, PARTS, method_order, summarize

FloatArray = np.ndarray[Any, np.dtype[np.float64]]


def matrix_to_array(matrix: Any) -> FloatArray | None:
    """A (possibly ragged, null-holding) list-of-lists as a square float array with NaN for null/missing."""
    if not isinstance(matrix, list) or not matrix:
        return None
    rows = [r if isinstance(r, list) else [] for r in matrix]
    size = max(len(rows), *(len(r) for r in rows))
    out = np.full((size, size), np.nan)
    for t, row in enumerate(rows):
        for j, v in enumerate(row):
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[t, j] = float(v)
    return out


def seed_matrices(doc: dict[str, Any], method: str, part: str) -> list[FloatArray]:
    """R matrices of one method and part, one per result row (seed) that has one."""
    mats: list[FloatArray] = []
    for row in doc["results"]:
        if str(row.get("method")) != method:
            continue
        block = row.get(part)
        arr = matrix_to_array(block.get("matrix")) if isinstance(block, dict) else None
        if arr is not None:
            mats.append(arr)
    return mats


def _stack(mats: Sequence[FloatArray]) -> FloatArray:
    """Stack matrices of possibly different sizes, padding with NaN to the largest."""
    size = max(m.shape[0] for m in mats)
    out = np.full((len(mats), size, size), np.nan)
    for i, m in enumerate(mats):
        out[i, : m.shape[0], : m.shape[1]] = m
    return out


def _nanmean_std(stack: FloatArray, axis: int) -> tuple[FloatArray, FloatArray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN slices -> NaN, which we want
        return np.nanmean(stack, axis=axis), np.nanstd(stack, axis=axis)


def mean_matrix_over_seeds(
    doc: dict[str, Any], method: str, part: str
) -> tuple[FloatArray, FloatArray, int] | None:
    """(mean R, std R (ddof=0), number of seeds) of one method and part; None when no seed has a matrix.

    Null entries are NaN and are skipped per cell; a cell null in every seed stays NaN.
    """
    mats = seed_matrices(doc, method, part)
    if not mats:
        return None
    mean, std = _nanmean_std(_stack(mats), axis=0)
    return mean, std, len(mats)


def average_accuracy_curve(matrix: FloatArray) -> FloatArray:
    """a[t] = mean over j <= t of R[t][j] (NaN entries skipped; NaN when row t has none)."""
    size = matrix.shape[0]
    lower = np.where(np.tril(np.ones((size, size), dtype=bool)), matrix, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.asarray(np.nanmean(lower, axis=1), dtype=np.float64)


def curve_over_seeds(
    doc: dict[str, Any], method: str, part: str
) -> tuple[FloatArray, FloatArray, int] | None:
    """Mean and std (ddof=0) over seeds of the average-accuracy curve, with the number of seeds."""
    mats = seed_matrices(doc, method, part)
    if not mats:
        return None
    curves = _stack(mats)
    per_seed = np.stack([average_accuracy_curve(m) for m in curves])
    mean, std = _nanmean_std(per_seed, axis=0)
    return mean, std, len(mats)


def _parts_with_data(doc: dict[str, Any], methods: Sequence[str]) -> list[str]:
    return [p for p in PARTS if any(seed_matrices(doc, m, p) for m in methods)]


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def _doc_label(doc: dict[str, Any]) -> str:
    seeds = doc.get("seeds")
    seed_text = ""
    if isinstance(seeds, list) and seeds:
        seed_text = f", seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}"
    return f"{doc.get('scenario', '?')} (FM {doc.get('fm', '?')}{seed_text})"


def plot_accuracy_curves(doc: dict[str, Any], out_path: str | Path) -> Path | None:
    """One subplot per part with data; x = task t (1..T), y = mean_{j<=t} R[t][j] in %, one line per method.

    Lines are the mean over seeds, with a shaded ± std band where a method has several seeds.
    Returns the written path, or None when no method has any matrix.
    """
    methods = method_order(doc)
    parts = _parts_with_data(doc, methods)
    if not parts:
        return None
    colors = _colors(methods)
    fig = Figure(figsize=(4.6 * len(parts) + 0.4, 4.4), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    max_tasks = 1
    for ax, part in zip(axes, parts, strict=True):
        for method in methods:
            curve = curve_over_seeds(doc, method, part)
            if curve is None:
                continue
            mean, std, n = curve
            x = np.arange(1, len(mean) + 1)
            max_tasks = max(max_tasks, len(mean))
            ax.plot(x, mean * 100, marker="o", markersize=4, color=colors[method], label=method)
            if n > 1:
                ax.fill_between(
                    x, (mean - std) * 100, (mean + std) * 100, color=colors[method], alpha=0.18, linewidth=0
                )
        ax.set_title(PART_TITLES[part])
        ax.set_xlabel("after task t")
        ax.set_ylabel("average accuracy over tasks ≤ t (%)")
        ax.grid(True, alpha=0.3)
    for ax in axes:
        ax.set_xticks(np.arange(1, max_tasks + 1))
        ax.set_xlim(0.7, max_tasks + 0.3)
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="outside lower center",
        ncol=min(len(handles), 6),
        frameon=False,
    )
    fig.suptitle(f"Average accuracy after each task — {_doc_label(doc)}\nmean over seeds, band = ± std")
    return _save(fig, Path(out_path))


def _safe_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", method) or "method"


def plot_heatmaps(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """heatmap_<method>.png per method: R[t][j] in % (mean over seeds), one panel per available part.

    Cells are annotated with their value; null cells (j > t, or missing in every seed) stay blank.
    """
    from matplotlib import colormaps

    out = Path(out_dir)
    written: list[Path] = []
    cmap = colormaps["viridis"].with_extremes(bad="white")
    all_panels: dict[str, list[tuple[str, tuple[FloatArray, FloatArray, int]]]] = {}
    for method in method_order(doc):
        panels = [(p, mm) for p in PARTS if (mm := mean_matrix_over_seeds(doc, method, p)) is not None]
        if panels:
            all_panels[method] = panels
    # One colour scale for every heat-map of the document, so that colours compare across methods.
    finite = [mm[0][np.isfinite(mm[0])] for panels in all_panels.values() for _, mm in panels]
    values = np.concatenate(finite) * 100 if finite else np.zeros(0)
    vmin = float(values.min()) if values.size else 0.0
    vmax = float(values.max()) if values.size else 100.0
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    for method, panels in all_panels.items():
        size = max(mm[0].shape[0] for _, mm in panels)
        cell = 0.6 if size > 6 else 0.8
        side = max(3.2, cell * size + 1.2)
        fig = Figure(figsize=(side * len(panels) + 1.0, side + 0.9), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        image = None
        fontsize = 9 if size <= 6 else 7 if size <= 10 else 5
        for ax, (part, (mean, _std, n)) in zip(axes, panels, strict=True):
            data = mean * 100
            image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
            t_size = data.shape[0]
            for t in range(t_size):
                for j in range(t_size):
                    v = data[t, j]
                    if not np.isfinite(v):
                        continue
                    r, g, b, _ = cmap((v - vmin) / (vmax - vmin))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(
                        j,
                        t,
                        f"{v:.1f}",
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if dark else "black",
                    )
            ticks = np.arange(t_size)
            ax.set_xticks(ticks, [str(i + 1) for i in ticks])
            ax.set_yticks(ticks, [str(i + 1) for i in ticks])
            ax.set_xlabel("evaluated on task j")
            ax.set_ylabel("after task t")
            ax.set_title(f"{PART_TITLES[part]} ({n} seed{'s' if n != 1 else ''})")
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.8, label="accuracy (%) — same scale for all methods")
        fig.suptitle(f"R[t][j] — {method} — {doc.get('scenario', '?')}")
        written.append(_save(fig, out / f"heatmap_{_safe_name(method)}.png"))
    return written


def render(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write accuracy_over_tasks.png and every heatmap_<method>.png into out_dir; return the paths."""
    out = Path(out_dir)
    written: list[Path] = []
    curves = plot_accuracy_curves(doc, out / "accuracy_over_tasks.png")
    if curves is not None:
        written.append(curves)
    written.extend(plot_heatmaps(doc, out))
    return written


COMM_METRICS: tuple[tuple[str, str], ...] = (
    ("bytes_up_per_client_round", "uploaded"),
    ("bytes_down_per_client_round", "downloaded"),
)


def communication_stats(doc: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """{method: [(mean kB, std kB) for up, down]} for methods that report any bytes; null counts as 0."""
    out: dict[str, list[tuple[float, float]]] = {}
    for method, stats in summarize(doc).items():
        pairs = [stats.get(key, (None, None, 0)) for key, _ in COMM_METRICS]
        if all(n == 0 for _, _, n in pairs):
            continue
        out[method] = [((m or 0.0) / 1e3, (s or 0.0) / 1e3) for m, s, _ in pairs]
    return out


def plot_communication(doc: dict[str, Any], out_path: str | Path) -> Path | None:
    """Bytes up and down per client per round (kB, mean ± std over seeds), one pair of bars per method.

    Returns the written path, or None when no method reports bytes.
    """
    stats = communication_stats(doc)
    if not stats:
        return None
    methods = list(stats)
    x = np.arange(len(methods))
    width = 0.38
    fig = Figure(figsize=(max(5.0, 0.75 * len(methods) + 2.5), 4.4), layout="constrained")
    ax = fig.subplots()
    for i, (_, label) in enumerate(COMM_METRICS):
        means = [stats[m][i][0] for m in methods]
        stds = [stats[m][i][1] for m in methods]
        ax.bar(x + (i - 0.5) * width, means, width, yerr=stds, capsize=3, label=label, color=f"C{i}")
    tilt = len(methods) > 3
    ax.set_xticks(x, methods, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel("kB per client per round")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(frameon=False)
    fig.suptitle(f"Communication — {_doc_label(doc)}\nmean over seeds, bar = ± std")
    return _save(fig, Path(out_path))
