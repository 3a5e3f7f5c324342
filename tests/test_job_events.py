"""Job events on PostgreSQL: a front-end without a worker hears of its jobs' changes through LISTEN/NOTIFY."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server import app
from fcl_server.app import ServerConfig
from fcl_server.job_events import EVERY_JOB, JobChange
from fcl_server.servicer import FclServicer
from fcl_server.state import State
from fcl_server.worker_app import create_worker
from tests.servers import enroll, inprocess_server, package_bytes, wait_until

FALLBACK_S = 300.0  # the watch's poll: far longer than the test, so only a notification can wake it


def test_a_watcher_on_a_front_end_without_a_worker_sees_its_job_end_at_once(
    tmp_path: Path, postgres_url: str, fm: FoundationModel
) -> None:
    State(postgres_url, upgrade=True).close()
    (tmp_path / "fe").mkdir()
    shared = {"database": postgres_url, "blob_dir": tmp_path / "shared"}
    frontend = inprocess_server(tmp_path / "fe", fm, worker=False, watch_fallback_s=FALLBACK_S, **shared)
    corpus = tmp_path / "fe" / "public.txt"  # inprocess_server's tiny corpus: a job takes about a second
    # worker_nice=0: a niced worker thread starves while other jobs load the machine
    config = ServerConfig(
        state_dir=tmp_path / "worker", public_corpus=corpus, device="cpu", worker_nice=0, **shared
    )
    worker = create_worker(config, "worker-0", fm=fm)
    try:
        assert frontend.service.limits.watch_poll_s == FALLBACK_S
        token = enroll(None, "edge-0", database=postgres_url)
        arrived: dict[int, float] = {}
        data = package_bytes(fm, ["open_door", "close_door"])
        with Connection(f"127.0.0.1:{frontend.port}", token) as conn:
            job_id = conn.upload(data, "u-0", "task-00", 0, fm.digest).job_id
            seen = lambda event: arrived.setdefault(event.state, time.time())  # noqa: E731
            final = conn.watch_job(job_id, on_event=seen, timeout=120)
        job = frontend.state.job(job_id)
        assert final.state == pb.JOB_STATE_DONE and job is not None
        # the worker's commits reached the watcher within moments, not at the next poll (300 s) nor at
        # the end of the watch's 30 s slice
        lag = {
            "running": arrived.get(pb.JOB_STATE_RUNNING, math.inf) - job.started,  # inf: never seen
            "done": arrived.get(pb.JOB_STATE_DONE, math.inf) - job.finished,
        }
        assert max(lag.values()) < 2.0, lag
    finally:
        worker.stop()
        frontend.stop(grace=1)


def test_the_listener_reconnects_after_the_database_restarts_and_wakes_every_watcher(
    postgres: Any, postgres_url: str
) -> None:
    listening, writer = State(postgres_url, upgrade=True), State(postgres_url)
    heard = threading.Event()
    try:
        changes: list[JobChange] = []

        def hear(change: JobChange) -> None:
            changes.append(change)
            heard.set()

        assert listening.listen_jobs(hear)
        wait_until(heard.is_set, "the first connection's wake-up")
        assert changes == [EVERY_JOB]
        heard.clear()
        job_id, _ = writer.add_upload_and_job("edge-0", "u-0", "task-00", 0, 10, "0" * 64)
        wait_until(heard.is_set, "the new job's notification", timeout=5.0)
        assert changes[-1] == JobChange(job_id, queued=True)  # the payload names the job and its kind

        postgres.pause()
        heard.clear()
        postgres.resume()
        # notifications sent while it was away are lost: once back, it wakes every watcher to read again
        wait_until(heard.is_set, "the wake-up after reconnecting")
        heard.clear()
        writer.add_upload_and_job("edge-0", "u-1", "task-01", 1, 10, "1" * 64)
        wait_until(heard.is_set, "a notification on the new connection", timeout=5.0)
    finally:
        writer.close()
        listening.close()


def test_sqlite_has_no_listener_and_watches_poll_every_second(tmp_path: Path, fm: FoundationModel) -> None:
    server = inprocess_server(tmp_path, fm, worker=False, watch_fallback_s=FALLBACK_S)
    try:
        assert not server.state.listen_jobs(lambda change: None)
        assert server.service.limits.watch_poll_s == 1.0
    finally:
        server.stop(grace=1)


def test_job_change_payloads_round_trip_and_name_whom_they_concern() -> None:
    for change in (EVERY_JOB, JobChange(7), JobChange(7, queued=True)):
        assert JobChange.from_payload(change.payload()) == change
    assert JobChange.from_payload("garbage") == EVERY_JOB  # unreadable: every watcher looks again
    new_job, ended = JobChange(9, queued=True), JobChange(3)
    assert new_job.concerns(9, waiting=False) and not new_job.concerns(5, waiting=True)
    assert ended.concerns(5, waiting=True) and not ended.concerns(5, waiting=False)
    assert EVERY_JOB.concerns(5, waiting=False)


def test_new_jobs_at_the_queue_end_send_no_watcher_to_the_database(
    tmp_path: Path, fm: FoundationModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In an upload burst, each new job used to wake every watcher into a read of its job and place."""
    monkeypatch.setattr(app, "WATCH_POLL_S", FALLBACK_S)  # no poll: only a change wakes a watcher
    reads: list[int] = []
    original = FclServicer._job_and_position

    def counted(self: FclServicer, principal: Any, job_id: int) -> tuple[Any, int]:
        reads.append(job_id)
        return original(self, principal, job_id)

    monkeypatch.setattr(FclServicer, "_job_and_position", counted)
    server = inprocess_server(tmp_path, fm, worker=False)
    tokens = [enroll(tmp_path / "state", f"edge-{i}") for i in range(2)]
    data = package_bytes(fm, ["open_door", "close_door"])
    watches: list[Any] = []
    try:
        with Connection(f"127.0.0.1:{server.port}", tokens[0]) as conn:
            ids = [conn.upload(data, f"u-{n}", f"task-{n:02d}", n, fm.digest).job_id for n in range(4)]
            for job_id in ids:
                call = conn.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=conn.metadata)
                watches.append(call)
                assert next(call).state == pb.JOB_STATE_QUEUED
            wait_until(lambda: len(reads) == 4, "each watcher's first read")
            with Connection(f"127.0.0.1:{server.port}", tokens[1]) as other:
                for n in range(10):  # the burst: each is a change, none concerns a watcher
                    other.upload(data, f"v-{n}", f"task-{n:02d}", n, fm.digest)
            server.service.notifier.notify(JobChange(ids[0]))  # the first job ends: every place moves
            wait_until(lambda: len(reads) == 8, "one read per watcher for the change that concerns it")
            time.sleep(0.5)  # any read the burst caused would have come before this change's
            assert sorted(reads) == sorted(ids * 2), reads
    finally:
        for call in watches:
            call.cancel()
        server.stop(grace=1)
