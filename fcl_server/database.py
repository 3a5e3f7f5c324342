"""Where the state lives and which schema revision it is at: engines, URLs, Alembic upgrades.

The default is one SQLite file in the state dir (`state.sqlite3`, WAL); `--database URL` names another,
e.g. `postgresql+psycopg://USER:PASSWORD@HOST:5432/DB` (psycopg 3; a plain `postgresql://` means the
same). One schema (fcl_server.schema) and one migration history (fcl_server/migrations) serve both.
A database URL is only ever shown through `mask()`: its password never reaches a log or an error.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy.exc import ArgumentError

SQLITE_NAME = "state.sqlite3"
BUSY_TIMEOUT_S = 30
MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"  # the revision of a 0.1.0 database, which has no alembic_version table
# 0.1.0's tables and their columns, frozen here: what a database without alembic_version must be exactly
# to be stamped at BASELINE (anything else is not a state database this code knows)
V010_TABLES: dict[str, list[str]] = {
    "tokens": ["token_hash", "principal", "is_admin", "created", "revoked"],
    "clients": ["client_id", "created", "last_seen", "fm_digest", "model_spec"],
    "labels": ["name", "id"],
    "uploads": ["upload_id", "client_id", "task_key", "task_index", "size", "sha256", "received", "job_id"],
    "jobs": [
        "job_id",
        "client_id",
        "upload_id",
        "task_key",
        "task_index",
        "blob",
        "state",
        "message",
        "created",
        "started",
        "finished",
        "global_version",
        "personal_version",
        "attempts",
    ],
    "heads": ["scope", "client_id", "version", "blob", "job_id", "num_labels", "created"],
    "metrics": ["client_id", "task_key", "task_index", "name", "value", "reported"],
    "kv": ["key", "value"],
    "upload_reservations": ["client_id", "upload_id", "size", "sha256", "reserved"],
}
_PG_UPGRADE_LOCK = 0x0FC1_0013  # pg_advisory_xact_lock key: one upgrade at a time per database


class DatabaseError(RuntimeError):
    """The database cannot be used as it is; the message says why and what to run."""


def database_url(state_dir: Path | None, database: str | None = None) -> str:
    """`database` when given, else the SQLite file in `state_dir`."""
    if database:
        return database
    if state_dir is None:
        raise ValueError("no database: pass --state-dir (SQLite in it) or --database URL")
    return sqlite_url(state_dir / SQLITE_NAME)


def sqlite_url(path: Path) -> str:
    return sa.URL.create("sqlite", database=str(path)).render_as_string()


def mask(url: str | sa.URL) -> str:
    """The URL with its password as ***, for logs and messages."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(a database URL that does not parse)"


def _parse(url: str) -> sa.URL:
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise DatabaseError(
            f"{mask(url)}: use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):  # psycopg 3 is the driver fcl installs
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def driver_reason(exc: BaseException) -> str:
    """The first line of the driver's own message for a database error (never the URL)."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def create_engine(url: str) -> sa.Engine:
    """An engine for `url`: SQLite (WAL, synchronous=FULL, 30 s busy timeout) or PostgreSQL (psycopg 3)."""
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file:"):
            raise DatabaseError(f"{mask(parsed)}: give SQLite a file path (sqlite:///PATH)")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed,
            connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False},
            pool_size=8,
            max_overflow=56,  # reads take a pooled connection each; gRPC serves 32 calls at once
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise DatabaseError(
                f"{mask(parsed)}: PostgreSQL is reached with psycopg 3 (postgresql+psycopg://)"
            )
        return sa.create_engine(parsed, pool_size=8, max_overflow=24, pool_pre_ping=True)
    raise DatabaseError(f"{mask(parsed)}: fcl stores its state in SQLite or PostgreSQL, not {backend}")


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # transactions are begun explicitly (_sqlite_begin), not by the sqlite3 module's own heuristics
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # a write takes the write lock at BEGIN, so it waits (busy timeout) instead of failing mid-way
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("fcl_write") else "BEGIN")


@contextmanager
def write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One transaction that writes: committed when the block ends, rolled back if it raises."""
    with engine.connect() as conn:
        conn.execution_options(fcl_write=True)
        with conn.begin():
            yield conn


# -- revisions ----------------------------------------------------------------------------------------
@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def head_revision() -> str:
    head = _scripts().get_current_head()
    assert head is not None
    return head


def known_revision(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


@dataclass(frozen=True)
class Revision:
    """Where a database stands: its revision (None: empty) and whether alembic_version records it."""

    revision: str | None
    stamped: bool
    head: str

    @property
    def at_head(self) -> bool:
        return self.stamped and self.revision == self.head

    @property
    def known(self) -> bool:
        return self.revision is None or known_revision(self.revision)

    def describe(self) -> str:
        if self.revision is None:
            return f"empty (no fcl tables; `fcl-server db upgrade` creates revision {self.head})"
        if not self.stamped:
            return f"{self.revision} (a 0.1.0 state database, not yet stamped; head is {self.head})"
        if self.at_head:
            return f"{self.revision} (head)"
        if not self.known:
            return f"{self.revision} (unknown to this fcl-server: written by a newer version?)"
        return f"{self.revision} (head is {self.head})"


def read_revision(conn: sa.Connection) -> Revision:
    stamped = MigrationContext.configure(conn).get_current_revision()
    if stamped is not None:
        return Revision(stamped, True, head_revision())
    return Revision(_baseline(conn), False, head_revision())


def _baseline(conn: sa.Connection) -> str | None:
    """BASELINE for a 0.1.0 database, None for one without fcl tables; else DatabaseError."""
    inspector = sa.inspect(conn)
    present = set(inspector.get_table_names()) & V010_TABLES.keys()
    if not present:
        return None
    problems = []
    for table, columns in V010_TABLES.items():
        if table not in present:
            problems.append(f"table {table} is missing")
            continue
        have = [c["name"] for c in inspector.get_columns(table)]
        if have != columns:
            problems.append(f"table {table} has columns {', '.join(have)} (0.1.0: {', '.join(columns)})")
    if problems:
        raise DatabaseError(
            f"{mask(conn.engine.url)} has fcl tables but no schema revision, and it is not a 0.1.0 state "
            f"database: {'; '.join(problems)}. Restore it from a backup or point fcl at another database"
        )
    return BASELINE


def _alembic(conn: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def current(engine: sa.Engine) -> Revision:
    with engine.connect() as conn, conn.begin():
        return read_revision(conn)


def upgrade(engine: sa.Engine, target: str = "head") -> tuple[Revision, Revision]:
    """Bring the database to the head revision (or `target`) in one transaction; returns (before, after).

    A 0.1.0 database (its tables, no alembic_version) is stamped at BASELINE first: nothing of it is
    rewritten, every row stays as it was."""
    with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":  # two servers starting at once: one upgrades, one waits
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_UPGRADE_LOCK})
        before = read_revision(conn)
        _check_known(engine, before)
        config = _alembic(conn)
        if before.revision is not None and not before.stamped:
            command.stamp(config, before.revision)
        command.upgrade(config, target)
        after = read_revision(conn)
    return before, after


def _check_known(engine: sa.Engine, revision: Revision) -> None:
    if not revision.known:
        raise DatabaseError(
            f"{mask(engine.url)} is at schema revision {revision.revision}, which this fcl-server does not "
            f"know (its newest is {revision.head}): a newer fcl-server upgraded it; run that version"
        )


def ensure_current(engine: sa.Engine, auto_upgrade: bool) -> Revision:
    """Check that the database is at the head revision; upgrade it first when `auto_upgrade`."""
    revision = current(engine)
    if revision.at_head:
        return revision
    _check_known(engine, revision)
    if auto_upgrade:
        return upgrade(engine)[1]
    run = "`fcl-server db upgrade --database URL` (this URL)"
    if revision.revision is None:
        raise DatabaseError(f"{mask(engine.url)} has no fcl schema yet: create it with {run}")
    raise DatabaseError(
        f"{mask(engine.url)} is at schema revision {revision.describe()}, this fcl-server needs "
        f"{revision.head}: back it up, then run {run}"
    )
