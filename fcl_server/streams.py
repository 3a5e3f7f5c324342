"""Stream admission for the asyncio gRPC server: per-client and anonymous stream caps, idle timeouts.

An open stream costs the asyncio server a task and some memory, never a thread, so idle streams
cannot starve other calls. These bounds keep that memory bounded and free what idle callers hold:
* each authenticated client may hold `per_client` streams at once;
* streams of the open services (health Watch, reflection) are capped at `anonymous` in total;
* a stream on which no message moves for `idle_s` is ended by the server (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from fcl_server.errors import ResourceExhausted


@dataclass(frozen=True)
class StreamLimits:
    idle_s: float = 60.0  # a stream with no message in or out for this long is ended
    per_client: int = 8  # streams one authenticated client may hold at once
    anonymous: int = 64  # health Watch and reflection streams (no token needed) in total


class StreamSlots:
    """Counts open streams per key; taking one over its cap is refused at once, never waited for."""

    def __init__(self, cap: int, what: str, setting: str) -> None:
        self.cap, self.what, self.setting = cap, what, setting
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            if self._open[key] >= self.cap:
                raise ResourceExhausted(
                    f"{self.what} already holds {self.cap} open streams (the server's {self.setting}); "
                    "finish or cancel one and retry"
                )
            self._open[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[key] -= 1
                if not self._open[key]:
                    del self._open[key]

    def open_count(self) -> int:
        with self._lock:
            return sum(self._open.values())


def idle_message(idle_s: float) -> str:
    return f"no message for {idle_s:g} s: the server ended the idle stream (its --stream-idle-s)"


async def read_with_idle_timeout(
    requests: AsyncIterator[Any], idle_s: float, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """The request stream, ended with DEADLINE_EXCEEDED when the client sends nothing for `idle_s`."""
    iterator = aiter(requests)
    while True:
        try:
            message = await asyncio.wait_for(anext(iterator), idle_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, idle_message(idle_s))
        yield message


async def write_with_idle_timeout(message: Any, idle_s: float, context: grpc.aio.ServicerContext) -> None:
    """Send one response; a client that reads nothing for `idle_s` (flow control stalls) is dropped."""
    try:
        await asyncio.wait_for(context.write(message), idle_s)
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, idle_message(idle_s))
