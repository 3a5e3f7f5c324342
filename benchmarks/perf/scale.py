"""Scale-out: how fast W distillation workers drain a queue of uploads on PostgreSQL (part `scale`).

One throwaway PostgreSQL cluster; for each W, a fresh database, one `serve --no-worker` front-end,
`uploads` queued uploads from as many clients (a client's newer upload would supersede its older),
then W `fcl-server worker` processes. The rate is uploads / (last job done - first job claimed), so
process start-up is not counted; the workers share one feature cache, filled by the first run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import pg
from benchmarks.cluster import issue_token, start_server, start_worker
from benchmarks.perf.harness import package_of_size
from common.datasets import builtin
from fcl_client.connection import Connection
from fcl_server.state import GLOBAL, JobState, State


def drain(cluster: pg.Cluster, tmp: Path, workers: int, uploads: int, labels: int) -> dict[str, Any]:
    url = cluster.new_database()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    upgrade = [sys.executable, "-m", "fcl_server.cli", "db", "upgrade", "--database", url]
    subprocess.run(upgrade, check=True, capture_output=True, env=env)
    shared, corpus = tmp / f"shared-{workers}", builtin.public_path()
    common = ["--database", url, "--blob-dir", str(shared), "--public-corpus", str(corpus)]
    open_limits = ["--uploads-per-minute", "0", "--upload-mb-per-hour", "0", "--client-quota-mb", "0"]
    frontend = start_server(
        tmp / f"fe-{workers}", tmp / f"fe-{workers}.log", *common, "--no-worker", *open_limits
    )
    state = State(url)
    procs = []
    try:
        tokens = [issue_token(None, f"client-{i}", database=url) for i in range(uploads)]
        with Connection(frontend.target, tokens[0]) as conn:
            digest = conn.register("client-0", "").foundation_model.digest
        for i, token in enumerate(tokens):
            with Connection(frontend.target, token) as conn:
                conn.upload(package_of_size(digest, 200_000, labels, seed=i), f"u-{i}", "task-00", 0, digest)
        cache = ["--state-dir", str(tmp / "worker-cache")]
        for k in range(workers):
            procs.append(start_worker(f"worker-{k}", tmp / f"worker-{workers}-{k}.log", *common, *cache))
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            jobs = state.jobs(limit=uploads)
            if all(j.state.final for j in jobs):
                break
            time.sleep(0.2)
        jobs = state.jobs(limit=uploads)
        done = [j for j in jobs if j.state is JobState.DONE]
        first, last = min(j.started for j in done), max(j.finished for j in done)
        shares = []
        for j in done:
            g = state.head(GLOBAL, "", j.global_version)
            if g is not None and j.finished > j.started:
                shares.append((g.created - j.started) / (j.finished - j.started))
    finally:
        for proc in procs:
            proc.stop()
        frontend.stop(timeout=60)
        state.close()
    seconds = last - first
    return {
        "workers": workers,
        "uploads": uploads,
        "done": len(done),
        "seconds": seconds,
        "jobs_per_hour": len(done) / seconds * 3600 if seconds > 0 else None,
        "global_step_share": sum(shares) / len(shares) if shares else None,
        "job_s_mean": sum(j.finished - j.started for j in done) / len(done) if done else None,
    }


def run(uploads: int, labels: int, worker_counts: list[int]) -> dict[str, Any]:
    bin_dir = pg.bindir()
    if bin_dir is None:
        return {"skipped": "PostgreSQL is not installed (no initdb)"}
    cluster = pg.Cluster(bin_dir)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory(prefix="fcl-perf-scale-") as tmp_dir:
            tmp = Path(tmp_dir)
            os.chmod(tmp, 0o755)
            runs = [drain(cluster, tmp, w, uploads, labels) for w in worker_counts]
    finally:
        cluster.stop()
    by_count = {r["workers"]: r for r in runs}
    one, two = by_count.get(1, {}), by_count.get(2, {})
    ratio = (
        two["jobs_per_hour"] / one["jobs_per_hour"]
        if one.get("jobs_per_hour") and two.get("jobs_per_hour")
        else None
    )
    return {
        "what": (
            f"queue drain on one PostgreSQL: {uploads} uploads queued from {uploads} clients through a "
            f"`serve --no-worker` front-end ({labels}-label mlp packages with statistics, the built-in "
            "1,800-sentence public corpus), then W `fcl-server worker` processes (one torch thread each); "
            "rate = jobs / (last done - first claimed); global_step_share = (G published - claimed) / "
            "(done - claimed), mean over jobs"
        ),
        "runs": runs,
        "scale_drain_ratio_2_vs_1": ratio,
        "scale_global_step_share": one.get("global_step_share"),
    }
