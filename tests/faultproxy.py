"""A TCP proxy for fault-injection tests: counts bytes, throttles, and cuts connections on cue."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

UP, DOWN = "up", "down"  # client → server, server → client
_BLOCK = 64 * 1024


@dataclass
class _Cut:
    direction: str
    after: int  # bytes in `direction`, counted from when the cut was armed


class FaultProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:upstream_port (changeable, e.g. after a server restart).

    `cut_after(UP, n)` resets every open connection once n more client→server bytes went through;
    `rate[UP]` limits bytes/s per direction; `chaos` cuts each connection after a random byte budget.
    """

    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.sent = {UP: 0, DOWN: 0}  # bytes forwarded in total
        self.rate: dict[str, float | None] = {UP: None, DOWN: None}
        self.chaos: tuple[int, int] | None = None  # (min, max) bytes a connection may carry
        self.block = _BLOCK  # bytes read (and, throttled, paced) at a time; small blocks = a finer trickle
        self.cuts = 0
        self.connections = 0
        self._cut: _Cut | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut_after(self, direction: str, nbytes: int) -> None:
        with self._lock:
            self._cut = _Cut(direction, self.sent[direction] + nbytes)

    @property
    def armed(self) -> bool:
        return self._cut is not None

    def cut_all(self) -> None:
        """Reset every open connection now, dropping what the proxy has not forwarded yet."""
        with self._lock:
            for sock in list(self._open):
                _reset(sock)
            self.cuts += len(self._open) // 2

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        self.cut_all()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                server.settimeout(None)
            except OSError:  # upstream down (e.g. killed): the client sees the connection drop
                _reset(client)
                continue
            budget = self._rng.randint(*self.chaos) if self.chaos else None
            conn = _Connection(self, client, server, budget)
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            for src, dst, direction in ((client, server, UP), (server, client, DOWN)):
                threading.Thread(
                    target=conn.pump, args=(src, dst, direction), name=f"proxy-{direction}", daemon=True
                ).start()

    def _account(self, conn: _Connection, direction: str, nbytes: int) -> bool:
        """Count forwarded bytes; True when the connection must be cut now."""
        with self._lock:
            if conn.cut:
                return True  # already cut by the other direction's pump
            self.sent[direction] += nbytes
            conn.carried += nbytes
            cut = self._cut
            if cut is not None and cut.direction == direction and self.sent[direction] >= cut.after:
                self._cut = None
                conn.cut = True
            elif conn.budget is not None and conn.carried >= conn.budget:
                conn.cut = True
            self.cuts += conn.cut
            return conn.cut

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(socks)


class _Connection:
    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket, budget: int | None):
        self.proxy, self.client, self.server, self.budget = proxy, client, server, budget
        self.carried = 0
        self.cut = False
        self._closed = False

    def pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(self.proxy.block)
                if not data:
                    break
                if self.proxy._account(self, direction, len(data)):
                    break  # cut: drop this block and reset both sides, like a failing network
                dst.sendall(data)
                rate = self.proxy.rate[direction]
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.proxy._forget(self.client, self.server)
        _reset(self.client)
        _reset(self.server)


def _reset(sock: socket.socket) -> None:
    """Abort a socket (linger 0: RST); shutdown first wakes a thread blocked reading it."""
    for step in (
        lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
        lambda: sock.shutdown(socket.SHUT_RDWR),
        sock.close,
    ):
        with contextlib.suppress(OSError):
            step()
