"""Job events on PostgreSQL: a front-end without a worker hears of its jobs' changes through LISTEN/NOTIFY."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server.app import ServerConfig
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
        assert listening.listen_jobs(heard.set)
        wait_until(heard.is_set, "the first connection's wake-up")
        heard.clear()
        writer.add_upload_and_job("edge-0", "u-0", "task-00", 0, 10, "0" * 64)
        wait_until(heard.is_set, "the new job's notification", timeout=5.0)

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
        assert not server.state.listen_jobs(lambda: None)
        assert server.service.limits.watch_poll_s == 1.0
    finally:
        server.stop(grace=1)
