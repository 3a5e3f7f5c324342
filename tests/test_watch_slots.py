"""Clients waiting on jobs (WatchJob streams) never hold the threads other calls need; they see jobs end."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server.app import ServerConfig
from fcl_server.worker import DistillationWorker
from tests.servers import enroll, inprocess_server, package_bytes

WORKERS = 4  # domain threads; half as many WatchJob streams (2) stay open, the others poll


class _Watcher(threading.Thread):
    def __init__(self, target: str, token: str, job_id: int) -> None:
        super().__init__(daemon=True)
        self.target, self.token, self.job_id = target, token, job_id
        self.events: list[tuple[int, int]] = []
        self.final: pb.JobEvent | None = None
        self.error: BaseException | None = None

    def _seen(self, event: pb.JobEvent) -> None:
        self.events.append((event.state, event.queue_position))

    def run(self) -> None:
        try:
            with Connection(self.target, self.token, retries=2) as conn:
                self.final = conn.watch_job(self.job_id, on_event=self._seen, timeout=240)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def test_waiting_watchers_leave_threads_for_other_calls_and_see_their_jobs_end(
    tmp_path: Path, fm: FoundationModel
) -> None:
    server = inprocess_server(tmp_path, fm, max_workers=WORKERS)
    # short slices: a watcher holding a slot gives it up soon and polls again, so the slots rotate
    server.service.limits = dataclasses.replace(server.service.limits, watch_slice_s=0.5)
    try:
        assert server.worker.stop(timeout=60)  # jobs stay queued while the watchers wait
        target = f"127.0.0.1:{server.port}"
        tokens = [enroll(server.state_dir, f"client-{i}") for i in range(WORKERS + 2)]
        data = package_bytes(fm, ["open_door", "close_door"])
        jobs = []
        for i, token in enumerate(tokens[:WORKERS]):
            with Connection(target, token) as conn:
                jobs.append(conn.upload(data, f"upload-{i}", "task-00", 0, fm.digest).job_id)
        watchers = [_Watcher(target, tokens[i], jobs[i]) for i in range(WORKERS)]
        for w in watchers:
            w.start()
        time.sleep(1.5)  # every watcher has called WatchJob at least once by now

        # as many waiting clients as threads: other calls are still served at once
        with Connection(target, tokens[WORKERS], retries=0, timeout=5) as conn:
            assert conn.register(f"client-{WORKERS}", fm.digest).fm_matches
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        service = server.service
        worker = DistillationWorker(
            server.state, service.blobs, service.fm_host, server.worker.cfg, service.notifier
        )
        worker.start()
        try:
            for w in watchers:
                w.join(timeout=240)
        finally:
            assert worker.stop(timeout=120)
        for w in watchers:
            assert w.error is None, repr(w.error)
            assert w.final is not None and w.final.state == pb.JOB_STATE_DONE
            # re-watching repeats no event: each state change reached on_event once
            assert all(a != b for a, b in zip(w.events, w.events[1:], strict=False)), w.events
            assert w.events[-1] == (pb.JOB_STATE_DONE, 0)
    finally:
        server.stop(grace=1)


def test_watchers_default_to_half_the_worker_threads() -> None:
    assert ServerConfig(state_dir=Path("unused"), max_workers=10).watchers() == 5
    assert ServerConfig(state_dir=Path("unused"), max_workers=4, max_watchers=40).watchers() == 40
