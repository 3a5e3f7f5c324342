"""Per-key token buckets: each client may start at most N uploads per minute (bursts up to N)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, last refill time)
        self._lock = threading.Lock()

    def try_acquire(self, key: str) -> float:
        """Take one token; returns 0 when allowed, else the seconds until one is available."""
        if self.capacity <= 0:
            return 0.0  # limiting disabled
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.refill_per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.refill_per_s
