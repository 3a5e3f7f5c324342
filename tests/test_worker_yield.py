"""The distillation worker steps aside for uploads: it pauses while they are in flight, within a budget."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.fm import FoundationModel
from fcl_server.app import RunningServer
from fcl_server.worker import lower_thread_priority
from tests.servers import inprocess_server


@pytest.fixture
def server(tmp_path: Path, fm: FoundationModel) -> Iterator[RunningServer]:
    running = inprocess_server(tmp_path, fm, worker_yield_s=0.6)
    running.worker.stop(timeout=60)  # its checkpoint is driven by the test here, as if a job ran
    running.worker._stop.clear()
    running.worker.yielded_s = 0.0
    yield running
    running.stop(grace=1)


def _upload_for(server: RunningServer, seconds: float) -> threading.Thread:
    held = threading.Event()

    def upload() -> None:
        with server.service.uploads_in_flight.track():
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    held.wait(5)
    return thread


def test_job_pauses_until_the_upload_in_flight_ends(server: RunningServer) -> None:
    worker = server.worker
    upload = _upload_for(server, 0.25)
    started = time.perf_counter()
    assert worker._checkpoint() is False  # not stopping: the job goes on after the pause
    waited = time.perf_counter() - started
    upload.join()
    assert 0.15 <= waited < 0.6 and worker.yielded_s == pytest.approx(waited, abs=0.05)
    assert worker._checkpoint() is False and worker.yielded_s == pytest.approx(waited, abs=0.05)  # no upload


def test_pauses_of_one_job_stay_within_its_budget(server: RunningServer) -> None:
    worker = server.worker
    upload = _upload_for(server, 3.0)
    started = time.perf_counter()
    worker._checkpoint()
    worker._checkpoint()  # the budget (0.6 s) is spent: no further pause
    assert time.perf_counter() - started < 1.2 and worker.yielded_s == pytest.approx(0.6, abs=0.1)
    upload.join()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_worker_thread_runs_at_lower_priority() -> None:
    seen: dict[str, int] = {}

    def body() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        assert lower_thread_priority(5)
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        seen["main"] = os.getpriority(os.PRIO_PROCESS, main_tid)

    main_tid = threading.get_native_id()
    main_before = os.getpriority(os.PRIO_PROCESS, main_tid)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen["delta"] == min(5, 19 - main_before) and seen["main"] == main_before  # only that thread
    assert lower_thread_priority(0) is False
