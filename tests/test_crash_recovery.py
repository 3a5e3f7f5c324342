"""kill -9 the server during a distillation job: after a restart the upload is distilled exactly once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cluster import enroll, start_server
from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from tests.servers import package_bytes


def _wait_for_state(conn: Connection, job_id: int, state: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(j.job_id == job_id and j.state == state for j in conn.status().jobs):
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {pb.JobState.Name(state)}")


@dataclass
class Interrupted:
    """A server whose first life ended while job `receipt.job_id` was running."""

    state: Path
    token: str
    admin: str
    args: tuple[str, ...]
    data: bytes
    receipt: pb.UploadReceipt
    exit_code: int | None


def _interrupt_running_job(tmp_path: Path, fm: FoundationModel, small_split: Path, kill: bool) -> Interrupted:
    """Upload one package, wait until its job runs, then SIGKILL (kill) or SIGTERM the server."""
    state = tmp_path / "state"
    token, admin = enroll(state, "client-0"), enroll(state, "ops", admin=True)
    # a deliberately heavy head makes the job run long enough to be interrupted mid-way
    args = ("--public-corpus", str(small_split / "public.txt"), "--head-spec", "mlp:1024")
    data = package_bytes(fm, [f"label_{i}" for i in range(8)], "mlp:64")
    server = start_server(state, tmp_path / "server-1.log", *args)
    code = None
    try:
        with Connection(server.target, token) as conn:
            receipt = conn.upload(data, "upload-1", "task-00", 0, fm.digest)
        with Connection(server.target, admin) as conn:
            _wait_for_state(conn, receipt.job_id, pb.JOB_STATE_RUNNING)
    finally:
        if kill:
            server.kill()  # no drain: the job is half done
        else:
            code = server.stop()  # graceful: interrupts the job instead of finishing it
    return Interrupted(state, token, admin, args, data, receipt, code)


def test_job_interrupted_by_kill_is_completed_once_after_restart(
    tmp_path: Path, fm: FoundationModel, small_split: Path
) -> None:
    run = _interrupt_running_job(tmp_path, fm, small_split, kill=True)
    server = start_server(run.state, tmp_path / "server-2.log", *run.args)
    try:
        with Connection(server.target, run.token) as conn:
            event = conn.watch_job(run.receipt.job_id, timeout=300)
            again = conn.upload(run.data, "upload-1", "task-00", 0, fm.digest)
            header, _ = conn.get_knowledge()
        with Connection(server.target, run.admin) as conn:
            status = conn.status()
    finally:
        assert server.stop() == 0
    assert event.state == pb.JOB_STATE_DONE, event.message
    assert (
        again.duplicate and again.job_id == run.receipt.job_id
    )  # the accepted upload was neither lost nor re-queued
    assert [j.job_id for j in status.jobs] == [run.receipt.job_id]  # exactly one job
    assert status.global_version == 1 and header.version == 1  # distilled exactly once
    assert "re-queued 1 interrupted jobs" in (tmp_path / "server-2.log").read_text()


def test_sigterm_during_a_job_requeues_it_and_the_next_start_finishes_it(
    tmp_path: Path, fm: FoundationModel, small_split: Path
) -> None:
    run = _interrupt_running_job(tmp_path, fm, small_split, kill=False)
    assert run.exit_code == 0
    first_log = (tmp_path / "server-1.log").read_text()
    assert "interrupted by shutdown; re-queued" in first_log and "done in" not in first_log

    server = start_server(run.state, tmp_path / "server-2.log", *run.args)
    try:
        with Connection(server.target, run.token) as conn:
            event = conn.watch_job(run.receipt.job_id, timeout=300)
        with Connection(server.target, run.admin) as conn:
            status = conn.status()
    finally:
        assert server.stop() == 0
    assert event.state == pb.JOB_STATE_DONE and event.global_version == 1, event
    assert [j.job_id for j in status.jobs] == [run.receipt.job_id] and status.global_version == 1
