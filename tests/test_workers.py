"""Scale-out on PostgreSQL: a gRPC front-end without a worker and two worker processes, real processes.

Global steps run one at a time, in job order, each applied to G exactly once, while another worker
personalises the job before; a worker killed mid-job loses its lease and the other runs the job
again; clients follow their jobs on the front-end.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import OBODConfig
from common.fm import FoundationModel
from common.fm_encoding import EncodingOverrides
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server.app import ServerConfig
from fcl_server.blobs import BlobDirError, BlobStore
from fcl_server.fm_host import FMMismatchError
from fcl_server.service import JobNotifier
from fcl_server.state import GLOBAL, Job, JobState, State
from fcl_server.worker import DistillationWorker
from fcl_server.worker_app import create_worker
from tests.scale import Cluster, scale_cluster, wait_for
from tests.servers import enroll, inprocess_server, package_bytes

LABELS = [["open_door", "close_door"], ["turn_on_light", "dim_light"], ["play_song", "stop_song"]]
LONG_LEASE_S = 60.0  # a job left to its lease would be done only this long after its claim


@pytest.fixture()
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    with scale_cluster(tmp_path, postgres_url, frontends=1, workers=2) as c:
        yield c


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
    wait_for(lambda: (j := c.state.job(job_id)) is not None and j.state is JobState.RUNNING, "the job to run")
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


@contextmanager
def heads_locked(url: str) -> Iterator[None]:
    """Hold the heads table (ACCESS EXCLUSIVE) until the end: a job claimed meanwhile waits at its first
    read of G, so it is surely mid-way when the test strikes. Its own connection, outside any pool."""
    plain = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = psycopg.connect(plain)
    try:
        conn.execute("LOCK TABLE heads IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        conn.close()  # a connection the outage broke closes quietly too


def _queue(c: Cluster, fm: FoundationModel, client: str, labels: list[str], n: int) -> int:
    """Queue a job as a front-end does (the package in the shared blob dir, then its rows): no front-end
    process to start."""
    data = package_bytes(fm, labels)
    blobs = BlobStore(c.blob_dir / "blobs")
    try:
        digest = blobs.put_bytes(data)
    finally:
        blobs.close()
    return c.state.add_upload_and_job(client, f"{client}-{n}", f"task-{n:02d}", n, len(data), digest)[0]


def _job(c: Cluster, job_id: int) -> Job:
    job = c.state.job(job_id)
    assert job is not None
    return job


def test_a_worker_releases_the_job_it_gives_up_at_once_not_at_its_lease_end(
    tmp_path: Path, postgres: Any, postgres_url: str, fm: FoundationModel
) -> None:
    """The database goes away mid-job, or the worker gets SIGTERM: the job goes back to the queue as
    soon as the worker can write, not when its lease runs out (meanwhile no global step would run)."""
    with scale_cluster(tmp_path, postgres_url, frontends=0, workers=1, lease_s=LONG_LEASE_S) as c:
        worker = c.workers["worker-0"]
        with heads_locked(c.url):
            first = _queue(c, fm, "edge-0", LABELS[0], 0)
            wait_for(lambda: _job(c, first).state is JobState.RUNNING, "the job to run")
            postgres.pause()
            try:
                gave_up = lambda: "stopped after" in worker.log_path.read_text()  # noqa: E731
                wait_for(gave_up, "the worker to give the job up", timeout=30)
            finally:
                postgres.resume()
        back = time.monotonic()
        wait_for(lambda: _job(c, first).state is JobState.DONE, "the job to be done", timeout=LONG_LEASE_S)
        took = time.monotonic() - back
        print(f"job done {took:.1f}s after the database came back (lease {LONG_LEASE_S:.0f}s)")
        assert took < LONG_LEASE_S / 4, f"the job waited out its lease: done {took:.1f}s after the outage"
        done = _job(c, first)
        assert done.attempts == 2 and done.global_version == 1  # run again, applied once
        assert c.state.head(GLOBAL, "", version=2) is None

        # SIGTERM mid-job: the worker puts its job back before it exits
        with heads_locked(c.url):
            second = _queue(c, fm, "edge-0", LABELS[1], 1)
            wait_for(lambda: _job(c, second).state is JobState.RUNNING, "the next job to run")
            worker.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "shutting down" in worker.log_path.read_text(), "the worker to stop")
        assert worker.proc.wait(timeout=60) == 0
        left = _job(c, second)
        assert left.state is JobState.QUEUED and left.worker == "" and left.started == 0


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


def test_a_worker_or_front_end_with_other_fm_options_is_refused_at_start_naming_each_difference(
    tmp_path: Path, postgres_url: str, fm: FoundationModel
) -> None:
    """Its features would not be the heads' features: refused before it claims or accepts anything."""
    State(postgres_url, upgrade=True).close()
    shared = {"database": postgres_url, "blob_dir": tmp_path / "shared"}
    (tmp_path / "fe").mkdir()
    frontend = inprocess_server(tmp_path / "fe", fm, worker=False, **shared)
    other = fm.reconfigured(EncodingOverrides.of(pooling="cls", max_length=64))
    try:
        corpus = tmp_path / "fe" / "public.txt"  # inprocess_server's tiny corpus
        config = ServerConfig(state_dir=tmp_path / "w", public_corpus=corpus, device="cpu", **shared)
        with pytest.raises(FMMismatchError) as refused:
            create_worker(config, "worker-cls", fm=other)
        message = str(refused.value)
        assert "pooling 'cls' (the database's: 'mean')" in message, message
        assert "max_length 64 (the database's: 256)" in message, message
        assert "same --fm and --fm-pooling" in message, message
        (tmp_path / "fe2").mkdir()
        with pytest.raises(FMMismatchError, match="pooling 'cls'"):
            inprocess_server(tmp_path / "fe2", other, worker=False, **shared)
        with frontend.state.tx() as db:  # nothing was claimed: no worker row and every job still queued
            assert db.execute(sa.text("SELECT count(*) FROM workers")).scalar() == 0
        worker = create_worker(config, "worker-same", fm=fm)  # the database's own FM is accepted
        worker.stop()
    finally:
        frontend.stop(grace=1)


def test_a_heartbeat_that_renews_a_job_just_ended_drops_no_other_run(tmp_path: Path) -> None:
    """A beat reads the running job, then renews its lease: when that job ended meanwhile and the next
    began, the failed renewal must not drop the next job's run (it would then wait out its lease)."""
    state = State(tmp_path / "state.db")
    try:
        worker = DistillationWorker(
            state, cast(Any, None), cast(Any, None), OBODConfig(), JobNotifier(), worker_id="w", lease_s=0.2
        )
        ended, running = (
            state.add_upload_and_job(f"edge-{n}", "u-0", "task-00", 0, 1, f"{n}" * 64)[0] for n in range(2)
        )
        for job_id in (ended, running):
            claimed = state.claim_next_job("w", lease_s=0.2)
            assert claimed is not None and claimed.job_id == job_id
            if job_id == ended:
                state.fail_job(ended, "ended", "w")  # final: its lease ended with it
        worker.job_id = running  # as _loop sets it
        worker._renew(ended)  # the beat that read `ended` before it ended
        assert not worker._lost.is_set()
        # a lease really taken back still drops the run: the next job's, once another worker has it
        wait_for(lambda: state.claim_next_job("other") is not None, "the lease to run out", timeout=10)
        worker._renew(running)
        assert worker._lost.is_set()
    finally:
        state.close()
