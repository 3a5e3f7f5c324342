"""Concurrency: N simulated clients (threads, enrolled tokens) register and upload 1 MB packages at once."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.perf.harness import enroll, package_of_size, start_server
from benchmarks.perf.util import MB, RssSampler, percentile
from common.fm import FoundationModel
from fcl_client.connection import Connection
from fcl_server.state import JobState


class _Client(threading.Thread):
    def __init__(
        self, name: str, target: str, token: str, data: bytes, digest: str, start: threading.Barrier
    ):
        super().__init__(name=name, daemon=True)
        self.target, self.token, self.data, self.digest, self.start_line = target, token, data, digest, start
        self.latency: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            with Connection(self.target, self.token, timeout=120, retries=0) as conn:
                conn.register(self.name, self.digest)
                self.start_line.wait(timeout=120)
                started = time.perf_counter()
                conn.upload(self.data, uuid.uuid4().hex, "task-0", 0, self.digest)
                self.latency = time.perf_counter() - started
        except Exception as exc:  # every failure is a counted error, never a crash of the benchmark
            self.error = f"{type(exc).__name__}: {exc}"[:300]


def burst(
    fm: FoundationModel, clients: int, size_mb: float, settle_s: float, max_workers: int
) -> dict[str, Any]:
    """One server, `clients` threads: all register, wait at a barrier, then upload at once."""
    with tempfile.TemporaryDirectory(prefix="fcl-perf-concurrency-") as tmp:
        server = start_server(Path(tmp), fm, worker=True, max_workers=max_workers)
        try:
            target = f"127.0.0.1:{server.port}"
            packages = [package_of_size(fm.digest, int(size_mb * MB), seed=i) for i in range(clients)]
            barrier = threading.Barrier(clients + 1)
            threads = [
                _Client(f"client-{i}", target, enroll(server, f"client-{i}"), packages[i], fm.digest, barrier)
                for i in range(clients)
            ]
            for t in threads:
                t.start()
            with RssSampler(every_s=0.01) as rss:
                barrier.wait(timeout=300)
                started = time.perf_counter()
                for t in threads:
                    t.join(timeout=600)
                wall = time.perf_counter() - started
                time.sleep(settle_s)  # the worker keeps distilling the queued jobs meanwhile
                done = _jobs_done(server)
                elapsed = time.perf_counter() - started
        finally:
            server.stop(grace=5)
    latencies = [t.latency for t in threads if t.latency is not None]
    errors = [t.error for t in threads if t.error]
    return {
        "clients": clients,
        "package_bytes": len(packages[0]),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies) if latencies else None,
        "errors": len(errors) + sum(1 for t in threads if t.latency is None and not t.error),
        "error_examples": errors[:3],
        "burst_wall_s": wall,
        "uploads_per_s": len(latencies) / wall if wall > 0 else None,
        "jobs_done": done,
        "jobs_per_minute": 60 * done / elapsed,
        "rss_baseline_mb": rss.baseline / MB,
        "rss_peak_growth_mb": rss.peak_growth() / MB,
    }


def _jobs_done(server: Any) -> int:
    return sum(1 for job in server.state.jobs(100_000) if job.state == JobState.DONE)


def run(fm: FoundationModel, counts: list[int], settle_s: float, max_workers: int = 32) -> dict[str, Any]:
    bursts = [burst(fm, n, 1.0, settle_s, max_workers) for n in counts]
    return {
        "what": (
            "one in-process server (upload rate and byte limits off, distillation worker on, "
            f"{max_workers} gRPC worker threads) and N client threads in the same process, each with its "
            "own token and channel: Register, then all upload a distinct valid 1 MB package at once "
            "(Connection.upload: GetUploadStatus + UploadKnowledge, no retries); latency per upload; "
            f"jobs/min = OBOD jobs done within the burst + {settle_s:.0f} s, over that time; RSS is the "
            "whole process (server and clients)"
        ),
        "bursts": bursts,
    }
