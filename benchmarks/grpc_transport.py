"""`--transport grpc`: run `ours` through real fcl-server and fcl-client processes on loopback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.demo import result_entry, run_cluster
from benchmarks.ours import HETERO_SPECS
from benchmarks.scenario import SCENARIOS, Scenario


def split_for(scenario: str, data: Path, seed: int, out: Path) -> Path:
    """The scenario as an `fcl-data` split directory (what real clients read)."""
    if scenario == "custom":
        return data
    spec = SCENARIOS[scenario]
    if spec.alpha != 0.5 or spec.variant:
        raise SystemExit(f"--transport grpc runs the plain clinc150 scenarios, not {scenario!r}")
    tasks, clients = spec.tasks, spec.clients
    cmd = [
        sys.executable,
        "-m",
        "common.datasets.cli",
        "clinc150",
        "--data",
        str(data),
        "--tasks",
        str(tasks),
        "--clients",
        str(clients),
        "--alpha",
        "0.5",
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def run_ours_grpc(sc: Scenario, scenario: str, data: Path, seed: int, cache: Path) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="fcl-grpc-"))
    try:
        split = split_for(scenario, data, seed, work / "data")
        run = run_cluster(
            split,
            work,
            HETERO_SPECS,
            client_args=["--seed", str(seed)],
            server_args=["--public-corpus", str(split / "public.txt")],
            say=lambda _: None,
        )
        failed = {name: code for name, code in run.exit_codes.items() if code != 0}
        if failed:
            raise RuntimeError(f"processes failed: {failed}; logs in {work / 'logs'}")
        entry = result_entry(run, "ours", seed)
        entry["transport"] = "grpc"
        return entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
