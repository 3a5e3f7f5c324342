"""`fcl-report RESULTS.json --out DIR`: PNG plots and one self-contained HTML page of a result document."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.report.html import ReportImage, report_page
from common.report.schema import ResultFormatError, load_result_doc

REPORT_NAME = "report.html"


def make_images(doc: dict[str, Any], out_dir: Path) -> list[ReportImage]:
    """Write every plot the document has data for; return them in page order with section and caption."""
    from common.report import plots  # matplotlib is only needed here

    images: list[ReportImage] = []
    curves = plots.plot_accuracy_curves(doc, out_dir / "accuracy_over_tasks.png")
    if curves is not None:
        caption = "Mean over tasks j ≤ t of R[t][j] after each task t, per head; band = ± std over seeds."
        images.append(ReportImage("Accuracy over tasks", caption, curves))
    comm = plots.plot_communication(doc, out_dir / "communication.png")
    if comm is not None:
        caption = "Bytes uploaded and downloaded per client per round (kB); bar = ± std over seeds."
        images.append(ReportImage("Communication", caption, comm))
    for path in plots.plot_heatmaps(doc, out_dir):
        method = path.stem.removeprefix("heatmap_")
        caption = f"{method}: accuracy on task j (columns) after task t (rows), mean over seeds."
        images.append(ReportImage("R[t][j] heat-maps", caption, path))
    return images


def build_report(doc: dict[str, Any], out_dir: Path, source: str) -> tuple[Path, list[Path]]:
    """Write the PNGs and report.html into out_dir; return (HTML path, PNG paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = make_images(doc, out_dir)
    page = out_dir / REPORT_NAME
    page.write_text(report_page(doc, images, source), encoding="utf-8")
    return page, [image.path for image in images]


def default_out_dir(path: Path) -> Path:
    """FILE's directory / (FILE stem + '-report')."""
    return path.parent / f"{path.stem}-report"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fcl-report`; prints the files written, the HTML page last."""
    parser = argparse.ArgumentParser(prog="fcl-report", description=__doc__)
    parser.add_argument(
        "file", type=Path, help="result JSON (benchmarks.run --out, or demo-output/report.json)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: FILE stem + '-report' beside FILE)"
    )
    args = parser.parse_args(argv)
    try:
        doc = load_result_doc(args.file)
        page, pngs = build_report(doc, args.out or default_out_dir(args.file), args.file.name)
    except (OSError, ResultFormatError) as exc:
        print(f"fcl-report: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"fcl-report: error: {exc}; it needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    for path in [*pngs, page]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
