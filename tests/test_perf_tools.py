"""The performance benchmark's own machinery: payload sizing, references, cost model, verdicts, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from benchmarks import pg
from benchmarks.cluster import issue_tokens
from benchmarks.perf import concurrency, flower, jobs, scale, transfer
from benchmarks.perf.__main__ import goals, headline, kept_parts, kept_steps
from benchmarks.perf.harness import package_of_size
from benchmarks.perf.plots import is_perf_doc, render_perf
from benchmarks.perf.util import percentile
from common.datasets import builtin
from common.fm import FoundationModel
from common.package import PackageLimits, decode_package
from tests.servers import inprocess_server

MB = 1_000_000


@pytest.mark.parametrize("target_mb", [1, 4])
def test_synthetic_packages_are_valid_and_of_the_asked_size(target_mb: int) -> None:
    data = package_of_size("digest", target_mb * MB)
    assert abs(len(data) - target_mb * MB) / (target_mb * MB) < 0.05
    pkg = decode_package(data, PackageLimits(max_bytes=len(data)))
    assert pkg.spec.kind == "mlp" and len(pkg.labels) == 10 and pkg.stats is not None


def test_raw_grpc_reference_moves_exactly_the_bytes_both_ways() -> None:
    server, port = transfer.start_raw_server(max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=transfer.GRPC_OPTIONS) as channel:
            data = bytes(range(256)) * 4099
            assert transfer.raw_upload(channel, data, 65_536) == len(data)
            transfer.verified_upload(channel, data, 65_536)  # raises on a digest mismatch
            assert transfer.raw_download(channel, 1_000_003, 65_536) == 1_000_003
    finally:
        server.stop(None)


def test_cost_model_recovers_the_coefficients_it_is_fitted_to() -> None:
    b, c, d = 2e-3, 5e-6, 3e-6
    points = [
        {"public": p, "labels": n, "steps": s, "seconds": s * (b + c * n) + d * p}
        for p, s in ((1_000, 300), (4_000, 400), (15_000, 700))
        for n in (30, 150, 600)
    ]
    model = jobs.fit_cost_model(points)
    assert model["r2"] > 0.999
    assert model["b_ms_per_step"] == pytest.approx(b * 1e3, rel=1e-3)
    assert model["c_us_per_step_label"] == pytest.approx(c * 1e6, rel=1e-3)
    assert model["d_us_per_public_row"] == pytest.approx(d * 1e6, rel=1e-3)


def test_job_steps_follow_the_obod_rule() -> None:
    from common.config import OBODConfig

    cfg = OBODConfig(epochs=6, personal_epochs=2, batch_size=256, min_steps=300)
    assert jobs.steps_of(1_000, cfg) == 300 + 300  # both fits stretched to min_steps
    assert jobs.steps_of(15_000, cfg) == 6 * 59 + 300


def test_headline_numbers_and_goal_verdicts() -> None:
    parts = {
        "transfer": {"ratio_min": 0.95},
        "flower": {"ratio_min": 0.8},
        "fe": {"ratio_min_batch_ge_64": 0.6},
        "jobs": {"job_s_15k_150": 6.0, "job_s_15k_150_no_stats": 4.0},
        "concurrency": {
            "bursts": [
                {"clients": 10, "p99_s": 0.1, "errors": 0},
                {"clients": 200, "p99_s": 1.5, "errors": 2},
            ]
        },
    }
    numbers = headline(parts)
    assert numbers["concurrency_200_p99_s"] == 1.5 and numbers["concurrency_200_errors"] == 2
    assert numbers["client_peak_rss_mb"] is None  # a skipped part is None, never a made-up number
    verdicts = {k: v["met"] for k, v in goals(numbers).items()}
    assert verdicts == {
        "transfer_ratio_vs_raw": True,
        "transfer_ratio_vs_flower": False,
        "fe_ratio_vs_limit": True,
        "obod_job_s_15k_150": False,
        "obod_job_s_15k_150_no_stats": True,
        "concurrency_200_p99_s": True,
        "concurrency_200_errors": False,
        **dict.fromkeys(("hostile_check_p99_s", "hostile_register_p99_ratio"), None),
        **dict.fromkeys(("hostile_upload_p99_ratio", "hostile_errors"), None),
        **dict.fromkeys(("scale_drain_ratio_2_vs_1", "scale_burst_200_p99_ratio"), None),
        "scale_burst_1000_errors": None,
    }
    assert goals(headline({}))["fe_ratio_vs_limit"]["met"] is None
    drain = {"scale_drain_ratio_2_vs_1": 1.4, "scale_global_step_share": 0.5}
    bursts = {"scale_burst_200_p99_ratio": 1.1, "scale_burst_1000_errors": 3}
    verdicts = goals(headline({"scale": {"drain": drain, "bursts": bursts}}))
    assert verdicts["scale_drain_ratio_2_vs_1"] == {"goal": ">= 1.6", "value": 1.4, "met": False}
    assert verdicts["scale_burst_200_p99_ratio"]["met"] and not verdicts["scale_burst_1000_errors"]["met"]
    hostile = {"hostile_check_p99_s": 0.05, "hostile_register_p99_ratio": 3.0, "hostile_errors": 0}
    verdicts = {k: v["met"] for k, v in goals(headline({"hostile": hostile})).items() if "hostile" in k}
    assert verdicts == {
        "hostile_check_p99_s": True,
        "hostile_register_p99_ratio": False,
        "hostile_upload_p99_ratio": None,
        "hostile_errors": True,
    }


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_cost_curves_are_drawn_from_a_perf_document(tmp_path: Path) -> None:
    size = {
        "size_bytes": MB,
        **{f"{k}_mb_s": 100.0 for k in ("upload", "raw_upload", "verified_raw_upload")},
        **{f"{k}_mb_s": 90.0 for k in ("download", "raw_download", "verified_raw_download")},
    }
    doc = {
        "transfer_ratio_vs_raw": 0.9,
        "transfer": {"sizes": [size, {**size, "size_bytes": 16 * MB}]},
        "fe": {
            "points": [
                {"batch": b, "seq_len": 32, "sentences_per_s": 10.0 * b, "limit_sentences_per_s": 2e3}
                for b in (1, 64)
            ]
        },
        "jobs": {"points": [{"public": p, "labels": 30, "seconds": p / 1e3} for p in (1_000, 15_000)]},
        "concurrency": {"bursts": [{"clients": n, "p50_s": 0.1, "p99_s": 0.2} for n in (10, 200)]},
    }
    assert is_perf_doc(doc)
    written = render_perf(doc, tmp_path)
    assert sorted(p.name for p in written) == [
        "concurrency.png",
        "feature_extraction.png",
        "obod_jobs.png",
        "transfer.png",
    ]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    path = tmp_path / "perf.json"
    path.write_text(json.dumps(doc))
    from benchmarks.plot import main

    assert main([str(path), "--out", str(tmp_path / "cli")]) == 0
    assert len(list((tmp_path / "cli").glob("*.png"))) == 4


def test_pyspy_summary_counts_inclusive_shares_within_a_frame() -> None:
    from benchmarks.perf.pyspy_top import top_frames

    lines = [
        "main (a.py:1);handle (s.py:5);validate (p.py:9) 6",
        "main (a.py:1);handle (s.py:5);write (p.py:20) 2",
        "main (a.py:1);idle (t.py:3) 10",
    ]
    samples, rows = top_frames(lines, within="handle", process="", count=5)
    assert samples == 8
    assert dict(rows) == {"handle (s.py:5)": 8, "validate (p.py:9)": 6, "write (p.py:20)": 2}


def test_update_keeps_the_parts_not_run_again_with_their_command(tmp_path: Path) -> None:
    earlier = tmp_path / "perf.json"
    earlier.write_text(
        json.dumps(
            {
                "command": "python -m benchmarks.perf",
                "plan": {"fe": {"batches": [64]}, "jobs": {"repeat": 2}},
                "fe": {"ratio_min_batch_ge_64": 0.6},
                "jobs": {"job_s_15k_150": 4.0, "command": "python -m benchmarks.perf --parts jobs"},
            }
        )
    )
    doc: dict[str, Any] = {"plan": {}}
    kept = kept_parts(earlier, ["jobs", "concurrency"], doc)
    assert kept == {"fe": {"ratio_min_batch_ge_64": 0.6, "command": "python -m benchmarks.perf"}}
    assert doc["plan"] == {"fe": {"batches": [64]}}
    assert kept_parts(tmp_path / "absent.json", [], doc) == {}


def test_concurrency_reports_the_median_burst_and_every_error(monkeypatch: pytest.MonkeyPatch) -> None:
    p99s = iter([3.0, 1.0, 2.0])
    errors = iter([0, 2, 1])

    def fake_burst(clients: int, size_mb: float, settle_s: float, max_workers: int) -> dict[str, Any]:
        return {"clients": clients, "p50_s": 0.5, "p99_s": next(p99s), "errors": next(errors)}

    monkeypatch.setattr(concurrency, "burst", fake_burst)
    (burst,) = concurrency.run([200], settle_s=0.0, repeat=3)["bursts"]
    assert burst["p99_s"] == 2.0 and burst["p99_runs_s"] == [1.0, 2.0, 3.0] and burst["errors"] == 3


def test_small_flower_payloads_get_more_rounds() -> None:
    assert [flower.rounds_for(mb, 3) for mb in (1, 16, 256)] == [48, 3, 3]


def test_flower_and_ours_take_turns_and_their_rounds_are_pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert flower.blocks_of(48) == [12, 12, 12, 12] and flower.blocks_of(3) == [3]
    assert sum(flower.blocks_of(50)) == 50 and len(flower.blocks_of(50)) == 4
    calls: list[tuple[str, int]] = []

    def fake_flower(python: str, size: int, rounds: int) -> dict[str, Any]:
        calls.append(("flower", rounds))
        return {"round_s": [0.010] * rounds, "flwr": "1.42.0"}

    def fake_ours(size: int, rounds: int, threads: int) -> dict[str, Any]:
        calls.append(("ours", rounds))
        return {"round_s": [0.008 if len(calls) == 2 else 0.020] * rounds}

    monkeypatch.setattr(flower, "find_flower_python", lambda given: ("python", ""))
    monkeypatch.setattr(flower, "flower_rounds", fake_flower)
    monkeypatch.setattr(flower, "our_rounds", fake_ours)
    (size,) = flower.run([1], rounds=3, threads=1, flower_python=None)["sizes"]
    assert calls == [("flower", 12), ("ours", 12)] * 4
    assert len(size["ours_runs_s"]) == len(size["flower_runs_s"]) == 48
    assert size["ours_round_s"] == 0.020 and size["ratio"] == pytest.approx(0.5)  # pooled, not the first turn


def test_update_keeps_the_scale_steps_not_run_again_also_from_before_there_were_steps(tmp_path: Path) -> None:
    earlier = tmp_path / "perf.json"
    flat = {"runs": [], "scale_drain_ratio_2_vs_1": 1.4, "command": "python -m benchmarks.perf --parts scale"}
    earlier.write_text(json.dumps({"plan": {"scale": {"uploads": 40}}, "scale": flat}))
    doc: dict[str, Any] = {"plan": {"scale": {}}}
    assert kept_steps(earlier, ["bursts", "curve"], doc) == {"drain": flat}
    assert doc["plan"]["scale"] == {"drain": {"uploads": 40}}
    nested = {"drain": flat, "bursts": {"scale_burst_1000_errors": 0, "command": "x"}}
    earlier.write_text(
        json.dumps({"command": "y", "plan": {"scale": {"bursts": {"sizes": []}}}, "scale": nested})
    )
    doc = {"plan": {"scale": {}}}
    assert kept_steps(earlier, ["drain"], doc) == {"bursts": nested["bursts"]}
    assert doc["plan"]["scale"] == {"bursts": {"sizes": []}}


def test_a_burst_of_five_clients_counts_errors_by_status(tmp_path: Path, fm: FoundationModel) -> None:
    server = inprocess_server(tmp_path, fm, uploads_per_minute=0, worker_nice=0)  # not starved by other jobs
    try:
        target = f"127.0.0.1:{server.port}"
        # two "front-ends" (the same server twice): the clients take turns
        deployment = scale.Deployment([target, target], lambda names: issue_tokens(server.state_dir, names))
        packages = scale.Packages(20_000)
        result = scale.one_burst(deployment, 5, packages)
        assert result["clients"] == 5 and result["errors"] == 0 and result["errors_by_code"] == {}
        assert 0 < result["p50_s"] <= result["p99_s"] <= result["max_s"]
        assert result["package_bytes"] == len(packages.get(5, fm.digest)[0])
        tokens = [*issue_tokens(server.state_dir, [f"client-{i}" for i in range(4)]), "not-a-token"]
        burst = concurrency.UploadBurst([target], tokens, packages.get(5, fm.digest), fm.digest)
        burst.register()  # the client whose Register fails does not hold the others up
        assert burst.run()["errors_by_code"] == {"UNAUTHENTICATED": 1}
    finally:
        server.stop(grace=1)


def test_a_cost_curve_of_one_point(
    tmp_path: Path, postgres: pg.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "public.txt"  # a tiny corpus: the job takes a second, not the built-in's ten
    corpus.write_text("\n".join(f"public sentence number {i} about topic {i % 7}" for i in range(64)))
    monkeypatch.setattr(builtin, "public_path", lambda: corpus)
    (point,) = scale.curve_step(postgres, tmp_path, uploads=2, labels=[5], workers=[1])["points"]
    assert point["labels"] == 5 and point["workers"] == 1 and point["done"] == 2
    assert point["jobs_per_hour"] > 0 and 0 < point["global_step_share"] < 1
