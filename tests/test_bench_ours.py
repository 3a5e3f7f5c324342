"""The benchmark's `ours` runs on a `custom` scenario (an fcl-data split) and beats zero-shot."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.run import main as run_main


def test_custom_scenario_runs_ours_and_baseline(tmp_path: Path, small_split: Path) -> None:
    out = tmp_path / "res.json"
    args = [
        "--scenario",
        "custom",
        "--data",
        str(small_split),
        "--methods",
        "zeroshot,ours,ours-noproto",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        "--smcf",
        '{"epochs": 5}',
        "--obod",
        '{"epochs": 2}',
    ]
    assert run_main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "custom" and doc["seeds"] == [0] and "benchmarks.run" in doc["command"]
    by = {r["method"]: r for r in doc["results"]}
    ours, zeroshot = by["ours"], by["zeroshot"]
    assert zeroshot["fm_personal"] is None and zeroshot["small"] is None
    for part in ("fm_global", "fm_personal", "small"):
        block = ours[part]
        assert len(block["matrix"]) == 2 and block["matrix"][0][1] is None
        assert 0.0 <= block["acc_final"] <= 1.0
    assert ours["fm_global"]["acc_final"] > zeroshot["fm_global"]["acc_final"] + 0.05
    # without shared class statistics OBOD loses its cross-client calibration
    assert ours["fm_global"]["acc_final"] > by["ours-noproto"]["fm_global"]["acc_final"]
    assert ours["bytes_up_per_client_round"] > 0 and ours["bytes_down_per_client_round"] > 0
