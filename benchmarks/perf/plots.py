"""Cost curves of a perf.json (PNG): transfer, feature extraction, OBOD job time, concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def is_perf_doc(doc: dict[str, Any]) -> bool:
    return "transfer_ratio_vs_raw" in doc and "results" not in doc


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def plot_transfer(doc: dict[str, Any], out: Path) -> Path | None:
    sizes = doc.get("transfer", {}).get("sizes", [])
    if not sizes:
        return None
    fig = Figure(figsize=(10, 4))
    mb = [s["size_bytes"] / 1e6 for s in sizes]
    for ax, way in zip(fig.subplots(1, 2), ("upload", "download"), strict=True):
        ax.plot(mb, [s[f"{way}_mb_s"] for s in sizes], "o-", label=f"fcl {way}")
        ax.plot(mb, [s[f"raw_{way}_mb_s"] for s in sizes], "s--", label="plain grpcio")
        ax.plot(mb, [s[f"verified_raw_{way}_mb_s"] for s in sizes], "^:", label="grpcio + sha256")
        if all(f"durable_raw_{way}_mb_s" in s for s in sizes):
            durable = [s[f"durable_raw_{way}_mb_s"] for s in sizes]
            ax.plot(mb, durable, "v-.", label="grpcio + sha256 + disk + fsync")
        ax.set(xscale="log", xlabel="payload (MB)", ylabel="MB/s", title=way)
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, out / "transfer.png")


def plot_fe(doc: dict[str, Any], out: Path) -> Path | None:
    points = doc.get("fe", {}).get("points", [])
    if not points:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for seq_len in sorted({p["seq_len"] for p in points}):
        pts = sorted((p for p in points if p["seq_len"] == seq_len), key=lambda p: p["batch"])
        line = ax.plot(
            [p["batch"] for p in pts], [p["sentences_per_s"] for p in pts], "o-", label=f"{seq_len} tok"
        )
        ax.axhline(pts[0]["limit_sentences_per_s"], color=line[0].get_color(), ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="sentences/s")
    ax.set_title("FM feature extraction (dotted: compute limit)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out / "feature_extraction.png")


def plot_jobs(doc: dict[str, Any], out: Path) -> Path | None:
    points = doc.get("jobs", {}).get("points", [])
    if not points:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for labels in sorted({p["labels"] for p in points}):
        pts = sorted((p for p in points if p["labels"] == labels), key=lambda p: p["public"])
        ax.plot([p["public"] for p in pts], [p["seconds"] for p in pts], "o-", label=f"{labels} labels")
    ax.axhline(5.0, color="grey", ls=":", lw=1)
    ax.set(xlabel="public corpus (sentences)", ylabel="seconds per OBOD job", title="OBOD job time")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out / "obod_jobs.png")


def plot_concurrency(doc: dict[str, Any], out: Path) -> Path | None:
    bursts = doc.get("concurrency", {}).get("bursts", [])
    if not bursts:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    n = [b["clients"] for b in bursts]
    ax.plot(n, [b["p50_s"] for b in bursts], "o-", label="p50")
    ax.plot(n, [b["p99_s"] for b in bursts], "s-", label="p99")
    ax.axhline(2.0, color="grey", ls=":", lw=1)
    ax.set(xlabel="clients uploading 1 MB at once", ylabel="upload latency (s)", title="Concurrency")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out / "concurrency.png")


def render_perf(doc: dict[str, Any], out: Path) -> list[Path]:
    written = [f(doc, out) for f in (plot_transfer, plot_fe, plot_jobs, plot_concurrency)]
    return [p for p in written if p is not None]
