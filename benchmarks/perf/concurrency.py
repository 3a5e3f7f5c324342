"""Concurrency: N simulated clients (threads, own tokens and channels) upload packages at once."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.perf.harness import ServerProcess, package_of_size
from benchmarks.perf.util import MB, code_of, cpu_jiffies, peak_rss_bytes, percentile, rss_bytes
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection

BARRIER_S = 600.0  # every client registers within this (a thousand Registers on a busy 2-core box)


class _Client(threading.Thread):
    def __init__(
        self,
        name: str,
        target: str,
        token: str,
        data: bytes,
        digest: str,
        registered: threading.Barrier,
        go: threading.Event,
    ):
        super().__init__(name=name, daemon=True)
        self.target, self.token, self.data, self.digest = target, token, data, digest
        self.registered, self.go = registered, go
        self.latency: float | None = None
        self.error: str | None = None
        self.code: str | None = None  # the gRPC status of a failed upload (or the exception's name)

    def run(self) -> None:
        try:
            with Connection(self.target, self.token, timeout=120, retries=0) as conn:
                try:
                    conn.register(self.name, self.digest)
                finally:  # one that failed to register is still counted in: the others need not wait for it
                    self.registered.wait(timeout=BARRIER_S)
                self.go.wait(timeout=BARRIER_S)
                started = time.perf_counter()
                conn.upload(self.data, uuid.uuid4().hex, "task-0", 0, self.digest, fresh=True)
                self.latency = time.perf_counter() - started
        except Exception as exc:  # every failure is a counted error, never a crash of the benchmark
            self.code = code_of(exc).split(":")[0]
            self.error = f"{type(exc).__name__}: {exc}"[:300]


class UploadBurst:
    """Client threads named client-0.. (the i-th with tokens[i], on targets[i % len(targets)]): each
    registers on a channel of its own, then `run()` has them all upload packages[i] at once."""

    def __init__(self, targets: Sequence[str], tokens: Sequence[str], packages: Sequence[bytes], digest: str):
        self._registered = threading.Barrier(len(tokens) + 1)
        self._go = threading.Event()
        self.clients = [
            _Client(
                f"client-{i}",
                targets[i % len(targets)],
                token,
                packages[i],
                digest,
                self._registered,
                self._go,
            )
            for i, token in enumerate(tokens)
        ]
        self.package_bytes = len(packages[0])

    def register(self) -> None:
        """Start the clients; returns once every one has registered and waits for the go."""
        for c in self.clients:
            c.start()
        self._registered.wait(timeout=BARRIER_S)

    def run(self, join_s: float = 600.0) -> dict[str, Any]:
        """Release every client at once, wait for all uploads; latency figures and errors by status."""
        cpu, busy = time.process_time(), cpu_jiffies()
        started = time.perf_counter()
        self._go.set()
        for c in self.clients:
            c.join(timeout=max(0.0, started + join_s - time.perf_counter()))
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - cpu
        machine = [after - before for after, before in zip(cpu_jiffies(), busy, strict=True)]
        latencies = [c.latency for c in self.clients if c.latency is not None]
        codes = Counter(c.code or "NOT_FINISHED" for c in self.clients if c.latency is None)
        return {
            "clients": len(self.clients),
            "package_bytes": self.package_bytes,
            "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99),
            "max_s": max(latencies) if latencies else None,
            "errors": sum(codes.values()),
            "errors_by_code": dict(codes),
            "error_examples": [c.error for c in self.clients if c.error][:3],
            "burst_wall_s": wall,
            "uploads_per_s": len(latencies) / wall if wall > 0 else None,
            # 1.0: the client threads kept one core busy all along (the GIL's limit for one process)
            "client_cpu_share": client_cpu / wall if wall > 0 else None,
            "machine_cpu_busy": machine[0] / machine[1] if machine[1] else None,
        }


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
            uploads = UploadBurst([target], info["tokens"], packages, info["fm_digest"])
            uploads.register()
            rss_before = rss_bytes(pid)
            started = time.perf_counter()
            result = uploads.run()
            time.sleep(settle_s)  # the worker keeps distilling the queued jobs meanwhile
            elapsed = time.perf_counter() - started
            with Connection(target, info["admin_token"]) as admin:
                jobs = admin.status(max_jobs=10_000).jobs
            done = sum(1 for j in jobs if j.state == pb.JOB_STATE_DONE)
            server_peak = peak_rss_bytes(pid)
        finally:
            server.close()
    return {
        **result,
        "jobs_accepted": len(jobs),
        "jobs_done": done,
        "jobs_per_minute": 60 * done / elapsed,
        "server_rss_before_burst_mb": rss_before / MB,
        "server_peak_rss_mb": server_peak / MB,
    }


def median_burst(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The burst of median p99 stands for its repeats; errors are summed over all of them."""
    runs = sorted(runs, key=lambda b: float("inf") if b["p99_s"] is None else b["p99_s"])
    return {
        **runs[len(runs) // 2],
        "errors": sum(b["errors"] for b in runs),  # over every burst, not just the median one
        "bursts_run": len(runs),
        "p50_runs_s": [b["p50_s"] for b in runs],
        "p99_runs_s": [b["p99_s"] for b in runs],
    }


def run(counts: list[int], settle_s: float, repeat: int = 1, max_workers: int = 32) -> dict[str, Any]:
    """`repeat` bursts per client count, each on a fresh server; the burst of median p99 stands for them."""
    bursts = [median_burst([burst(n, 1.0, settle_s, max_workers) for _ in range(repeat)]) for n in counts]
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
