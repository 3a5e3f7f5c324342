"""`python -m benchmarks.plot FILE.json`: accuracy curves and R[t][j] heat-maps (PNG) of a result document.

The plotting code lives in common.report.plots (installed with the project, used by `fcl-report`); this
module keeps the benchmark command and re-exports its functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.report.plots import (
    average_accuracy_curve,
    curve_over_seeds,
    matrix_to_array,
    mean_matrix_over_seeds,
    plot_accuracy_curves,
    plot_heatmaps,
    render,
    seed_matrices,
)
from common.report.schema import ResultFormatError, load_result_doc
from common.report.summary import PART_TITLES, PARTS, method_order

__all__ = [
    "PARTS",
    "PART_TITLES",
    "average_accuracy_curve",
    "curve_over_seeds",
    "default_out_dir",
    "load_results",
    "main",
    "matrix_to_array",
    "mean_matrix_over_seeds",
    "method_order",
    "plot_accuracy_curves",
    "plot_heatmaps",
    "render",
    "seed_matrices",
]


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a result JSON document; ResultFormatError (a ValueError) when it is not in the schema."""
    return load_result_doc(path)


def default_out_dir(path: Path) -> Path:
    """FILE's directory / (FILE stem + '-plots')."""
    return path.parent / f"{path.stem}-plots"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: render the plots of one result file and print the paths written."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    parser.add_argument("file", type=Path, help="result JSON file (benchmarks.run --out)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: FILE stem + '-plots' beside FILE)"
    )
    args = parser.parse_args(argv)
    out_dir = args.out if args.out is not None else default_out_dir(args.file)
    perf = _perf_doc(args.file)
    if perf is not None:  # a `python -m benchmarks.perf` document: cost curves
        from benchmarks.perf.plots import render_perf

        for path in render_perf(perf, out_dir):
            print(path)
        return 0
    try:
        doc = load_results(args.file)
    except (OSError, ResultFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = render(doc, out_dir)
    if not written:
        print("error: no method has an accuracy matrix; nothing plotted", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _perf_doc(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # load_results says what is wrong
    from benchmarks.perf.plots import is_perf_doc

    return doc if isinstance(doc, dict) and is_perf_doc(doc) else None


if __name__ == "__main__":
    sys.exit(main())
