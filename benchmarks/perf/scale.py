"""Scale-out (part `scale`): queue drain by W workers, upload bursts against one process, cost curve.

Steps, each selectable (`--scale-steps`):

* drain: for each W, a fresh PostgreSQL database, one `serve --no-worker` front-end, `uploads` queued
  uploads from as many clients (a client's newer upload would supersede its older), then W
  `fcl-server worker` processes started at once. The rate is uploads / (last job done - first job
  claimed), so process start-up is not counted.
* bursts: N clients upload at once (concurrency.UploadBurst), against one all-in-one `serve` on
  SQLite and against two `serve --no-worker` front-ends and one worker on PostgreSQL (clients
  alternate between the front-ends); each deployment fresh, warmed by one job watched to its end.
* curve: the drain at fewer uploads, for every (labels, W).

PostgreSQL runs durable (fsync on), as SQLite does, since the bursts compare the two.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import pg
from benchmarks.cluster import ServerProcess, issue_tokens, start_server, start_workers
from benchmarks.perf.concurrency import UploadBurst, median_burst
from benchmarks.perf.harness import package_of_size
from benchmarks.perf.util import load_average
from common.datasets import builtin
from fcl_client.connection import Connection
from fcl_server.state import GLOBAL, Job, JobState, State

STEPS = ("drain", "bursts", "curve")
OPEN_LIMITS = ["--uploads-per-minute", "0", "--upload-mb-per-hour", "0", "--client-quota-mb", "0"]
BURST_LABELS = 10
SQLITE, POSTGRES = "sqlite_1_process", "postgres_2_frontends"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def new_database(cluster: pg.Cluster) -> str:
    """A fresh database at the schema's head revision (as `fcl-server db upgrade` leaves it)."""
    url = cluster.new_database()
    upgrade = [sys.executable, "-m", "fcl_server.cli", "db", "upgrade", "--database", url]
    subprocess.run(upgrade, check=True, capture_output=True, env=_env())
    return url


def shared_args(url: str, blobs: Path) -> list[str]:
    """What every process of one deployment shares: the database, the blob dir, the public corpus."""
    return ["--database", url, "--blob-dir", str(blobs), "--public-corpus", str(builtin.public_path())]


def frontend(run: Path, name: str, common: list[str]) -> ServerProcess:
    return start_server(run / name, run / f"{name}.log", *common, "--no-worker", *OPEN_LIMITS)


def upload_all(target: str, tokens: list[str], packages: Callable[[int, str], bytes]) -> str:
    """One upload per token, one after another (client-i uploads packages(i, FM digest)); the FM digest."""
    digest = ""
    for i, token in enumerate(tokens):
        with Connection(target, token) as conn:
            digest = digest or conn.register(f"client-{i}", "").foundation_model.digest
            conn.upload(packages(i, digest), f"u-{i}", "task-00", 0, digest)
    return digest


def drain(cluster: pg.Cluster, tmp: Path, workers: int, uploads: int, labels: int) -> dict[str, Any]:
    run = tmp / f"drain-{labels}l-{workers}w-{uploads}u"
    run.mkdir()
    url = new_database(cluster)
    common = shared_args(url, run / "shared")
    fe = frontend(run, "fe", common)
    state = State(url)
    procs = []
    try:
        tokens = issue_tokens(None, [f"client-{i}" for i in range(uploads)], database=url)
        upload_all(fe.target, tokens, lambda i, digest: package_of_size(digest, 200_000, labels, seed=i))
        # one feature cache for every worker of every run: the first fills it, before its first claim
        logs = {f"worker-{k}": run / f"worker-{k}.log" for k in range(workers)}
        procs = start_workers(logs, *common, "--state-dir", str(tmp / "worker-cache"))
        _wait_final(state, uploads)
        jobs = state.jobs(limit=uploads)
        shares = _global_shares(state, jobs)
    finally:
        for proc in procs:
            proc.stop()
        fe.stop(timeout=60)
        state.close()
    done = [j for j in jobs if j.state is JobState.DONE]
    seconds = max(j.finished for j in done) - min(j.started for j in done)
    firsts = [min(j.started for j in done if j.worker == w) for w in {j.worker for j in done}]
    return {
        "workers": workers,
        "labels": labels,
        "uploads": uploads,
        "done": len(done),
        "seconds": seconds,
        "jobs_per_hour": len(done) / seconds * 3600 if seconds > 0 else None,
        "global_step_share": sum(shares) / len(shares) if shares else None,
        "job_s_mean": sum(j.finished - j.started for j in done) / len(done) if done else None,
        "first_claims_spread_s": max(firsts) - min(firsts),  # how far apart the workers began
    }


def _wait_final(state: State, uploads: int, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(j.state.final for j in state.jobs(limit=uploads)):
        time.sleep(0.2)


def _global_shares(state: State, jobs: list[Job]) -> list[float]:
    """Per done job: (G published - claimed) / (done - claimed)."""
    shares = []
    for j in jobs:
        g = state.head(GLOBAL, "", j.global_version) if j.state is JobState.DONE else None
        if g is not None and j.finished > j.started:
            shares.append((g.created - j.started) / (j.finished - j.started))
    return shares


def drain_step(
    cluster: pg.Cluster, tmp: Path, uploads: int, labels: int, workers: list[int]
) -> dict[str, Any]:
    runs = [drain(cluster, tmp, w, uploads, labels) for w in workers]
    by_count = {r["workers"]: r for r in runs}
    return {
        "what": (
            f"queue drain on one PostgreSQL: {uploads} uploads queued from {uploads} clients through a "
            f"`serve --no-worker` front-end ({labels}-label mlp packages with statistics, the built-in "
            "1,800-sentence public corpus), then W `fcl-server worker` processes started at once (one "
            "torch thread each); rate = jobs / (last done - first claimed); global_step_share = (G "
            "published - claimed) / (done - claimed), mean over jobs"
        ),
        "runs": runs,
        "scale_drain_ratio_2_vs_1": _ratio(by_count.get(2), by_count.get(1), "jobs_per_hour"),
        "scale_global_step_share": by_count.get(1, {}).get("global_step_share"),
    }


def _ratio(top: dict[str, Any] | None, bottom: dict[str, Any] | None, key: str) -> float | None:
    a, b = (top or {}).get(key), (bottom or {}).get(key)
    return a / b if a and b else None


# -- bursts ---------------------------------------------------------------------------------------------
@dataclass
class Deployment:
    targets: list[str]  # the front-ends; clients alternate between them
    enroll: Callable[[list[str]], list[str]]  # client names → their tokens


@contextmanager
def single_sqlite(run: Path) -> Iterator[Deployment]:
    """One `fcl-server serve` (gRPC, SQLite, blobs and the distillation worker in one process)."""
    state_dir = run / "state"
    corpus = ["--public-corpus", str(builtin.public_path())]
    server = start_server(state_dir, run / "serve.log", *corpus, *OPEN_LIMITS)
    try:
        yield Deployment([server.target], lambda names: issue_tokens(state_dir, names))
    finally:
        server.stop(timeout=60)


@contextmanager
def two_frontends(cluster: pg.Cluster, run: Path) -> Iterator[Deployment]:
    """Two `serve --no-worker` front-ends and one `fcl-server worker` on a fresh PostgreSQL database."""
    url = new_database(cluster)
    common = shared_args(url, run / "shared")
    with ExitStack() as stack:
        targets = []
        for name in ("fe-0", "fe-1"):
            fe = frontend(run, name, common)
            stack.callback(fe.stop, 60)
            targets.append(fe.target)
        (worker,) = start_workers({"worker-0": run / "worker-0.log"}, *common, "--state-dir", str(run / "w"))
        stack.callback(worker.stop)
        yield Deployment(targets, lambda names: issue_tokens(None, names, database=url))


def warm_up(deployment: Deployment) -> str:
    """One upload, its job watched to the end: the worker computed U first. Returns the FM digest."""
    (token,) = deployment.enroll(["warm-up"])
    with Connection(deployment.targets[0], token) as conn:
        digest = conn.register("warm-up", "").foundation_model.digest
        receipt = conn.upload(
            package_of_size(digest, 200_000, BURST_LABELS), uuid.uuid4().hex, "t", 0, digest
        )
        conn.watch_job(receipt.job_id, timeout=600)
    return digest


class Packages:
    """The burst's packages, made once per client count and FM digest, the same for each deployment."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._made: dict[tuple[int, str], list[bytes]] = {}

    def get(self, clients: int, digest: str) -> list[bytes]:
        key = (clients, digest)
        if key not in self._made:
            self._made[key] = [
                package_of_size(digest, self.size, BURST_LABELS, seed=i) for i in range(clients)
            ]
        return self._made[key]


def one_burst(deployment: Deployment, clients: int, packages: Packages) -> dict[str, Any]:
    digest = warm_up(deployment)
    tokens = deployment.enroll([f"client-{i}" for i in range(clients)])
    burst = UploadBurst(deployment.targets, tokens, packages.get(clients, digest), digest)
    burst.register()
    return burst.run()


def bursts_step(
    cluster: pg.Cluster, tmp: Path, sizes: list[dict[str, int]], package_bytes: int
) -> dict[str, Any]:
    """Per size (clients, repeat): `repeat` bursts on each deployment, the two taking turns."""
    packages = Packages(package_bytes)
    results: dict[str, dict[int, dict[str, Any]]] = {SQLITE: {}, POSTGRES: {}}
    for size in sizes:
        n = size["clients"]
        runs: dict[str, list[dict[str, Any]]] = {SQLITE: [], POSTGRES: []}
        for rep in range(size["repeat"]):
            run = tmp / f"burst-{n}-{rep}"
            run.mkdir()
            with single_sqlite(run / "sqlite") as deployment:
                runs[SQLITE].append(one_burst(deployment, n, packages))
            with two_frontends(cluster, run / "postgres") as deployment:
                runs[POSTGRES].append(one_burst(deployment, n, packages))
        for name, done in runs.items():
            results[name][n] = median_burst(done)
    return {
        "what": (
            "N client threads in the benchmark process, each with its own token and channel, Register, then "
            f"all upload a distinct valid {package_bytes // 1000} kB package at once (Connection.upload, no "
            f"retries); {SQLITE}: one `fcl-server serve` (SQLite, its distillation worker on); "
            f"{POSTGRES}: two `serve --no-worker` front-ends and one `fcl-server worker` on a durable "
            "PostgreSQL, clients alternating between the front-ends; upload rate, byte and quota limits off, "
            "logs at INFO; each burst on a fresh deployment warmed by one job; the fields are those of the "
            "burst with the median p99 of its repeats, errors summed over them; client_cpu_share: CPU time "
            "of the client process / burst wall time; machine_cpu_busy: share of all cores busy"
        ),
        "bursts": {name: list(by_n.values()) for name, by_n in results.items()},
        "scale_burst_200_p99_ratio": _ratio(results[POSTGRES].get(200), results[SQLITE].get(200), "p99_s"),
        "scale_burst_1000_errors": results[POSTGRES].get(1000, {}).get("errors"),
        "scale_burst_1000_errors_sqlite": results[SQLITE].get(1000, {}).get("errors"),
    }


def curve_step(
    cluster: pg.Cluster, tmp: Path, uploads: int, labels: list[int], workers: list[int]
) -> dict[str, Any]:
    points = [drain(cluster, tmp, w, uploads, n) for n in labels for w in workers]
    return {
        "what": (
            f"the drain ({uploads} queued uploads per point, mlp packages with statistics, the built-in "
            "public corpus) for every label count and worker count; jobs/hour = jobs / (last done - first "
            "claimed)"
        ),
        "points": points,
    }


def run(settings: dict[str, Any], steps: list[str]) -> dict[str, Any]:
    """The steps asked for, on one throwaway PostgreSQL cluster; each step's result under its name."""
    bin_dir = pg.bindir()
    if bin_dir is None:
        return {step: {"skipped": "PostgreSQL is not installed (no initdb)"} for step in steps}
    cluster = pg.Cluster(bin_dir, durable=True)
    cluster.start()
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fcl-perf-scale-") as tmp_dir:
            tmp = Path(tmp_dir)
            os.chmod(tmp, 0o755)
            for step in steps:
                s, started = settings[step], time.perf_counter()
                if step == "drain":
                    out[step] = drain_step(cluster, tmp, s["uploads"], s["labels"], s["workers"])
                elif step == "bursts":
                    out[step] = bursts_step(cluster, tmp, s["sizes"], s["package_bytes"])
                elif step == "curve":
                    out[step] = curve_step(cluster, tmp, s["uploads"], s["labels"], s["workers"])
                # the machine is shared: what else ran shows in the load at each step's end
                out[step].update(step_wall_s=time.perf_counter() - started, load_average_after=load_average())
    finally:
        cluster.stop()
    return out
