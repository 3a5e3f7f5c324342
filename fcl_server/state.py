"""The server's durable state in one SQLite database (WAL): tokens, clients, labels, uploads, jobs, heads."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
  token_hash TEXT PRIMARY KEY, principal TEXT NOT NULL, is_admin INTEGER NOT NULL,
  created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS clients (
  client_id TEXT PRIMARY KEY, created REAL NOT NULL, last_seen REAL NOT NULL DEFAULT 0,
  fm_digest TEXT NOT NULL DEFAULT '', model_spec TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS labels (name TEXT PRIMARY KEY, id INTEGER UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (
  upload_id TEXT NOT NULL, client_id TEXT NOT NULL, task_key TEXT NOT NULL, task_index INTEGER NOT NULL,
  size INTEGER NOT NULL, sha256 TEXT NOT NULL, received REAL NOT NULL, job_id INTEGER NOT NULL,
  PRIMARY KEY (client_id, upload_id));
CREATE TABLE IF NOT EXISTS jobs (
  job_id INTEGER PRIMARY KEY AUTOINCREMENT, client_id TEXT NOT NULL, upload_id TEXT NOT NULL,
  task_key TEXT NOT NULL, task_index INTEGER NOT NULL, blob TEXT NOT NULL, state TEXT NOT NULL,
  message TEXT NOT NULL DEFAULT '', created REAL NOT NULL, started REAL NOT NULL DEFAULT 0,
  finished REAL NOT NULL DEFAULT 0, global_version INTEGER NOT NULL DEFAULT 0,
  personal_version INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, job_id);
CREATE TABLE IF NOT EXISTS heads (
  scope TEXT NOT NULL, client_id TEXT NOT NULL, version INTEGER NOT NULL, blob TEXT NOT NULL,
  job_id INTEGER NOT NULL, num_labels INTEGER NOT NULL, created REAL NOT NULL,
  PRIMARY KEY (scope, client_id, version));
CREATE TABLE IF NOT EXISTS metrics (
  client_id TEXT NOT NULL, task_key TEXT NOT NULL, task_index INTEGER NOT NULL, name TEXT NOT NULL,
  value REAL NOT NULL, reported REAL NOT NULL, PRIMARY KEY (client_id, task_index, name));
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS upload_reservations (
  client_id TEXT NOT NULL, upload_id TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
  reserved REAL NOT NULL, PRIMARY KEY (client_id, upload_id));
"""

GLOBAL = "global"
PERSONAL = "personal"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.SUPERSEDED)


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


@dataclass(frozen=True)
class HeadVersion:
    scope: str
    client_id: str
    version: int
    blob: str
    job_id: int
    num_labels: int
    created: float


def hash_token(token: str) -> str:
    # tokens are 256-bit random strings, so one sha256 is enough (no password stretching needed)
    return hashlib.sha256(token.encode()).hexdigest()


class State:
    """Thread-safe access to the database; each method is one transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- tokens and clients -------------------------------------------------------------------
    def add_token(self, token: str, principal: str, is_admin: bool) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO tokens(token_hash, principal, is_admin, created) VALUES (?,?,?,?)",
                (hash_token(token), principal, int(is_admin), time.time()),
            )

    def revoke_tokens(self, principal: str) -> int:
        with self.tx() as db:
            return db.execute(
                "UPDATE tokens SET revoked=1 WHERE principal=? AND revoked=0", (principal,)
            ).rowcount

    def principal_for(self, token: str) -> Principal | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT principal, is_admin FROM tokens WHERE token_hash=? AND revoked=0",
                (hash_token(token),),
            ).fetchone()
        return Principal(row["principal"], bool(row["is_admin"])) if row else None

    def touch_client(
        self, client_id: str, fm_digest: str | None = None, model_spec: str | None = None
    ) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO clients(client_id, created) VALUES (?,?)", (client_id, now))
            db.execute("UPDATE clients SET last_seen=? WHERE client_id=?", (now, client_id))
            if fm_digest is not None:
                db.execute("UPDATE clients SET fm_digest=? WHERE client_id=?", (fm_digest, client_id))
            if model_spec is not None:
                db.execute("UPDATE clients SET model_spec=? WHERE client_id=?", (model_spec, client_id))

    def clients(self) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(
                "SELECT c.client_id, c.last_seen,"
                " (SELECT COUNT(*) FROM uploads u WHERE u.client_id=c.client_id)"
                " AS uploads FROM clients c ORDER BY c.client_id"
            ).fetchall()

    # -- uploads and jobs ---------------------------------------------------------------------
    def find_upload(self, client_id: str, upload_id: str) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(
                "SELECT * FROM uploads WHERE client_id=? AND upload_id=?", (client_id, upload_id)
            ).fetchone()

    def reserve_upload(
        self, client_id: str, upload_id: str, size: int, sha256: str, stale_before: float
    ) -> tuple[int, str] | bool:
        """Bind an unfinished upload id to the package (size, sha256) its header announced.

        Returns the (size, sha256) the id is bound to when those are other bytes; else whether this
        call made the binding (False: it renewed one for the same bytes).
        A binding not renewed since `stale_before` (an abandoned upload) gives way; those of the
        client are dropped here, so abandoned ids do not pile up.
        """
        with self.tx() as db:
            db.execute(
                "DELETE FROM upload_reservations WHERE client_id=? AND reserved<?", (client_id, stale_before)
            )
            row = db.execute(
                "SELECT size, sha256 FROM upload_reservations WHERE client_id=? AND upload_id=?",
                (client_id, upload_id),
            ).fetchone()
            if row is not None and (int(row["size"]), str(row["sha256"])) != (size, sha256):
                return int(row["size"]), str(row["sha256"])
            db.execute(
                "INSERT OR REPLACE INTO upload_reservations VALUES (?,?,?,?,?)",
                (client_id, upload_id, size, sha256, time.time()),
            )
            return row is None

    def release_upload_id(self, client_id: str, upload_id: str) -> None:
        """Drop an unfinished upload's binding (nothing of it is held, so nothing can resume)."""
        with self.tx() as db:
            db.execute(
                "DELETE FROM upload_reservations WHERE client_id=? AND upload_id=?", (client_id, upload_id)
            )

    def add_upload_and_job(
        self, client_id: str, upload_id: str, task_key: str, task_index: int, size: int, sha256: str
    ) -> tuple[int, bool]:
        """Record an accepted upload and queue its job, and touch the client; returns (job_id, duplicate).

        One transaction, so one durable commit (an fsync) per upload. The upload id's reservation
        ends here: from now on the uploads row binds it.
        """
        now = time.time()
        with self.tx() as db:
            db.execute(
                "DELETE FROM upload_reservations WHERE client_id=? AND upload_id=?", (client_id, upload_id)
            )
            db.execute("INSERT OR IGNORE INTO clients(client_id, created) VALUES (?,?)", (client_id, now))
            db.execute("UPDATE clients SET last_seen=? WHERE client_id=?", (now, client_id))
            row = db.execute(
                "SELECT job_id FROM uploads WHERE client_id=? AND upload_id=?", (client_id, upload_id)
            ).fetchone()
            if row:
                return int(row["job_id"]), True
            cur = db.execute(
                "INSERT INTO jobs(client_id, upload_id, task_key, task_index, blob, state, created)"
                " VALUES (?,?,?,?,?,?,?)",
                (client_id, upload_id, task_key, task_index, sha256, JobState.QUEUED.value, now),
            )
            job_id = int(cur.lastrowid or 0)
            db.execute(
                "INSERT INTO uploads VALUES (?,?,?,?,?,?,?,?)",
                (upload_id, client_id, task_key, task_index, size, sha256, now, job_id),
            )
            return job_id, False

    def job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, limit: int = 100) -> list[Job]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM jobs ORDER BY job_id DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def queue_position(self, job_id: int) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued','running') AND job_id < ?", (job_id,)
            ).fetchone()
        return int(row["n"])

    def queue_depth(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM jobs WHERE state='queued'").fetchone()[0])

    def claim_next_job(self) -> Job | None:
        """Oldest queued job, now running; a client's older queued jobs are superseded by its newest."""
        now = time.time()
        with self.tx() as db:
            while True:
                row = db.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY job_id LIMIT 1").fetchone()
                if row is None:
                    return None
                newer = db.execute(
                    "SELECT MAX(job_id) FROM jobs WHERE state='queued' AND client_id=? AND job_id>?",
                    (row["client_id"], row["job_id"]),
                ).fetchone()[0]
                if newer is None:
                    break
                db.execute(
                    "UPDATE jobs SET state='superseded', message=?, finished=? WHERE job_id=?",
                    (f"superseded by job {newer} of the same client", now, row["job_id"]),
                )
            db.execute(
                "UPDATE jobs SET state='running', started=?, attempts=attempts+1 WHERE job_id=?",
                (now, row["job_id"]),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE job_id=?", (row["job_id"],)).fetchone())

    def requeue_running(self) -> int:
        """After a crash: jobs left running go back to the queue (they were never half-applied)."""
        with self.tx() as db:
            return db.execute("UPDATE jobs SET state='queued', started=0 WHERE state='running'").rowcount

    def requeue_job(self, job_id: int) -> None:
        """Put a job that was interrupted (not failed) back at its place in the queue."""
        with self.tx() as db:
            db.execute(
                "UPDATE jobs SET state='queued', started=0 WHERE job_id=? AND state='running'", (job_id,)
            )

    def fail_job(self, job_id: int, message: str) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE jobs SET state='failed', message=?, finished=? WHERE job_id=?",
                (message[:2000], time.time(), job_id),
            )

    def complete_job(
        self,
        job: Job,
        global_blob: str,
        personal_blob: str,
        num_labels: int,
        new_labels: list[str],
        bank_blob: str | None,
    ) -> tuple[int, int]:
        """Atomically publish the new heads, labels and statistics bank, and mark the job done."""
        now = time.time()
        with self.tx() as db:
            gv = _next_version(db, GLOBAL, "")
            pv = _next_version(db, PERSONAL, job.client_id)
            db.execute(
                "INSERT INTO heads VALUES (?,?,?,?,?,?,?)",
                (GLOBAL, "", gv, global_blob, job.job_id, num_labels, now),
            )
            db.execute(
                "INSERT INTO heads VALUES (?,?,?,?,?,?,?)",
                (PERSONAL, job.client_id, pv, personal_blob, job.job_id, num_labels, now),
            )
            next_id = int(db.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM labels").fetchone()[0])
            for name in new_labels:
                if db.execute("INSERT OR IGNORE INTO labels VALUES (?,?)", (name, next_id)).rowcount:
                    next_id += 1
            if bank_blob is not None:
                db.execute("INSERT OR REPLACE INTO kv VALUES ('stats_bank', ?)", (bank_blob,))
            db.execute(
                "UPDATE jobs SET state='done', message='', finished=?, global_version=?, personal_version=?"
                " WHERE job_id=?",
                (now, gv, pv, job.job_id),
            )
            return gv, pv

    # -- heads, labels, metrics, kv -------------------------------------------------------------
    def head(self, scope: str, client_id: str, version: int = 0) -> HeadVersion | None:
        with self._lock:
            if version:
                row = self._conn.execute(
                    "SELECT * FROM heads WHERE scope=? AND client_id=? AND version=?",
                    (scope, client_id, version),
                ).fetchone()
            else:
                row = self._conn.execute(
                    "SELECT * FROM heads WHERE scope=? AND client_id=? ORDER BY version DESC LIMIT 1",
                    (scope, client_id),
                ).fetchone()
        return HeadVersion(**dict(row)) if row else None

    def label_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0])

    def client_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM clients").fetchone()[0])

    def head_summary(self) -> dict[str, tuple[int, int]]:
        """Per scope: (head versions published, highest version number) — for the metrics endpoint."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT scope, COUNT(*), MAX(version) FROM heads GROUP BY scope"
            ).fetchall()
        return {row[0]: (int(row[1]), int(row[2])) for row in rows}

    def put_metrics(self, client_id: str, task_key: str, task_index: int, values: dict[str, float]) -> int:
        now = time.time()
        with self.tx() as db:
            for name, value in values.items():
                db.execute(
                    "INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?,?)",
                    (client_id, task_key, task_index, name, value, now),
                )
        return len(values)

    def last_metrics(self, client_id: str) -> dict[str, float]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, value FROM metrics WHERE client_id=? AND task_index="
                "(SELECT MAX(task_index) FROM metrics WHERE client_id=?)",
                (client_id, client_id),
            ).fetchall()
        return {r["name"]: float(r["value"]) for r in rows}

    def metric_history(self, limit: int = 20_000) -> list[sqlite3.Row]:
        """Every reported metric (client_id, task_key, task_index, name, value, reported), by client, task."""
        with self._lock:
            return self._conn.execute(
                "SELECT client_id, task_key, task_index, name, value, reported FROM metrics"
                " ORDER BY client_id, task_index, name LIMIT ?",
                (limit,),
            ).fetchall()

    def get_kv(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return str(row["value"]) if row else None

    def set_kv(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO kv VALUES (?,?)", (key, value))


def _next_version(db: sqlite3.Connection, scope: str, client_id: str) -> int:
    row = db.execute(
        "SELECT MAX(version) FROM heads WHERE scope=? AND client_id=?", (scope, client_id)
    ).fetchone()
    return int(row[0] or 0) + 1


def _job(row: sqlite3.Row) -> Job:
    return Job(
        job_id=int(row["job_id"]),
        client_id=row["client_id"],
        upload_id=row["upload_id"],
        task_key=row["task_key"],
        task_index=int(row["task_index"]),
        blob=row["blob"],
        state=JobState(row["state"]),
        message=row["message"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        global_version=int(row["global_version"]),
        personal_version=int(row["personal_version"]),
    )
