"""Stream admission for the asyncio gRPC server: per-client and anonymous stream caps, idle timeouts.

An open stream costs the asyncio server a task and some memory, never a thread, so idle streams
cannot starve other calls. These bounds keep that memory bounded and free what idle callers hold:
* each authenticated client may hold `per_client` streams at once;
* streams of the open services (health Watch, reflection) are capped at `anonymous` in total;
* a stream on which no message moves, in or out, for `idle_s` is ended by the server
  (DEADLINE_EXCEEDED): a client that sends nothing, reads nothing (the server's writes stall on
  flow control) or only waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from fcl_server.errors import ResourceExhausted

T = TypeVar("T")


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


def idle_message(idle_s: float) -> str:
    return f"no message for {idle_s:g} s: the server ended the idle stream (its --stream-idle-s)"


class Activity:
    """When a message last moved on a stream, in or out."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


class ActiveContext:
    """The call's context, noting each message the handler writes or reads (everything else passes)."""

    def __init__(self, context: grpc.aio.ServicerContext, activity: Activity) -> None:
        self._context = context
        self._activity = activity

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        await self._context.write(message)  # returns once flow control took it: a stalled reader never does
        self._activity.touch()

    async def read(self) -> Any:
        message = await self._context.read()
        self._activity.touch()
        return message


async def noting(requests: AsyncIterator[Any], activity: Activity) -> AsyncIterator[Any]:
    async for message in requests:
        activity.touch()
        yield message


async def until_idle(
    work: Coroutine[Any, Any, T], activity: Activity, idle_s: float, context: grpc.aio.ServicerContext
) -> T:
    """Run the handler; if no message moves for `idle_s`, cancel it and end the call DEADLINE_EXCEEDED."""
    task = asyncio.ensure_future(work)
    try:
        while (left := activity.last + idle_s - time.monotonic()) > 0:
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()
    except asyncio.CancelledError:  # the call itself ended (client cancel, deadline): so does the handler
        task.cancel()
        raise
    task.cancel()
    with contextlib.suppress(BaseException):  # the handler unwinds (its slots are released) first
        await task
    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, idle_message(idle_s))
    raise AssertionError("abort() returns only by raising")
