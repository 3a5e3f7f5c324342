"""Job changes across processes on PostgreSQL: NOTIFY in the changing transaction, one LISTEN per process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from fcl_server.database import driver_reason

log = logging.getLogger(__name__)
CHANNEL = "fcl_jobs"  # the payload is the job id, or "" when several jobs changed at once
MAX_BACKOFF_S = 10.0
# how long one wait for notifications lasts: the listener sees close() at least this often
WAIT_S = 1.0
# TCP keepalives on the listening connection: a database host that vanished without closing the
# connection (a cut network) is noticed in about 10 s, not after the kernel's default of hours; and a
# connect to a host that does not answer gives up after 10 s (libpq waits forever by default)
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 4,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "connect_timeout": 10,
}


def notify_job(db: sa.Connection, job_id: int = 0) -> None:
    """Tell every listening process that job `job_id` (0: several jobs) changed, once `db` commits.

    PostgreSQL delivers it only if the transaction commits, so a listener never hears of a change it
    cannot read yet, nor of one rolled back. On SQLite this does nothing: its processes poll."""
    if db.dialect.name == "postgresql":
        db.execute(sa.select(sa.func.pg_notify(CHANNEL, str(job_id) if job_id else "")))


class JobListener:
    """A thread holding one connection that LISTENs on CHANNEL and calls `on_change()` for each event.

    If the connection breaks, the thread reconnects with a pause that grows to MAX_BACKOFF_S, and calls
    `on_change()` once connected again: notifications sent meanwhile are lost, so every watcher must
    read its job again.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], on_change: Callable[[], None]):
        self._connect = connect
        self._on_change = on_change
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self.connects = 0  # connections made so far: the first, then one per reconnect
        self._thread = threading.Thread(target=self._run, name="fcl-job-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        pause = 0.0
        while not self._stop.is_set():
            connects = self.connects
            try:
                self._listen()
            except Exception as exc:  # the database went away (or a callback failed): listen again
                # a connection that worked starts the pauses over; failed attempts in a row double them
                pause = 0.5 if self.connects > connects else min(MAX_BACKOFF_S, max(0.5, 2 * pause))
                log.warning("job listener: %s; reconnecting in %.1f s", driver_reason(exc), pause)
                self._stop.wait(pause)

    def _listen(self) -> None:
        """Connect, LISTEN and pass notifications on until close() or the connection breaks."""
        with self._connect() as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            self.connects += 1
            if self.connects > 1:
                log.info("job listener: reconnected; waking every watcher to read its job again")
            self._on_change()  # whatever changed while no connection listened
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=WAIT_S):
                    self._on_change()


def listener_for(engine: sa.Engine, on_change: Callable[[], None]) -> JobListener | None:
    """A started JobListener on `engine`'s PostgreSQL database (its own connection, not the pool's);
    None on SQLite."""
    if engine.dialect.name != "postgresql":
        return None
    args, kwargs = engine.dialect.create_connect_args(engine.url)

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(*args, **{**kwargs, **KEEPALIVES}, autocommit=True)

    listener = JobListener(connect, on_change)
    listener.start()
    return listener
