"""Job changes across processes on PostgreSQL: NOTIFY in the changing transaction, one LISTEN per process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from fcl_server.database import driver_reason

log = logging.getLogger(__name__)
# the payload is the job id ("+ID": a job joined the queue's end), or "" when several jobs changed
CHANNEL = "fcl_jobs"
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


@dataclass(frozen=True)
class JobChange:
    """What changed: watchers read their job again only for a change that can concern it."""

    job_id: int = 0  # 0: several jobs, or G itself: every watcher looks again
    # a new job joined the end of the queue: no other job's place in it moved
    queued: bool = False

    @property
    def moves_places(self) -> bool:
        """Whether queued jobs' places may have moved (a job ahead started, ended or was released)."""
        return not self.job_id or not self.queued

    def concerns(self, job_id: int, waiting: bool) -> bool:
        """Whether a watcher of `job_id` (`waiting`: jobs are ahead of it) must read it again."""
        return not self.job_id or self.job_id == job_id or (waiting and self.moves_places)

    def payload(self) -> str:
        return f"+{self.job_id}" if self.queued else (str(self.job_id) if self.job_id else "")

    @classmethod
    def from_payload(cls, payload: str) -> JobChange:
        """The change a NOTIFY payload names; one this version cannot read concerns every watcher."""
        queued = payload.startswith("+")
        digits = payload[1:] if queued else payload
        return cls(int(digits), queued) if digits.isdigit() else cls()


EVERY_JOB = JobChange()


def notify_job(db: sa.Connection, job_id: int = 0, queued: bool = False) -> None:
    """Tell every listening process that job `job_id` (0: several jobs) changed, once `db` commits;
    `queued`: it is a new job at the end of the queue.

    PostgreSQL delivers it only if the transaction commits, so a listener never hears of a change it
    cannot read yet, nor of one rolled back. On SQLite this does nothing: its processes poll."""
    if db.dialect.name == "postgresql":
        db.execute(sa.select(sa.func.pg_notify(CHANNEL, JobChange(job_id, queued).payload())))


class JobListener:
    """A thread holding one connection that LISTENs on CHANNEL and calls `on_change(change)` for each
    event.

    If the connection breaks, the thread reconnects with a pause that grows to MAX_BACKOFF_S, and calls
    `on_change(EVERY_JOB)` once connected again: notifications sent meanwhile are lost, so every
    watcher must read its job again.
    """

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], on_change: Callable[[JobChange], None]
    ):
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
            self._on_change(EVERY_JOB)  # whatever changed while no connection listened
            while not self._stop.is_set():
                for note in conn.notifies(timeout=WAIT_S):
                    self._on_change(JobChange.from_payload(note.payload))


def listener_for(engine: sa.Engine, on_change: Callable[[JobChange], None]) -> JobListener | None:
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
