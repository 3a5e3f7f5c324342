"""Concurrency: N simulated clients (threads, own tokens and channels) upload 1 MB packages at once."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.perf.harness import ServerProcess, package_of_size
from benchmarks.perf.util import MB, peak_rss_bytes, percentile, rss_bytes
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection


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
                self.start_line.wait(timeout=300)
                started = time.perf_counter()
                conn.upload(self.data, uuid.uuid4().hex, "task-0", 0, self.digest, fresh=True)
                self.latency = time.perf_counter() - started
        except Exception as exc:  # every failure is a counted error, never a crash of the benchmark
            self.error = f"{type(exc).__name__}: {exc}"[:300]


def burst(clients: int, size_mb: float, settle_s: float, max_workers: int) -> dict[str, Any]:
    """A server process and `clients` threads here: all register, wait at a barrier, then upload at once."""
    with tempfile.TemporaryDirectory(prefix="fcl-perf-concurrency-") as tmp:
        server = ServerProcess(
            Path(tmp), "--clients", str(clients), "--worker", "--max-workers", str(max_workers)
        )
        try:
            info, pid = server.info, server.info["pid"]
            target = f"127.0.0.1:{info['port']}"
            packages = [package_of_size(info["fm_digest"], int(size_mb * MB), seed=i) for i in range(clients)]
            barrier = threading.Barrier(clients + 1)
            threads = [
                _Client(f"client-{i}", target, info["tokens"][i], packages[i], info["fm_digest"], barrier)
                for i in range(clients)
            ]
            for t in threads:
                t.start()
            barrier.wait(timeout=300)
            rss_before = rss_bytes(pid)
            started = time.perf_counter()
            for t in threads:
                t.join(timeout=600)
            wall = time.perf_counter() - started
            time.sleep(settle_s)  # the worker keeps distilling the queued jobs meanwhile
            elapsed = time.perf_counter() - started
            with Connection(target, info["admin_token"]) as admin:
                jobs = admin.status(max_jobs=10_000).jobs
            done = sum(1 for j in jobs if j.state == pb.JOB_STATE_DONE)
            server_peak = peak_rss_bytes(pid)
        finally:
            server.close()
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
        "jobs_accepted": len(jobs),
        "jobs_done": done,
        "jobs_per_minute": 60 * done / elapsed,
        "server_rss_before_burst_mb": rss_before / MB,
        "server_peak_rss_mb": server_peak / MB,
    }


def run(counts: list[int], settle_s: float, repeat: int = 1, max_workers: int = 32) -> dict[str, Any]:
    """`repeat` bursts per client count, each on a fresh server; the burst of median p99 stands for them."""
    bursts = []
    for n in counts:
        runs = [burst(n, 1.0, settle_s, max_workers) for _ in range(repeat)]
        runs.sort(key=lambda b: float("inf") if b["p99_s"] is None else b["p99_s"])
        bursts.append(
            {
                **runs[len(runs) // 2],
                "errors": sum(b["errors"] for b in runs),  # over every burst, not just the median one
                "bursts_run": repeat,
                "p50_runs_s": [b["p50_s"] for b in runs],
                "p99_runs_s": [b["p99_s"] for b in runs],
            }
        )
    return {
        "what": (
            "a server process (upload rate and byte limits off, distillation worker on, logs at INFO, "
            f"{max_workers} gRPC worker threads) and N client threads in the benchmark process, each "
            "with its own token and channel: Register, then all upload a distinct valid 1 MB package at "
            "once (Connection.upload of a new upload id: UploadKnowledge, no retries); latency per "
            f"upload; {repeat} bursts per count, each on a fresh server: the fields are those of the burst "
            "with the median p99, except errors (summed over all of them); "
            f"jobs/min = OBOD jobs done within the burst + {settle_s:.0f} s, over that time; "
            "server RSS: anonymous memory when the burst starts, and the process's peak RSS (VmHWM)"
        ),
        "bursts": bursts,
    }
