"""benchmarks.table (mean ± std Markdown) and benchmarks.plot (PNG curves, heat-maps) on synthetic results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _part(
    acc_final: float | None,
    acc_avg: float | None,
    forgetting: float | None,
    bwt: float | None,
    matrix: list[list[float | None]],
) -> dict[str, Any]:
    return {
        "acc_final": acc_final,
        "acc_avg": acc_avg,
        "forgetting": forgetting,
        "bwt": bwt,
        "matrix": matrix,
    }


def _doc() -> dict[str, Any]:
    """2 methods x 2 seeds; 'zeta' appears first, has no FM-personal, a metric null in both seeds
    (fm_global.bwt), one null in one seed only (small.forgetting) and a null inside R's lower triangle."""
    zeta = [
        {
            "method": "zeta",
            "seed": seed,
            "fm_global": _part(fin, 0.5, 0.1, None, [[0.9, None], [0.6, 0.8]]),
            "fm_personal": None,
            "small": _part(0.4, 0.4, sf, 0.0, [[0.5, None], [None if seed == 0 else 0.3, 0.5]]),
            "bytes_up_per_client_round": 0.0,
            "bytes_down_per_client_round": 0.0,
            "wall_s": 1.0,
            "peak_rss_mb": 100.0,
        }
        for seed, fin, sf in ((0, 0.60, None), (1, 0.70, 0.2))
    ]
    alpha = [
        {
            "method": "alpha",
            "seed": seed,
            "fm_global": _part(fin, avg, fg, bwt, [[1.0, None], [0.8, fin]]),
            "fm_personal": _part(pfin, 0.7, 0.0, 0.0, [[0.9, None], [0.7, 0.7]]),
            "small": _part(sfin, 0.5, 0.1, -0.1, [[0.6, None], [0.5, 0.5]]),
            "bytes_up_per_client_round": up,
            "bytes_down_per_client_round": 10.0,
            "wall_s": wall,
            "peak_rss_mb": 200.0,
        }
        for seed, fin, avg, fg, bwt, pfin, sfin, up, wall in (
            (0, 0.90, 0.80, 0.05, -0.02, 0.70, 0.5, 1000.0, 10.0),
            (1, 0.94, 0.86, 0.03, -0.04, 0.76, 0.6, 3000.0, 20.0),
        )
    ]
    return {
        "scenario": "synthetic-2x2",
        "fm": "fake-fm",
        "seeds": [0, 1],
        "results": [zeta[0], alpha[0], zeta[1], alpha[1]],
    }


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "res.json"
    path.write_text(json.dumps(_doc()))
    return path


def _close(stat: table.Stat, mean: float | None, std: float | None, n: int) -> bool:
    m, s, k = stat
    if mean is None or std is None:
        return m is None and s is None and k == n
    return (
        m is not None
        and s is not None
        and math.isclose(m, mean)
        and math.isclose(s, std, abs_tol=1e-12)
        and k == n
    )


# ---------------------------------------------------------------- table


def test_summarize_means_and_population_std() -> None:
    s = table.summarize(_doc())
    assert list(s) == ["zeta", "alpha"]  # order of first appearance, not alphabetical
    a = s["alpha"]
    # By hand: mean of two values, std (ddof=0) = |x1 - x2| / 2.
    assert _close(a["fm_global.acc_final"], 0.92, 0.02, 2)
    assert _close(a["fm_global.acc_avg"], 0.83, 0.03, 2)
    assert _close(a["fm_global.forgetting"], 0.04, 0.01, 2)
    assert _close(a["fm_global.bwt"], -0.03, 0.01, 2)
    assert _close(a["fm_personal.acc_final"], 0.73, 0.03, 2)
    assert _close(a["small.acc_final"], 0.55, 0.05, 2)
    assert _close(a["small.forgetting"], 0.1, 0.0, 2)
    assert _close(a["bytes_up_per_client_round"], 2000.0, 1000.0, 2)
    assert _close(a["wall_s"], 15.0, 5.0, 2)
    z = s["zeta"]
    assert _close(z["fm_global.acc_final"], 0.65, 0.05, 2)
    assert _close(z["fm_global.bwt"], None, None, 0)  # null in every seed
    assert _close(z["fm_personal.acc_final"], None, None, 0)  # whole part null
    assert _close(z["small.forgetting"], 0.2, 0.0, 1)  # null in one seed: the other one alone


def test_markdown_table_cells() -> None:
    md = table.markdown_table(_doc())
    assert md.startswith("## synthetic-2x2\n")
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["zeta", "alpha"]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip().strip("|").split("|")[1:]] for r in rows}
    header = [c.strip() for c in md.splitlines()[4].strip().strip("|").split("|")[1:]]
    assert len(header) == len(table.COLUMNS) == len(cells["alpha"]) == len(cells["zeta"])
    assert cells["alpha"] == [
        "92.0 ± 2.0",
        "83.0 ± 3.0",
        "4.0 ± 1.0",
        "-3.0 ± 1.0",
        "73.0 ± 3.0",
        "55.0 ± 5.0",
        "10.0 ± 0.0",
        "2 ± 1",
        "15 ± 5",
    ]
    assert cells["zeta"] == [
        "65.0 ± 5.0",
        "50.0 ± 0.0",
        "10.0 ± 0.0",
        "–",
        "–",
        "40.0 ± 0.0",
        "20.0",
        "0 ± 0",
        "1 ± 0",
    ]


def test_format_stat_single_seed_and_negative_zero() -> None:
    assert table.format_stat((0.935, 0.0, 1), "pct") == "93.5"
    assert table.format_stat((None, None, 0), "kb") == "–"
    assert table.format_stat((-0.0001, 0.0, 1), "pct") == "0.0"
    assert table.format_stat((548004.0, 0.0, 1), "kb") == "548"


def test_table_cli_writes_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path)
    out = tmp_path / "sub" / "table.md"
    assert table.main([str(path), str(path), "--markdown-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("## synthetic-2x2") == 2
    assert out.read_text() == printed
    assert table.main([str(tmp_path / "missing.json")]) == 2


# ---------------------------------------------------------------- plot


def test_mean_matrix_and_curve_handle_nulls() -> None:
    pytest.importorskip("matplotlib")
    import numpy as np

    from benchmarks import plot

    doc = _doc()
    res = plot.mean_matrix_over_seeds(doc, "zeta", "small")
    assert res is not None
    mean, std, n = res
    assert n == 2 and mean.shape == (2, 2)
    assert math.isnan(mean[0, 1])  # j > t: null in every seed
    assert mean[1, 0] == pytest.approx(0.3) and std[1, 0] == pytest.approx(0.0)  # null in seed 0 only
    assert mean[0, 0] == pytest.approx(0.5)
    assert plot.mean_matrix_over_seeds(doc, "zeta", "fm_personal") is None
    g = plot.mean_matrix_over_seeds(doc, "alpha", "fm_global")
    assert g is not None
    assert g[0][1, 1] == pytest.approx(0.92) and g[1][1, 1] == pytest.approx(0.02)
    # average-accuracy curve: a[t] = mean_{j<=t} R[t][j]
    curve = plot.average_accuracy_curve(np.array([[0.9, np.nan], [0.6, 0.8]]))
    assert curve == pytest.approx([0.9, 0.7])
    c = plot.curve_over_seeds(doc, "alpha", "fm_global")
    assert c is not None
    assert c[0] == pytest.approx([1.0, (0.8 + 0.92) / 2]) and c[1] == pytest.approx([0.0, 0.01]) and c[2] == 2


def test_plot_main_writes_valid_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    path = _write(tmp_path)
    assert plot.main([str(path)]) == 0
    out_dir = tmp_path / "res-plots"
    expected = {"accuracy_over_tasks.png", "heatmap_zeta.png", "heatmap_alpha.png"}
    assert {p.name for p in out_dir.iterdir()} == expected
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == expected
    for name in expected:
        data = (out_dir / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, name
    other = tmp_path / "elsewhere"
    assert plot.main([str(path), "--out", str(other)]) == 0
    assert {p.name for p in other.iterdir()} == expected
    assert plot.main([str(tmp_path / "missing.json")]) == 2


def test_heatmaps_with_all_null_and_ragged_matrices(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    doc = _doc()
    doc["results"].append(
        {
            "method": "odd/name",
            "seed": 0,
            "fm_global": _part(None, None, None, None, [[None, None], [None, None]]),  # every cell null
            "fm_personal": _part(0.5, 0.5, 0.0, 0.0, [[0.5], [0.4, 0.5], [0.3]]),  # ragged, 3 tasks
            "small": None,
            "bytes_up_per_client_round": None,
            "bytes_down_per_client_round": None,
            "wall_s": None,
            "peak_rss_mb": None,
        }
    )
    written = plot.plot_heatmaps(doc, tmp_path)
    names = [p.name for p in written]
    assert names == ["heatmap_zeta.png", "heatmap_alpha.png", "heatmap_odd_name.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG_SIGNATURE
    ragged = plot.mean_matrix_over_seeds(doc, "odd/name", "fm_personal")
    assert ragged is not None and ragged[0].shape == (3, 3)
    assert plot.plot_accuracy_curves(doc, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert plot.plot_accuracy_curves({"results": [{"method": "x", "seed": 0}]}, tmp_path / "none.png") is None
    assert table.markdown_table(doc).count("| odd/name |") == 1


def test_demo_lists_exactly_the_nonzero_fcl_counters() -> None:
    from benchmarks.demo import nonzero_counters

    text = "\n".join(
        [
            "# HELP fcl_jobs_total Distillation jobs finished",
            'fcl_jobs_total{outcome="done"} 9.0',
            'fcl_jobs_total{outcome="failed"} 0.0',
            'fcl_rpc_handled_total{code="OK",method="Register",service="fcl.v1.FclService"} 3.0',
            'fcl_rpc_duration_seconds_count{code="OK",method="Register"} 3.0',
            "fcl_queue_depth 2.0",
            "python_gc_objects_collected_total 12.0",
        ]
    )
    assert nonzero_counters(text) == [
        'fcl_jobs_total{outcome="done"} 9.0',
        'fcl_rpc_handled_total{code="OK",method="Register",service="fcl.v1.FclService"} 3.0',
    ]


def _seed_doc(seed: int, methods: list[str], rank: int = 24) -> dict[str, Any]:
    return {
        "scenario": "s",
        "fm": "fm",
        "seeds": [seed],
        "eval_split": "test",
        "command": f"run --seeds {seed}",
        "config": {"smcf": {"stats_rank": rank}},
        "results": [{"method": m, "seed": seed, "wall_s": 1.0} for m in methods],
    }


def test_merge_joins_seeds_and_refuses_mismatches(tmp_path: Path) -> None:
    from benchmarks import merge

    paths = []
    for seed in (2, 0):
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(_seed_doc(seed, ["joint", "ours"])))
    out = tmp_path / "merged.json"
    assert merge.main([str(out), *map(str, paths), "--note", "side by side"]) == 0
    doc = json.loads(out.read_text())
    assert doc["seeds"] == [0, 2]
    assert [(r["method"], r["seed"]) for r in doc["results"]] == [
        ("joint", 0),
        ("ours", 0),
        ("joint", 2),
        ("ours", 2),
    ]
    assert doc["command"] == "run --seeds 2; run --seeds 0 (side by side)"
    with pytest.raises(merge.MergeError, match="config"):
        merge.merge([_seed_doc(0, ["ours"]), _seed_doc(1, ["ours"], rank=8)])
    with pytest.raises(merge.MergeError, match="appears twice"):
        merge.merge([_seed_doc(0, ["ours"]), _seed_doc(0, ["ours"])])
