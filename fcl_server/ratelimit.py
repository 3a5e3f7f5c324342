"""Per-key token buckets: uploads per minute and uploaded bytes per hour, each client with its own bucket.

The buckets live in a store: in memory, or in the state database (`DatabaseBuckets`), so that a
client that spreads its calls over several front-ends meets one limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")
Row = tuple[float, float]  # (tokens, time of the last refill)


class BucketStore(Protocol):
    def update_bucket(self, name: str, key: str, change: Callable[[Row | None], tuple[Row, T]]) -> T:
        """Atomically replace the bucket row with change(row)[0]; return change(row)[1]."""
        ...


class MemoryBuckets:
    """Buckets of one process."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], Row] = {}
        self._lock = threading.Lock()

    def update_bucket(self, name: str, key: str, change: Callable[[Row | None], tuple[Row, T]]) -> T:
        with self._lock:
            row, result = change(self._rows.get((name, key)))
            self._rows[(name, key)] = row
            return result


class TokenBucket:
    """Up to `capacity` tokens per key, refilled at `capacity` per `period_s`; capacity 0 disables it."""

    def __init__(
        self,
        capacity: float,
        period_s: float,
        clock: Callable[[], float] = time.monotonic,
        store: BucketStore | None = None,
        name: str = "bucket",
    ) -> None:
        self.capacity = float(capacity)
        self.refill_per_s = self.capacity / period_s
        self.clock = clock
        self.store: BucketStore = store or MemoryBuckets()
        self.name = name

    def try_acquire(self, key: str, cost: float = 1.0) -> float:
        """Take `cost` tokens; returns 0 when allowed, else the seconds until enough refilled (inf: never)."""
        if self.capacity <= 0:
            return 0.0  # limiting disabled
        if cost > self.capacity:
            return math.inf  # even a full bucket cannot pay for it
        now = self.clock()

        def take(row: Row | None) -> tuple[Row, float]:
            tokens = self._refilled(row, now)
            if tokens >= cost:
                return (tokens - cost, now), 0.0
            return (tokens, now), (cost - tokens) / self.refill_per_s

        return self.store.update_bucket(self.name, key, take)

    def refund(self, key: str, cost: float = 1.0) -> None:
        """Give back tokens taken for something that did not happen after all (never above capacity)."""
        if self.capacity <= 0:
            return
        now = self.clock()
        self.store.update_bucket(
            self.name, key, lambda row: ((min(self.capacity, self._refilled(row, now) + cost), now), None)
        )

    def _refilled(self, row: Row | None, now: float) -> float:
        tokens, last = row if row is not None else (self.capacity, now)
        return min(self.capacity, tokens + max(0.0, now - last) * self.refill_per_s)


class RateLimiter(TokenBucket):
    """At most `per_minute` acquisitions per key per minute, in bursts of up to `per_minute`."""

    def __init__(
        self, per_minute: int, clock: Callable[[], float] = time.monotonic, store: BucketStore | None = None
    ) -> None:
        super().__init__(per_minute, 60.0, clock, store, "uploads_per_minute")


MIB = 1024 * 1024


class ByteQuota(TokenBucket):
    """At most `mb_per_hour` MiB per key per hour; a full bucket allows a burst of the whole hour's quota."""

    def __init__(
        self, mb_per_hour: int, clock: Callable[[], float] = time.monotonic, store: BucketStore | None = None
    ) -> None:
        super().__init__(mb_per_hour * MIB, 3600.0, clock, store, "upload_bytes_per_hour")
