"""Scale-out on PostgreSQL: a gRPC front-end without a worker and two worker processes, real processes.

Global steps run one at a time, in job order, each applied to G exactly once, while another worker
personalises the job before; a worker killed mid-job loses its lease and the other runs the job
again; clients follow their jobs on the front-end.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.cluster import ServerProcess, WorkerProcess, start_server, start_worker
from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server.blobs import BlobDirError
from fcl_server.state import GLOBAL, JobState, State
from tests.servers import enroll, inprocess_server, package_bytes

LEASE_S = 3.0
LABELS = [["open_door", "close_door"], ["turn_on_light", "dim_light"], ["play_song", "stop_song"]]


@dataclass
class Cluster:
    url: str
    frontend: ServerProcess
    workers: dict[str, WorkerProcess]
    state: State
    target: str


def _wait(what: Callable[[], object], label: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {label}")


@pytest.fixture()
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    corpus = tmp_path / "public.txt"
    corpus.write_text("\n".join(f"public sentence number {i} about topic {i % 7}" for i in range(64)))
    shared = tmp_path / "shared"  # the blob dir every process shares (an NFS or RWX volume in production)
    upgrade = [sys.executable, "-m", "fcl_server.cli", "db", "upgrade", "--database", postgres_url]
    subprocess.run(upgrade, check=True, capture_output=True)
    args = ["--database", postgres_url, "--blob-dir", str(shared), "--public-corpus", str(corpus)]
    frontend = start_server(
        tmp_path / "fe", tmp_path / "fe.log", *args, "--no-worker", "--uploads-per-minute", "0"
    )
    workers: dict[str, WorkerProcess] = {}
    state = State(postgres_url)
    try:
        for name in ("worker-0", "worker-1"):
            workers[name] = start_worker(
                name,
                tmp_path / f"{name}.log",
                *args,
                "--state-dir",
                str(tmp_path / name),
                "--lease-s",
                str(LEASE_S),
            )
        yield Cluster(postgres_url, frontend, workers, state, frontend.target)
    finally:
        for w in workers.values():
            w.stop()
        frontend.stop(timeout=60)
        state.close()


def _upload(c: Cluster, fm: FoundationModel, client: str, token: str, labels: list[str], n: int) -> int:
    with Connection(c.target, token) as conn:
        conn.register(client, fm.digest)
        return conn.upload(package_bytes(fm, labels), f"{client}-{n}", f"task-{n:02d}", n, fm.digest).job_id


def test_two_workers_apply_every_job_once_in_order_and_survive_a_kill(
    cluster: Cluster, fm: FoundationModel
) -> None:
    c = cluster
    tokens = {f"edge-{i}": enroll(None, f"edge-{i}", database=c.url) for i in range(3)}
    jobs = [_upload(c, fm, client, token, LABELS[i], 0) for i, (client, token) in enumerate(tokens.items())]

    # the front-end has no worker: the clients see their jobs end through it, from the workers' writes
    for (client, token), job_id in zip(tokens.items(), jobs, strict=True):
        with Connection(c.target, token) as conn:
            assert conn.watch_job(job_id, timeout=240).state == pb.JOB_STATE_DONE, client

    # one more job; kill -9 the worker that runs it: its lease runs out and the other worker runs it
    job_id = _upload(c, fm, "edge-0", tokens["edge-0"], LABELS[0] + ["lock_door"], 1)
    _wait(lambda: (j := c.state.job(job_id)) is not None and j.state is JobState.RUNNING, "the job to run")
    victim = c.state.job(job_id).worker  # type: ignore[union-attr]
    c.workers[victim].proc.send_signal(signal.SIGKILL)
    c.workers[victim].proc.wait(timeout=30)
    with Connection(c.target, tokens["edge-0"]) as conn:
        assert conn.watch_job(job_id, timeout=240).state == pb.JOB_STATE_DONE
    last = c.state.job(job_id)
    assert last is not None and last.worker != victim and last.attempts >= 2

    done = sorted((j for j in c.state.jobs() if j.state is JobState.DONE), key=lambda j: j.job_id)
    assert [j.job_id for j in done] == [*jobs, job_id]
    # pipelined: a job's global step began while the one before it was still being personalised
    assert any(later.started < earlier.finished for earlier, later in itertools.pairwise(done[:3]))
    # exactly once, one by one in job order: G v1..v4 from jobs 1..4, each version from one job
    assert [j.global_version for j in done] == [1, 2, 3, 4]
    heads = [c.state.head(GLOBAL, "", version=v) for v in (1, 2, 3, 4)]
    assert [h.job_id for h in heads if h is not None] == [j.job_id for j in done]
    assert c.state.head(GLOBAL, "", version=5) is None
    # operators see every worker through any front-end: GetStatus lists them with their running job
    admin = enroll(None, "ops", admin=True, database=c.url)
    with Connection(c.target, admin) as conn:
        status = conn.status()
    seen = {w.worker_id: w for w in status.workers}
    survivor = next(n for n in c.workers if n != victim)
    assert survivor in seen and seen[survivor].pid == c.workers[survivor].proc.pid
    assert victim in seen and seen[victim].heartbeat < seen[survivor].heartbeat  # it stopped beating


def test_upload_limits_hold_for_a_client_that_spreads_its_calls_over_front_ends(
    tmp_path: Path, postgres_url: str, fm: FoundationModel
) -> None:
    shared = tmp_path / "shared"
    common = {"database": postgres_url, "blob_dir": shared, "uploads_per_minute": 2, "worker": False}
    state = State(postgres_url, upgrade=True)
    state.close()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = inprocess_server(tmp_path / "a", fm, **common)
    b = inprocess_server(tmp_path / "b", fm, **common)
    try:
        token = enroll(None, "edge-0", database=postgres_url)
        data = package_bytes(fm, ["open_door", "close_door"])
        for n, front in enumerate((a, b)):
            with Connection(f"127.0.0.1:{front.port}", token, retries=0) as conn:
                assert not conn.upload(data, f"u-{n}", f"task-{n:02d}", n, fm.digest).duplicate
        with Connection(f"127.0.0.1:{a.port}", token, retries=0) as conn, pytest.raises(grpc.RpcError) as exc:
            conn.upload(data, "u-2", "task-02", 2, fm.digest)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "2 uploads per minute" in exc.value.details()  # type: ignore[attr-defined]
        # an upload begun on one front-end is resumed on the other: the partial lives in the shared dir
        assert a.service.partials.root == b.service.partials.root == shared / "partial-uploads"
    finally:
        a.stop(grace=1)
        b.stop(grace=1)


def test_a_database_that_goes_away_gives_unavailable_and_service_resumes_by_itself(
    tmp_path: Path, postgres: Any, postgres_url: str, fm: FoundationModel
) -> None:
    State(postgres_url, upgrade=True).close()
    server = inprocess_server(tmp_path, fm, database=postgres_url)
    try:
        token = enroll(None, "edge-0", database=postgres_url)
        target = f"127.0.0.1:{server.port}"
        with Connection(target, token, retries=0) as conn:
            assert conn.register("edge-0", fm.digest).fm_matches
        postgres.pause()
        try:
            with Connection(target, token, retries=0) as conn, pytest.raises(grpc.RpcError) as exc:
                conn.register("edge-0", fm.digest)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert "retry" in exc.value.details()  # type: ignore[attr-defined]
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1  # still serving
        finally:
            postgres.resume()
        with Connection(target, token, retries=0) as conn:  # no restart: the pool reconnects
            assert conn.register("edge-0", fm.digest).fm_matches
            job_id = conn.upload(package_bytes(fm, LABELS[0]), "after", "task-00", 0, fm.digest).job_id
            assert conn.watch_job(job_id, timeout=240).state == pb.JOB_STATE_DONE  # the worker came back too
    finally:
        server.stop(grace=1)


def test_a_front_end_whose_blob_dir_is_not_the_shared_one_is_refused_at_start(
    tmp_path: Path, postgres_url: str, fm: FoundationModel
) -> None:
    State(postgres_url, upgrade=True).close()
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    first = inprocess_server(tmp_path / "a", fm, database=postgres_url, blob_dir=tmp_path / "shared")
    try:
        with pytest.raises(BlobDirError, match=r"not the blob dir .* --blob-dir on a shared filesystem"):
            inprocess_server(tmp_path / "b", fm, database=postgres_url, blob_dir=tmp_path / "local")
        again = inprocess_server(tmp_path / "c", fm, database=postgres_url, blob_dir=tmp_path / "shared")
        again.stop(grace=1)  # the shared one is accepted
    finally:
        first.stop(grace=1)
