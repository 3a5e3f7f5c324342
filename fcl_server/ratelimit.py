"""Per-key token buckets: uploads per minute and uploaded bytes per hour, each client with its own bucket."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class TokenBucket:
    """Up to `capacity` tokens per key, refilled at `capacity` per `period_s`; capacity 0 disables it."""

    def __init__(self, capacity: float, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(capacity)
        self.refill_per_s = self.capacity / period_s
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, last refill time)
        self._lock = threading.Lock()

    def try_acquire(self, key: str, cost: float = 1.0) -> float:
        """Take `cost` tokens; returns 0 when allowed, else the seconds until enough refilled (inf: never)."""
        if self.capacity <= 0:
            return 0.0  # limiting disabled
        if cost > self.capacity:
            return math.inf  # even a full bucket cannot pay for it
        with self._lock:
            now = self.clock()
            tokens = self._refilled(key, now)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self.refill_per_s

    def refund(self, key: str, cost: float = 1.0) -> None:
        """Give back tokens taken for something that did not happen after all (never above capacity)."""
        if self.capacity <= 0:
            return
        with self._lock:
            now = self.clock()
            self._buckets[key] = (min(self.capacity, self._refilled(key, now) + cost), now)

    def _refilled(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.refill_per_s)


class RateLimiter(TokenBucket):
    """At most `per_minute` acquisitions per key per minute, in bursts of up to `per_minute`."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(per_minute, 60.0, clock)


MIB = 1024 * 1024


class ByteQuota(TokenBucket):
    """At most `mb_per_hour` MiB per key per hour; a full bucket allows a burst of the whole hour's quota."""

    def __init__(self, mb_per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(mb_per_hour * MIB, 3600.0, clock)
