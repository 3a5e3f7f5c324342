"""Shared helpers of the performance benchmark: RSS sampling, timing, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
MB = 1_000_000
MIB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory of a process now (RssAnon: what it allocated; the page cache of files
    it reads or maps is not counted), from /proc, no psutil."""
    return _status_kib(pid, "RssAnon") * 1024


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size of a process so far (VmHWM, all pages)."""
    return _status_kib(pid, "VmHWM") * 1024


def _status_kib(pid: int | str, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field_name} not in /proc/{pid}/status")


@dataclass
class RssSampler:
    """Samples this process's RSS every `every_s` seconds in a thread; `marks` split the run into phases."""

    every_s: float = 0.002
    samples: list[tuple[float, int]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.baseline = rss_bytes()
        self.samples.append((time.perf_counter(), self.baseline))
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append((time.perf_counter(), rss_bytes()))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((time.perf_counter(), rss_bytes()))

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())

    def peak_growth(self, start: float | None = None, end: float | None = None) -> int:
        """Highest RSS minus the baseline between two times (default: the whole run), in bytes."""
        lo, hi = start or 0.0, end or float("inf")
        values = [rss for t, rss in self.samples if lo <= t <= hi] or [self.baseline]
        return max(0, max(values) - self.baseline)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Least wall time of `repeat` calls: the least disturbed run on a shared machine."""
    return min(timed(fn)[0] for _ in range(max(1, repeat)))


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def code_of(exc: BaseException) -> str:
    """A failed call's gRPC status name (e.g. UNAVAILABLE), else the exception in short."""
    import grpc

    if isinstance(exc, grpc.Call):
        return str(exc.code().name)
    return f"{type(exc).__name__}: {exc}"[:200]


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time a process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks over every core (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle and iowait
    return sum(values) - idle, sum(values)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(threads: int) -> dict[str, object]:
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * _PAGE / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch intra-op threads (0: leave as is), restoring the setting after."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
