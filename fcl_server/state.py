"""The server's durable state: tokens, clients, labels, uploads, jobs, heads, metrics (SQLAlchemy Core).

One SQLite file in the state dir by default (WAL), or PostgreSQL (`--database postgresql+psycopg://...`);
the tables are fcl_server.schema, their migrations fcl_server/migrations (see fcl_server.database).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from fcl_server import database
from fcl_server.errors import Unavailable
from fcl_server.job_events import JobChange, JobListener, listener_for, notify_job
from fcl_server.schema import (
    clients,
    collected_blobs,
    heads,
    jobs,
    kv,
    labels,
    metrics,
    rate_buckets,
    tokens,
    upload_reservations,
    uploads,
    workers,
)

GLOBAL = "global"
PERSONAL = "personal"
T = TypeVar("T")
DEFAULT_LEASE_S = 30.0  # a claimed job is its worker's this long after its last heartbeat
CLAIM_LOCK = 0x6663_6C01  # PostgreSQL advisory lock key that serialises job claims ("fcl" 1)
HEAD_LOCK = 0x6663_6C02  # with a hash of (scope, client): serialises new versions of one head series


class LeaseLost(RuntimeError):
    """The job was taken back (its lease ran out) or G moved on: the worker must drop its result."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"  # its global step: one job at a time
    PERSONALIZING = "personalizing"  # G published; its personalised head is being fitted
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.SUPERSEDED)


_CLAIMED = (JobState.RUNNING.value, JobState.PERSONALIZING.value)  # job states a worker holds a lease on


@dataclass(frozen=True)
class Principal:
    name: str
    is_admin: bool


@dataclass(frozen=True)
class Job:
    job_id: int
    client_id: str
    upload_id: str
    task_key: str
    task_index: int
    blob: str
    state: JobState
    message: str
    created: float
    started: float
    finished: float
    global_version: int
    personal_version: int
    worker: str = ""  # the worker that runs (or last ran) it
    attempts: int = 0  # times a worker claimed it
    bank_blob: str = ""  # the statistics bank its global step fitted G on (set once G is published)


@dataclass(frozen=True)
class HeadVersion:
    scope: str
    client_id: str
    version: int
    blob: str
    job_id: int
    num_labels: int
    created: float
    rollback_of: int = 0  # the version this one publishes again (`fcl-server rollback`); 0: a job made it


class RollbackError(ValueError):
    """A rollback that cannot be done as asked; the message says why and what to do."""


def hash_token(token: str) -> str:
    # tokens are 256-bit random strings, so one sha256 is enough (no password stretching needed)
    return hashlib.sha256(token.encode()).hexdigest()


class StateClosed(RuntimeError):
    """The State was closed (the server is shutting down)."""


class Record:
    """A row read back, by column name (`row["size"]`) or position; iterating gives the values.

    It reads like the sqlite3.Row of 0.1.0: `dict(row)` maps names to values, `tuple(row)` is the values.
    """

    __slots__ = ("_keys", "_values")

    def __init__(self, keys: tuple[str, ...], values: tuple[Any, ...]) -> None:
        self._keys = keys
        self._values = values

    @classmethod
    def of(cls, row: sa.Row[Any]) -> Record:
        return cls(tuple(row._fields), tuple(row))

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._keys.index(key)]
            except ValueError:
                raise IndexError(f"no column {key!r} (columns: {', '.join(self._keys)})") from None
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._keys)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Record):
            return (self._keys, self._values) == (other._keys, other._values)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        fields = zip(self._keys, self._values, strict=True)
        return "Record(" + ", ".join(f"{k}={v!r}" for k, v in fields) + ")"


class State:
    """Thread-safe access to the database; each method is one transaction.

    `State(path)` is the SQLite file at `path`; `State("postgresql+psycopg://...")` a database URL.

    Schema upgrades on open: an SQLite database is brought to the head revision automatically (it is
    the embedded single-node default: `make demo`, the tests and a 0.1.0 state dir just work, and only
    this server uses the file). Any other database is only checked, and refused with the command to
    run (`fcl-server db upgrade`) when it is behind: a shared PostgreSQL is the operator's to migrate
    (after a backup, once, while no older server still uses it), not whichever server starts first.
    `upgrade=True` or `False` overrides that default.

    Writes are serialized by one lock (as 0.1.0's single connection was): a write reads and writes in
    one transaction (on SQLite BEGIN IMMEDIATE), so its checks hold when it commits. Reads take a pooled
    connection each and run alongside writes (WAL on SQLite; MVCC on PostgreSQL).
    """

    def __init__(self, path: Path | str, *, upgrade: bool | None = None) -> None:
        url = path if isinstance(path, str) and "://" in path else database.sqlite_url(Path(path))
        self.url = database.mask(url)
        self._engine: sa.Engine | None = database.create_engine(url)
        self._lock = threading.RLock()
        self._listener: JobListener | None = None
        try:
            auto = self._engine.dialect.name == "sqlite" if upgrade is None else upgrade
            database.ensure_current(self._engine, auto)
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            raise StateClosed("the state database is closed")
        return self._engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def pushes_job_events(self) -> bool:
        """Whether other processes' job changes can be heard (listen_jobs) rather than polled for."""
        return self.dialect == "postgresql"

    def listen_jobs(self, on_change: Callable[[JobChange], None]) -> bool:
        """Call `on_change(change)` whenever any process changes a job (PostgreSQL LISTEN/NOTIFY), and once
        after each reconnect of the listening connection; until close(). False on SQLite: poll."""
        if self._listener is None:
            self._listener = listener_for(self.engine, on_change)
        return self._listener is not None

    def close(self) -> None:
        if self._listener is not None:  # before the engine: the listener's thread exits within WAIT_S
            self._listener.close()
            self._listener = None
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    @contextmanager
    def tx(self) -> Iterator[sa.Connection]:
        """One write transaction (SQLAlchemy Core statements on its connection), committed at the end.

        A database that cannot be reached (or, for SQLite, stays locked) raises Unavailable: the
        transaction is rolled back whole, and the call may be retried.
        """
        with _unavailable_as_domain_error(), self._lock, database.write_transaction(self.engine) as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with _unavailable_as_domain_error(), self.engine.connect() as conn, conn.begin():
            yield conn

    # -- tokens and clients -------------------------------------------------------------------
    def add_token(self, token: str, principal: str, is_admin: bool) -> None:
        with self.tx() as db:
            db.execute(
                tokens.insert().values(
                    token_hash=hash_token(token),
                    principal=principal,
                    is_admin=int(is_admin),
                    created=time.time(),
                )
            )

    def revoke_tokens(self, principal: str) -> int:
        with self.tx() as db:
            query = tokens.update().where(tokens.c.principal == principal, tokens.c.revoked == 0)
            return db.execute(query.values(revoked=1)).rowcount

    def principal_for(self, token: str) -> Principal | None:
        query = sa.select(tokens.c.principal, tokens.c.is_admin).where(
            tokens.c.token_hash == hash_token(token), tokens.c.revoked == 0
        )
        with self._read() as db:
            row = db.execute(query).first()
        return Principal(row.principal, bool(row.is_admin)) if row else None

    def touch_client(
        self, client_id: str, fm_digest: str | None = None, model_spec: str | None = None
    ) -> None:
        now = time.time()
        seen: dict[str, Any] = {"last_seen": now}
        if fm_digest is not None:
            seen["fm_digest"] = fm_digest
        if model_spec is not None:
            seen["model_spec"] = model_spec
        with self.tx() as db:
            _insert_ignore(db, clients, {"client_id": client_id, "created": now})
            db.execute(clients.update().where(clients.c.client_id == client_id).values(seen))

    def clients(self) -> list[Record]:
        """(client_id, last_seen, uploads) of every client, by client id."""
        count = (
            sa.select(sa.func.count())
            .select_from(uploads)
            .where(uploads.c.client_id == clients.c.client_id)
            .scalar_subquery()
        )
        query = sa.select(clients.c.client_id, clients.c.last_seen, count.label("uploads"))
        with self._read() as db:
            return [Record.of(r) for r in db.execute(query.order_by(clients.c.client_id))]

    # -- uploads and jobs ---------------------------------------------------------------------
    def find_upload(self, client_id: str, upload_id: str) -> Record | None:
        query = sa.select(uploads).where(uploads.c.client_id == client_id, uploads.c.upload_id == upload_id)
        with self._read() as db:
            row = db.execute(query).first()
        return Record.of(row) if row else None

    def reserve_upload(
        self, client_id: str, upload_id: str, size: int, sha256: str, stale_before: float
    ) -> tuple[int, str] | bool:
        """Bind an unfinished upload id to the package (size, sha256) its header announced.

        Returns the (size, sha256) the id is bound to when those are other bytes; else whether this
        call made the binding (False: it renewed one for the same bytes).
        A binding not renewed since `stale_before` (an abandoned upload) gives way; those of the
        client are dropped here, so abandoned ids do not pile up. The id of an accepted upload is
        bound by its uploads row, checked in the same transaction: a stream whose header raced the
        acceptance cannot bind it to other bytes.
        """
        r = upload_reservations.c
        with self.tx() as db:
            db.execute(
                upload_reservations.delete().where(r.client_id == client_id, r.reserved < stale_before)
            )
            accepted = db.execute(
                sa.select(uploads.c.size, uploads.c.sha256).where(
                    uploads.c.client_id == client_id, uploads.c.upload_id == upload_id
                )
            ).first()
            if accepted is not None:  # accepted since the caller looked: its uploads row binds the id
                bound = int(accepted.size), str(accepted.sha256)
                return bound if bound != (size, sha256) else False
            row = db.execute(
                sa.select(r.size, r.sha256).where(r.client_id == client_id, r.upload_id == upload_id)
            ).first()
            if row is not None and (int(row.size), str(row.sha256)) != (size, sha256):
                return int(row.size), str(row.sha256)
            values = {"client_id": client_id, "upload_id": upload_id, "size": size, "sha256": sha256}
            _upsert(db, upload_reservations, {**values, "reserved": time.time()})
            return row is None

    def release_upload_id(self, client_id: str, upload_id: str) -> None:
        """Drop an unfinished upload's binding (nothing of it is held, so nothing can resume)."""
        r = upload_reservations.c
        with self.tx() as db:
            db.execute(upload_reservations.delete().where(r.client_id == client_id, r.upload_id == upload_id))

    def add_upload_and_job(
        self, client_id: str, upload_id: str, task_key: str, task_index: int, size: int, sha256: str
    ) -> tuple[int, bool]:
        """Record an accepted upload and queue its job, and touch the client; returns (job_id, duplicate).

        One transaction, so one durable commit (an fsync) per upload. The upload id's reservation
        ends here: from now on the uploads row binds it.
        """
        now = time.time()
        r = upload_reservations.c
        with self.tx() as db:
            db.execute(upload_reservations.delete().where(r.client_id == client_id, r.upload_id == upload_id))
            _insert_ignore(db, clients, {"client_id": client_id, "created": now})
            db.execute(clients.update().where(clients.c.client_id == client_id).values(last_seen=now))
            known = db.execute(
                sa.select(uploads.c.job_id).where(
                    uploads.c.client_id == client_id, uploads.c.upload_id == upload_id
                )
            ).scalar()
            if known is not None:
                return int(known), True
            inserted = db.execute(
                jobs.insert().values(
                    client_id=client_id,
                    upload_id=upload_id,
                    task_key=task_key,
                    task_index=task_index,
                    blob=sha256,
                    state=JobState.QUEUED.value,
                    created=now,
                )
            )
            key = inserted.inserted_primary_key  # by RETURNING (PostgreSQL) or lastrowid (SQLite)
            assert key is not None
            job_id = int(key[0])
            db.execute(
                uploads.insert().values(
                    upload_id=upload_id,
                    client_id=client_id,
                    task_key=task_key,
                    task_index=task_index,
                    size=size,
                    sha256=sha256,
                    received=now,
                    job_id=job_id,
                )
            )
            notify_job(db, job_id, queued=True)  # a worker may claim it; no other job's place moved
            return job_id, False

    def client_storage(self, client_id: str) -> tuple[int, int]:
        """(bytes of the client's accepted packages, its metric rows), read in one transaction."""
        with self._read() as db:
            packages = db.execute(
                sa.select(sa.func.coalesce(sa.func.sum(uploads.c.size), 0)).where(
                    uploads.c.client_id == client_id
                )
            ).scalar_one()
            rows = db.execute(
                sa.select(sa.func.count()).select_from(metrics).where(metrics.c.client_id == client_id)
            ).scalar_one()
        return int(packages), int(rows)

    def metric_rows(self, client_id: str, task_index: int) -> tuple[int, set[str]]:
        """(metric rows the client stores, names stored for its task `task_index`), in one transaction."""
        m = metrics.c
        with self._read() as db:
            rows = db.execute(
                sa.select(sa.func.count()).select_from(metrics).where(m.client_id == client_id)
            ).scalar_one()
            names = db.execute(
                sa.select(m.name).where(m.client_id == client_id, m.task_index == task_index)
            ).scalars()
            return int(rows), {str(n) for n in names}

    def job(self, job_id: int) -> Job | None:
        with self._read() as db:
            row = db.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).first()
        return _job(row._mapping) if row else None

    def jobs(
        self, limit: int = 100, states: list[JobState] | None = None, client_id: str | None = None
    ) -> list[Job]:
        """The newest `limit` jobs, newest first; only those in `states` / of `client_id` when given."""
        query = sa.select(jobs)
        if states:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        if client_id is not None:
            query = query.where(jobs.c.client_id == client_id)
        with self._read() as db:
            rows = db.execute(query.order_by(jobs.c.job_id.desc()).limit(limit)).all()
        return [_job(r._mapping) for r in rows]

    def job_counts(self) -> dict[JobState, int]:
        """Jobs in each state (every state, 0 where none)."""
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        with self._read() as db:
            found = {str(r[0]): int(r[1]) for r in db.execute(query)}
        return {s: found.get(s.value, 0) for s in JobState}

    def queue_position(self, job_id: int) -> int:
        query = (
            sa.select(sa.func.count())
            .select_from(jobs)
            .where(jobs.c.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]), jobs.c.job_id < job_id)
        )
        with self._read() as db:
            return int(db.execute(query).scalar_one())

    def queue_depth(self) -> int:
        query = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state == JobState.QUEUED.value)
        with self._read() as db:
            return int(db.execute(query).scalar_one())

    def claim_next_job(self, worker: str = "", lease_s: float = DEFAULT_LEASE_S) -> Job | None:
        """Oldest queued job, now running under `worker`'s lease; a client's older queued jobs are
        superseded by its newest.

        Global steps run one at a time across every worker, in job order (OBOD is one-by-one): while a
        job is RUNNING under a live lease, no other global step is claimed, and the worker is given a
        job to personalise instead, if there is one (PERSONALIZING, unclaimed or its lease ran out;
        a client's personal heads in job order). A job whose lease ran out (its worker died) is
        claimed again. Claims are serialised by a transaction-scoped advisory lock on PostgreSQL (the
        candidate row is also taken FOR UPDATE SKIP LOCKED) and by BEGIN IMMEDIATE on SQLite.
        """
        now = time.time()
        j = jobs.c
        queued = j.state == JobState.QUEUED.value
        with self.tx() as db:
            if db.dialect.name == "postgresql":
                db.execute(sa.select(sa.func.pg_advisory_xact_lock(CLAIM_LOCK)))
            live = db.execute(
                sa.select(j.job_id).where(j.state == JobState.RUNNING.value, j.lease_until >= now).limit(1)
            ).first()
            if live is not None:
                return self._claim_personal(db, worker, lease_s, now)
            expired = sa.and_(j.state == JobState.RUNNING.value, j.lease_until < now)
            while True:
                pick = sa.select(jobs).where(sa.or_(queued, expired)).order_by(j.job_id).limit(1)
                if db.dialect.name == "postgresql":
                    pick = pick.with_for_update(skip_locked=True)
                row = db.execute(pick).first()
                if row is None:
                    return self._claim_personal(db, worker, lease_s, now)
                newer = None
                if row.state == JobState.QUEUED.value:
                    newer = db.execute(
                        sa.select(sa.func.max(j.job_id)).where(
                            queued, j.client_id == row.client_id, j.job_id > row.job_id
                        )
                    ).scalar()
                if newer is None:
                    break
                notify_job(db, row.job_id)
                db.execute(
                    jobs.update()
                    .where(j.job_id == row.job_id)
                    .values(
                        state=JobState.SUPERSEDED.value,
                        message=f"superseded by job {newer} of the same client",
                        finished=now,
                    )
                )
            db.execute(
                jobs.update()
                .where(j.job_id == row.job_id)
                .values(
                    state=JobState.RUNNING.value,
                    started=now,
                    attempts=j.attempts + 1,
                    worker=worker,
                    lease_until=now + lease_s,
                )
            )
            notify_job(db, row.job_id)
            claimed = db.execute(sa.select(jobs).where(j.job_id == row.job_id)).one()
            return _job(claimed._mapping)

    def _claim_personal(self, db: sa.Connection, worker: str, lease_s: float, now: float) -> Job | None:
        """The oldest job whose personalised head nobody fits now, and no older one of its client waits."""
        j = jobs.c
        older = jobs.alias("older")
        waiting = sa.exists().where(
            older.c.client_id == j.client_id,
            older.c.state == JobState.PERSONALIZING.value,
            older.c.job_id < j.job_id,
        )
        pick = (
            sa.select(jobs)
            .where(j.state == JobState.PERSONALIZING.value, j.lease_until < now, ~waiting)
            .order_by(j.job_id)
            .limit(1)
        )
        if db.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True, of=jobs)
        row = db.execute(pick).first()
        if row is None:
            return None
        db.execute(
            jobs.update()
            .where(j.job_id == row.job_id)
            .values(worker=worker, lease_until=now + lease_s, attempts=j.attempts + 1)
        )
        return _job(db.execute(sa.select(jobs).where(j.job_id == row.job_id)).one()._mapping)

    def renew_lease(self, job_id: int, worker: str, lease_s: float) -> bool:
        """Extend `worker`'s lease on its running job; False when the job is no longer its own."""
        j = jobs.c
        with self.tx() as db:
            done = db.execute(
                jobs.update()
                .where(j.job_id == job_id, j.state.in_(_CLAIMED), j.worker == worker)
                .values(lease_until=time.time() + lease_s)
            ).rowcount
        return bool(done)

    def requeue_running(self, worker: str = "") -> int:
        """After a crash: jobs left running by `worker` (this process, restarted) or under a lease that
        ran out go back to the queue. They were never half-applied. Jobs that live workers run stay."""
        j = jobs.c
        with self.tx() as db:
            count = _release(db, sa.or_(j.worker == worker, j.lease_until < time.time()))[0]
            notify_job(db)  # several jobs, maybe
            return count

    def requeue_job(self, job_id: int, worker: str = "", attempt: int | None = None) -> bool:
        """Put a job that was interrupted (not failed) back at its place in the queue, at once rather
        than when its lease runs out; only while it is still `worker`'s, and with `attempt`, on that
        claim of it (a later claim is left alone). True if it was put back."""
        j = jobs.c
        mine = sa.and_(j.job_id == job_id, j.worker == worker)
        if attempt is not None:
            mine = sa.and_(mine, j.attempts == attempt)
        with self.tx() as db:
            released = sum(_release(db, mine)) > 0
            if released:
                notify_job(db, job_id)
            return released

    # -- rate limits ---------------------------------------------------------------------------------
    def update_bucket(
        self,
        name: str,
        key: str,
        change: Callable[[tuple[float, float] | None], tuple[tuple[float, float], T]],
    ) -> T:
        """Read-modify-write one token bucket (tokens, updated) in one transaction: every front-end sees
        the same buckets. `change` gets the row (None: new) and returns the new row and a result."""
        b = rate_buckets.c
        with self.tx() as db:
            pick = sa.select(b.tokens, b.updated).where(b.name == name, b.key == key)
            if db.dialect.name == "postgresql":
                _insert_ignore(db, rate_buckets, {"name": name, "key": key, "tokens": -1.0, "updated": 0.0})
                pick = pick.with_for_update()  # other front-ends wait for this bucket, not for others
            row = db.execute(pick).first()
            found = None if row is None or row.tokens < 0 else (float(row.tokens), float(row.updated))
            (tokens, updated), result = change(found)
            _upsert(db, rate_buckets, {"name": name, "key": key, "tokens": tokens, "updated": updated})
            return result

    # -- workers ------------------------------------------------------------------------------------
    def worker_heartbeat(self, worker: str, host: str, pid: int, job_id: int = 0) -> None:
        """Record that `worker` is alive (and which job it runs): GetStatus, metrics and the dashboard."""
        now = time.time()
        with self.tx() as db:
            known = db.execute(sa.select(workers.c.worker_id).where(workers.c.worker_id == worker)).first()
            if known is None:
                db.execute(
                    workers.insert().values(
                        worker_id=worker, host=host, pid=pid, started=now, heartbeat=now, job_id=job_id
                    )
                )
            else:
                db.execute(
                    workers.update()
                    .where(workers.c.worker_id == worker)
                    .values(host=host, pid=pid, heartbeat=now, job_id=job_id)
                )

    def drop_worker(self, worker: str) -> None:
        with self.tx() as db:
            db.execute(workers.delete().where(workers.c.worker_id == worker))

    def workers(self, seen_within_s: float = 3600.0) -> list[Record]:
        """Workers heard from in the last `seen_within_s`, newest heartbeat first."""
        with self._read() as db:
            rows = db.execute(
                sa.select(workers)
                .where(workers.c.heartbeat >= time.time() - seen_within_s)
                .order_by(workers.c.heartbeat.desc())
            ).all()
        return [Record.of(r) for r in rows]

    def fail_job(self, job_id: int, message: str, worker: str = "") -> None:
        """Record a job that failed, if it is still `worker`'s (one taken back stays with its new worker)."""
        j = jobs.c
        with self.tx() as db:
            db.execute(
                jobs.update()
                .where(j.job_id == job_id, j.state.in_(_CLAIMED), j.worker == worker)
                .values(state=JobState.FAILED.value, message=message[:2000], finished=time.time())
            )
            notify_job(db, job_id)

    def complete_job(
        self,
        job: Job,
        global_blob: str,
        personal_blob: str,
        num_labels: int,
        new_labels: list[str],
        bank_blob: str | None,
        worker: str = "",
        based_on: int | None = None,
    ) -> tuple[int, int]:
        """Publish both steps of a job at once: complete_global and complete_personal in one transaction."""
        with self.tx() as db:
            gv = self._publish_global(
                db, job, global_blob, num_labels, new_labels, bank_blob, worker, based_on
            )
            pv = self._publish_personal(db, job, personal_blob, num_labels, worker)
            return gv, pv

    def complete_global(
        self,
        job: Job,
        global_blob: str,
        num_labels: int,
        new_labels: list[str],
        bank_blob: str | None,
        worker: str = "",
        based_on: int | None = None,
    ) -> int:
        """Publish G's new version, its new labels and the statistics bank; the job goes on to have its
        personalised head fitted (PERSONALIZING), still this worker's, and the next global step may run.

        Applied exactly once: the job must still be RUNNING under `worker`, and G must still be at
        version `based_on` (the one the job started from), else LeaseLost and nothing is written.
        """
        with self.tx() as db:
            gv = self._publish_global(
                db, job, global_blob, num_labels, new_labels, bank_blob, worker, based_on
            )
            db.execute(
                jobs.update()
                .where(jobs.c.job_id == job.job_id)
                .values(state=JobState.PERSONALIZING.value, global_version=gv, bank_blob=bank_blob or "")
            )
            return gv

    def complete_personal(self, job: Job, personal_blob: str, num_labels: int, worker: str = "") -> int:
        """Publish the client's new personalised head and mark the job done (once: LeaseLost otherwise)."""
        with self.tx() as db:
            return self._publish_personal(db, job, personal_blob, num_labels, worker)

    def _owned(self, db: sa.Connection, job: Job, state: JobState, worker: str) -> None:
        owner = db.execute(sa.select(jobs.c.state, jobs.c.worker).where(jobs.c.job_id == job.job_id)).one()
        if owner.state != state.value or owner.worker != worker:
            raise LeaseLost(f"job {job.job_id} is no longer this worker's ({owner.state}, {owner.worker!r})")

    def _publish_global(
        self,
        db: sa.Connection,
        job: Job,
        global_blob: str,
        num_labels: int,
        new_labels: list[str],
        bank_blob: str | None,
        worker: str,
        based_on: int | None,
    ) -> int:
        self._owned(db, job, JobState.RUNNING, worker)
        _lock_head(db, GLOBAL, "")
        gv = _next_version(db, GLOBAL, "")
        if based_on is not None and gv != based_on + 1:
            raise LeaseLost(f"job {job.job_id} started from G v{based_on}, but G is at v{gv - 1} now")
        db.execute(
            heads.insert().values(
                scope=GLOBAL,
                client_id="",
                version=gv,
                blob=global_blob,
                job_id=job.job_id,
                num_labels=num_labels,
                created=time.time(),
            )
        )
        top = db.execute(sa.select(sa.func.max(labels.c.id))).scalar()
        next_id = 0 if top is None else int(top) + 1
        for name in new_labels:
            if _insert_ignore(db, labels, {"name": name, "id": next_id}):
                next_id += 1
        if bank_blob is not None:
            _upsert(db, kv, {"key": "stats_bank", "value": bank_blob})
        # the job row is RUNNING until its caller moves it on: complete_job straight to DONE. Its bank is
        # kept with it: a rollback to this version restores G's bank too
        db.execute(
            jobs.update()
            .where(jobs.c.job_id == job.job_id)
            .values(global_version=gv, bank_blob=bank_blob or "")
        )
        notify_job(db, job.job_id)  # the next global step may be claimed now
        return gv

    def _publish_personal(
        self, db: sa.Connection, job: Job, personal_blob: str, num_labels: int, worker: str
    ) -> int:
        current = db.execute(sa.select(jobs.c.state).where(jobs.c.job_id == job.job_id)).scalar_one()
        phase = JobState.RUNNING if current == JobState.RUNNING.value else JobState.PERSONALIZING
        self._owned(db, job, phase, worker)
        now = time.time()
        _lock_head(db, PERSONAL, job.client_id)
        pv = _next_version(db, PERSONAL, job.client_id)
        db.execute(
            heads.insert().values(
                scope=PERSONAL,
                client_id=job.client_id,
                version=pv,
                blob=personal_blob,
                job_id=job.job_id,
                num_labels=num_labels,
                created=now,
            )
        )
        db.execute(
            jobs.update()
            .where(jobs.c.job_id == job.job_id)
            .values(state=JobState.DONE.value, message="", finished=now, personal_version=pv)
        )
        notify_job(db, job.job_id)
        return pv

    # -- heads, labels, metrics, kv -------------------------------------------------------------
    def head(self, scope: str, client_id: str, version: int = 0) -> HeadVersion | None:
        query = sa.select(heads).where(heads.c.scope == scope, heads.c.client_id == client_id)
        if version:
            query = query.where(heads.c.version == version)
        else:
            query = query.order_by(heads.c.version.desc()).limit(1)
        with self._read() as db:
            row = db.execute(query).first()
        return HeadVersion(**row._mapping) if row else None

    def head_history(
        self, scope: str | None = None, client_id: str | None = None, limit: int = 1000
    ) -> list[HeadVersion]:
        """Head versions, global first, then by client; newest version first within each."""
        query = sa.select(heads)
        if scope is not None:
            query = query.where(heads.c.scope == scope)
        if client_id is not None:
            query = query.where(heads.c.client_id == client_id)
        query = query.order_by(heads.c.scope, heads.c.client_id, heads.c.version.desc()).limit(limit)
        with self._read() as db:
            return [HeadVersion(**r._mapping) for r in db.execute(query)]

    def collected(self, digests: set[str]) -> dict[str, float]:
        """digest → when `fcl-server gc` deleted it, for those of `digests` it deleted."""
        c = collected_blobs.c
        found: dict[str, float] = {}
        with self._read() as db:
            wanted = sorted(digests)
            for start in range(0, len(wanted), 500):  # bounded IN lists
                query = sa.select(c.digest, c.collected).where(c.digest.in_(wanted[start : start + 500]))
                found.update({str(r.digest): float(r.collected) for r in db.execute(query)})
        return found

    def record_collected(self, digest: str, size: int, kind: str) -> None:
        """Record that `fcl-server gc` deletes this blob (before it does)."""
        row = {"digest": digest, "size": size, "kind": kind, "collected": time.time()}
        with self.tx() as db:
            _upsert(db, collected_blobs, row)

    def forget_collected(self, digest: str) -> None:
        """gc put the blob back (it was needed after all)."""
        with self.tx() as db:
            db.execute(collected_blobs.delete().where(collected_blobs.c.digest == digest))

    def rollback_head(
        self,
        scope: str,
        client_id: str,
        version: int,
        check_blobs: Callable[[HeadVersion, str | None], None] = lambda *_: None,
    ) -> tuple[HeadVersion, str | None]:
        """Publish version `version` of a head again, as its series' next version; history stays as it is.

        For G the statistics bank goes back to the one `version` was fitted with, when that is known
        (returned: the bank's blob, "" for an empty bank, None when unknown and left as it is): the next
        global step then starts from G and the bank as they were. `check_blobs(source, bank)` runs inside
        the transaction, before anything is written, and raises to refuse (e.g. a blob that gc deleted).

        A job whose global step is running meanwhile started from the G that was live before: its
        publication finds G moved on (the version compare-and-set in _publish_global) and is dropped,
        and the job runs again from the republished G.
        """
        with self.tx() as db:
            _lock_head(db, scope, client_id)
            h = heads.c
            row = db.execute(
                sa.select(heads).where(h.scope == scope, h.client_id == client_id, h.version == version)
            ).first()
            which = "the global head" if scope == GLOBAL else f"client {client_id!r}'s personalised head"
            if row is None:
                top = _next_version(db, scope, client_id) - 1
                have = f"its versions are 1-{top}" if top else "it has no version yet"
                raise RollbackError(f"{which} has no version {version}: {have} (fcl-server heads lists them)")
            source = HeadVersion(**row._mapping)
            live = _next_version(db, scope, client_id) - 1
            if live == version:
                raise RollbackError(
                    f"version {version} is already the live version of {which}: nothing to do"
                )
            bank = _bank_of(db, version) if scope == GLOBAL else None
            check_blobs(source, bank)
            new = HeadVersion(
                scope=scope,
                client_id=client_id,
                version=live + 1,
                blob=source.blob,
                job_id=0,
                num_labels=source.num_labels,
                created=time.time(),
                rollback_of=version,
            )
            db.execute(heads.insert().values(**dataclasses.asdict(new)))
            if bank is not None:
                if bank:
                    _upsert(db, kv, {"key": "stats_bank", "value": bank})
                else:
                    db.execute(kv.delete().where(kv.c.key == "stats_bank"))
            notify_job(db)  # wakes watchers and idle workers: nothing queued changed, but G did
            return new, bank

    def label_count(self) -> int:
        with self._read() as db:
            return int(db.execute(sa.select(sa.func.count()).select_from(labels)).scalar_one())

    def label_names(self, limit: int) -> list[str]:
        """The first `limit` labels of the global registry, in the order they were first published."""
        with self._read() as db:
            rows = db.execute(sa.select(labels.c.name).order_by(labels.c.id).limit(limit)).all()
        return [str(row[0]) for row in rows]

    def client_count(self) -> int:
        with self._read() as db:
            return int(db.execute(sa.select(sa.func.count()).select_from(clients)).scalar_one())

    def head_summary(self) -> dict[str, tuple[int, int]]:
        """Per scope: (head versions published, highest version number) — for the metrics endpoint."""
        query = sa.select(heads.c.scope, sa.func.count(), sa.func.max(heads.c.version))
        query = query.group_by(heads.c.scope)
        with self._read() as db:
            rows = db.execute(query).all()
        return {str(row[0]): (int(row[1]), int(row[2])) for row in rows}

    def put_metrics(self, client_id: str, task_key: str, task_index: int, values: dict[str, float]) -> int:
        now = time.time()
        with self.tx() as db:
            for name, value in values.items():
                _upsert(
                    db,
                    metrics,
                    {
                        "client_id": client_id,
                        "task_key": task_key,
                        "task_index": task_index,
                        "name": name,
                        "value": value,
                        "reported": now,
                    },
                )
        return len(values)

    def last_metrics(self, client_id: str) -> dict[str, float]:
        m = metrics.c
        last = sa.select(sa.func.max(m.task_index)).where(m.client_id == client_id).scalar_subquery()
        query = sa.select(m.name, m.value).where(m.client_id == client_id, m.task_index == last)
        with self._read() as db:
            rows = db.execute(query).all()
        return {str(r.name): float(r.value) for r in rows}

    def metric_history(self, limit: int = 20_000) -> list[Record]:
        """Every reported metric (client_id, task_key, task_index, name, value, reported), by client, task."""
        m = metrics.c
        query = (
            sa.select(m.client_id, m.task_key, m.task_index, m.name, m.value, m.reported)
            .order_by(m.client_id, m.task_index, m.name)
            .limit(limit)
        )
        with self._read() as db:
            return [Record.of(r) for r in db.execute(query)]

    def get_kv(self, key: str) -> str | None:
        with self._read() as db:
            value = db.execute(sa.select(kv.c.value).where(kv.c.key == key)).scalar()
        return None if value is None else str(value)

    def set_kv(self, key: str, value: str) -> None:
        with self.tx() as db:
            _upsert(db, kv, {"key": key, "value": value})

    def set_kv_once(self, key: str, value: str) -> str:
        """Store `value` under `key` unless a value is there already; returns the value stored."""
        with self.tx() as db:
            _insert_ignore(db, kv, {"key": key, "value": value})
            return str(db.execute(sa.select(kv.c.value).where(kv.c.key == key)).scalar_one())


@contextmanager
def _unavailable_as_domain_error() -> Iterator[None]:
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        reason = database.driver_reason(exc)[:200]
        raise Unavailable(f"the state database cannot be reached now ({reason}); retry shortly") from exc


def _insert(db: sa.Connection, table: sa.Table) -> Any:
    """INSERT with ON CONFLICT (SQLite and PostgreSQL spell it alike)."""
    if db.dialect.name == "sqlite":
        return sqlite.insert(table)
    if db.dialect.name == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(f"no upsert for {db.dialect.name}")


def _insert_ignore(db: sa.Connection, table: sa.Table, values: dict[str, Any]) -> int:
    """Insert the row unless its key (or another unique column) is taken; returns rows inserted (0 or 1)."""
    return db.execute(_insert(db, table).values(values).on_conflict_do_nothing()).rowcount


def _upsert(db: sa.Connection, table: sa.Table, values: dict[str, Any]) -> None:
    """Insert the row, or replace the values of the row with its primary key."""
    keys = [c.name for c in table.primary_key.columns]
    stmt = _insert(db, table).values(values)
    others = {name: stmt.excluded[name] for name in values if name not in keys}
    db.execute(stmt.on_conflict_do_update(index_elements=keys, set_=others))


def _release(db: sa.Connection, which: sa.ColumnElement[bool]) -> tuple[int, int]:
    """Release the claims on the jobs `which` picks: a running one goes back to the queue (it was never
    half-applied), a personalising one keeps its published G. Returns (re-queued, released)."""
    j = jobs.c
    running = jobs.update().where(j.state == JobState.RUNNING.value, which)
    requeued = db.execute(running.values(state=JobState.QUEUED.value, started=0, worker="", lease_until=0))
    personalising = jobs.update().where(j.state == JobState.PERSONALIZING.value, which)
    released = db.execute(personalising.values(worker="", lease_until=0))
    return int(requeued.rowcount), int(released.rowcount)


def _lock_head(db: sa.Connection, scope: str, client_id: str) -> None:
    """Serialise new versions of one head series for the rest of the transaction.

    On SQLite every write transaction holds the database's write lock already (BEGIN IMMEDIATE). On
    PostgreSQL two transactions (a job's publication and `fcl-server rollback` in another process)
    would both read the same highest version and one would fail on the primary key: this advisory lock
    makes the second wait and then read the first one's version.
    """
    if db.dialect.name == "postgresql":
        key = sa.func.hashtext(f"{scope}/{client_id}")  # int4, as the two-key form wants
        db.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.cast(HEAD_LOCK, sa.Integer), key)))


def _bank_of(db: sa.Connection, version: int) -> str | None:
    """The statistics bank G's version `version` was fitted with: its blob, "" for an empty bank (the job
    recorded none), None when unknown (a version made before jobs recorded their bank)."""
    h = heads.c
    seen: set[int] = set()
    while version not in seen:  # a rollback's bank is that of the version it republished
        seen.add(version)
        row = db.execute(
            sa.select(h.job_id, h.rollback_of).where(
                h.scope == GLOBAL, h.client_id == "", h.version == version
            )
        ).first()
        if row is None:
            return None
        if row.rollback_of:
            version = int(row.rollback_of)
            continue
        job = db.execute(
            sa.select(jobs.c.bank_blob, jobs.c.global_version, jobs.c.worker).where(
                jobs.c.job_id == row.job_id
            )
        ).first()
        if job is None or int(job.global_version) != version:
            return None
        if not job.bank_blob and not job.worker:  # run before revision 0003 recorded workers and banks
            return None
        return str(job.bank_blob)
    return None


def _next_version(db: sa.Connection, scope: str, client_id: str) -> int:
    top = db.execute(
        sa.select(sa.func.max(heads.c.version)).where(heads.c.scope == scope, heads.c.client_id == client_id)
    ).scalar()
    return int(top or 0) + 1


def _job(row: sa.RowMapping) -> Job:
    return Job(
        job_id=int(row["job_id"]),
        client_id=row["client_id"],
        upload_id=row["upload_id"],
        task_key=row["task_key"],
        task_index=int(row["task_index"]),
        blob=row["blob"],
        state=JobState(row["state"]),
        message=row["message"],
        created=float(row["created"]),
        started=float(row["started"]),
        finished=float(row["finished"]),
        global_version=int(row["global_version"]),
        personal_version=int(row["personal_version"]),
        worker=str(row["worker"]),
        attempts=int(row["attempts"]),
        bank_blob=str(row["bank_blob"]),
    )
