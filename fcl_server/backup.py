"""`fcl-server backup` / `restore`: a consistent online copy of the database and the blobs it references.

The database is copied first, as one snapshot, while servers keep running: SQLite through its backup
API (one step, under one read transaction), PostgreSQL by pg_dump on a snapshot that this process
exports and keeps open, so the blob list is read from exactly the state that was dumped. Then every
blob that snapshot references is hard-linked (same filesystem; blobs are never modified in place) or
copied, and its sha256 is checked. Blobs written after the snapshot are not needed by it; blobs it
references were written before it (a row names a blob only once the blob is in the store), so none
can be missing unless `fcl-server gc` deleted it meanwhile, which the backup reports.

Layout of a backup directory: manifest.json (written last: a directory without it is incomplete),
state.sqlite3 or database.dump (pg_dump's custom format), blobs/XX/YYYY... (the store's own layout).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from psycopg.conninfo import make_conninfo

from common import __version__
from common.fm import file_sha256
from fcl_server import database, inventory
from fcl_server.blobs import MARK, BlobStore
from fcl_server.schema import kv
from fcl_server.state import State

FORMAT = "fcl-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SQLITE_FILE = "state.sqlite3"
PG_DUMP_FILE = "database.dump"


class BackupError(RuntimeError):
    """The backup or restore cannot be done as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Tools:
    """PostgreSQL's client programs (their major version must be at least the server's)."""

    pg_dump: str = "pg_dump"
    pg_restore: str = "pg_restore"


def check_empty_target(path: Path, what: str) -> None:
    """Backups and restores go into a new or empty directory, never over existing files."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BackupError(
            f"{what} {path} is not empty: give a new (or empty) directory; move or delete the old one "
            "first if you mean to replace it"
        )


# -- backup ------------------------------------------------------------------------------------------
def backup(
    state: State,
    blobs: BlobStore,
    dest: Path,
    copy: bool = False,
    allow_missing: bool = False,
    tools: Tools = Tools(),
) -> dict[str, Any]:
    """Back up the database behind `state` and the blobs it references into `dest`; returns the manifest."""
    check_empty_target(dest, "backup destination")
    created_dest = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return _backup(state, blobs, dest, copy, allow_missing, tools)
    except BaseException:
        if created_dest:  # an incomplete backup is not left behind to be mistaken for one
            shutil.rmtree(dest, ignore_errors=True)
        raise


def _backup(
    state: State, blobs: BlobStore, dest: Path, copy: bool, allow_missing: bool, tools: Tools
) -> dict[str, Any]:
    started = time.time()
    if state.dialect == "sqlite":
        db_file = dest / SQLITE_FILE
        _sqlite_snapshot(state, db_file)
        engine = sa.create_engine(database.sqlite_url(db_file))
        try:
            with engine.connect() as conn:
                facts = _facts(conn)
        finally:
            engine.dispose()
    else:
        db_file = dest / PG_DUMP_FILE
        with _pg_snapshot(state) as (conn, snapshot):
            _pg_dump(state.engine.url, snapshot, db_file, tools.pg_dump)
            facts = _facts(conn)
    snapshot_s = time.time() - started

    items: list[dict[str, Any]] = []
    gone: list[tuple[str, set[str]]] = []
    linked = copied = 0
    for digest, kinds in sorted(facts.refs.items()):
        needed = any(not k.startswith("kv:") for k in kinds)  # kv values shaped like digests may be no blob
        source = blobs.path(digest)
        if not source.exists():
            if needed and digest not in facts.collected:
                gone.append((digest, kinds))
            continue
        target = dest / "blobs" / digest[:2] / digest[2:]
        if _place(source, target, copy):
            linked += 1
        else:
            copied += 1
        if file_sha256(target) != digest:
            raise BackupError(
                f"blob {digest} ({', '.join(sorted(kinds))}) in {blobs.root} does not match its sha256: the "
                "store's copy is damaged. The backup was not written; restore that blob from an older backup"
            )
        items.append({"digest": digest, "size": target.stat().st_size, "kinds": sorted(kinds)})
    if gone:
        live = state.collected({d for d, _ in gone})
        if live:
            raise BackupError(
                f"{len(live)} blob(s) the snapshot references were deleted by an `fcl-server gc` that ran "
                "during the backup; nothing was written: run the backup again"
            )
        if not allow_missing:
            listed = "; ".join(f"{d} ({', '.join(sorted(k))})" for d, k in gone[:5])
            raise BackupError(
                f"{len(gone)} blob(s) the database references are missing from {blobs.root} (and not "
                f"recorded as deleted by gc): {listed}. Check --blob-dir; pass --allow-missing to back "
                "up the rest and list these in the manifest"
            )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fcl_version": __version__,
        "created": started,
        "snapshot_s": round(snapshot_s, 3),
        "schema_revision": facts.revision,
        "database": {
            "backend": state.dialect,
            "file": db_file.name,
            "size": db_file.stat().st_size,
            "sha256": file_sha256(db_file),
        },
        "blob_dir_token": facts.blob_dir_token,
        "rows": facts.rows,
        "jobs": facts.jobs,
        "heads": facts.heads,
        "blobs": {
            "count": len(items),
            "bytes": sum(int(i["size"]) for i in items),
            "linked": linked,
            "copied": copied,
            "collected": len(facts.collected & facts.refs.keys()),
            "missing": [d for d, _ in gone],
        },
        "blob_list": items,
        "took_s": round(time.time() - started, 3),
    }
    _write_json(dest / MANIFEST, manifest)
    return manifest


@dataclass
class _Facts:
    refs: dict[str, set[str]]
    collected: set[str]
    revision: str | None
    rows: dict[str, int]
    jobs: dict[str, int]
    heads: dict[str, int]
    blob_dir_token: str | None


def _facts(conn: sa.Connection) -> _Facts:
    return _Facts(
        refs=inventory.referenced(conn),
        collected=inventory.collected(conn),
        revision=database.read_revision(conn).revision,
        rows=inventory.row_counts(conn),
        jobs=inventory.job_states(conn),
        heads=inventory.live_heads(conn),
        blob_dir_token=conn.execute(sa.select(kv.c.value).where(kv.c.key == "blob_dir_token")).scalar(),
    )


def _sqlite_snapshot(state: State, target: Path) -> None:
    """Copy the live SQLite database with its backup API, in one step (one consistent snapshot; in WAL
    mode writers go on meanwhile), then make the copy a self-contained file and check it."""
    raw = state.engine.raw_connection()
    try:
        source = raw.driver_connection
        assert isinstance(source, sqlite3.Connection)
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)  # pages=-1: everything in one step
            copy.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
            check = copy.execute("PRAGMA integrity_check").fetchone()
        finally:
            copy.close()
    finally:
        raw.close()
    if check is None or check[0] != "ok":
        raise BackupError(f"the SQLite copy fails its integrity check: {check}; the backup was not written")


@contextlib.contextmanager
def _pg_snapshot(state: State) -> Iterator[tuple[sa.Connection, str]]:
    """A REPEATABLE READ transaction and its exported snapshot, open until the block ends."""
    with state.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            snapshot = str(conn.execute(sa.text("SELECT pg_export_snapshot()")).scalar_one())
            yield conn, snapshot


def _libpq(url: sa.URL) -> tuple[str, dict[str, str]]:
    """A libpq connection string without the password, and the environment that carries it (argv is
    visible to every user in `ps`)."""
    query = {k: v if isinstance(v, str) else v[-1] for k, v in url.query.items()}
    info = make_conninfo(host=url.host, port=url.port, user=url.username, dbname=url.database, **query)
    env = {**os.environ}
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    return info, env


def _run_pg(cmd: list[str], env: dict[str, str], what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        raise BackupError(
            f"{cmd[0]} was not found: install PostgreSQL's client programs (at least the server's major "
            f"version), or name it with --{what.replace('_', '-')} PATH"
        ) from None
    if done.returncode != 0:
        raise BackupError(f"{Path(cmd[0]).name} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")


def _pg_dump(url: sa.URL, snapshot: str, out: Path, pg_dump: str) -> None:
    info, env = _libpq(url)
    _run_pg(
        [pg_dump, "--format=custom", f"--snapshot={snapshot}", f"--file={out}", f"--dbname={info}"],
        env,
        "pg_dump",
    )


def _place(source: Path, target: Path, copy: bool) -> bool:
    """Hard-link `source` at `target` when allowed and possible (True), else copy it (False)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.link(source, target)
            return True
        except OSError:  # another filesystem (EXDEV), or links not allowed there: copy
            pass
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(source, tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(target)
    return False


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(value, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


# -- restore -----------------------------------------------------------------------------------------
def read_manifest(src: Path) -> dict[str, Any]:
    path = src / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(
            f"{src} has no {MANIFEST}: it is not an fcl backup, or an incomplete one (the manifest is "
            "written last)"
        ) from None
    except ValueError as exc:
        raise BackupError(f"{path} is not valid JSON ({exc}): the backup is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is not an fcl backup manifest (format {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BackupError(
            f"{src} is backup format version {version}; this fcl-server reads version {FORMAT_VERSION}: "
            "restore it with the fcl version that wrote it"
        )
    return manifest


def verify(src: Path, manifest: dict[str, Any]) -> None:
    """Check the database file and every blob of the backup against the manifest's sizes and hashes."""
    db = manifest["database"]
    db_file = src / db["file"]
    if not db_file.exists() or db_file.stat().st_size != db["size"] or file_sha256(db_file) != db["sha256"]:
        raise BackupError(f"{db_file} is missing or does not match the manifest's size and sha256: damaged")
    bad = []
    for item in manifest["blob_list"]:
        path = src / "blobs" / item["digest"][:2] / item["digest"][2:]
        if not path.exists() or path.stat().st_size != item["size"] or file_sha256(path) != item["digest"]:
            bad.append(item["digest"])
    if bad:
        raise BackupError(f"{len(bad)} blob(s) of the backup are missing or damaged, e.g. {bad[0]}")


def restore(
    src: Path,
    state_dir: Path,
    database_url: str | None = None,
    blob_dir: Path | None = None,
    copy: bool = False,
    tools: Tools = Tools(),
) -> dict[str, Any]:
    """Restore a backup into a new state dir (and a new, empty PostgreSQL database for a PostgreSQL
    backup); returns a summary. Nothing is written before every check passed."""
    manifest = read_manifest(src)
    backend = manifest["database"]["backend"]
    if backend == "sqlite" and database_url:
        raise BackupError(
            "this is a backup of a SQLite database: it restores into --state-dir only (drop --database); "
            "moving state from SQLite to PostgreSQL is not what restore does"
        )
    if backend == "postgresql" and not database_url:
        raise BackupError(
            "this is a backup of a PostgreSQL database: give --database URL of a new, empty database to "
            "restore it into (createdb NAME first)"
        )
    check_empty_target(state_dir, "state dir")
    blob_root = (blob_dir or state_dir) / "blobs"
    if blob_dir is not None:
        check_empty_target(blob_dir, "blob dir")
    verify(src, manifest)
    if backend == "postgresql":
        assert database_url is not None
        _check_empty_database(database_url)

    state_dir.mkdir(parents=True, exist_ok=True)
    if backend == "sqlite":
        url = database.sqlite_url(state_dir / SQLITE_FILE)
        _place(src / SQLITE_FILE, state_dir / SQLITE_FILE, copy=True)  # the live file is written: a copy
    else:
        assert database_url is not None
        url = database_url
        info, env = _libpq(sa.make_url(url))
        _run_pg(
            [tools.pg_restore, "--single-transaction", "--exit-on-error", "--no-owner", "--no-privileges",
             f"--dbname={info}", str(src / PG_DUMP_FILE)],
            env,
            "pg_restore",
        )  # fmt: skip
    linked = 0
    for item in manifest["blob_list"]:
        digest = item["digest"]
        target = blob_root / digest[:2] / digest[2:]
        was_linked = _place(src / "blobs" / digest[:2] / digest[2:], target, copy)
        linked += was_linked
        if not was_linked and file_sha256(target) != digest:  # a copy is checked again
            raise BackupError(f"the copy of blob {digest} in {blob_root} does not match its sha256")
    blob_root.mkdir(parents=True, exist_ok=True)
    token = manifest.get("blob_dir_token")
    if token:  # the restored database names this blob dir: servers refuse a dir without its token
        (blob_root / MARK).write_text(token)
    rows = _restored_rows(url)
    if rows != manifest["rows"]:
        raise BackupError(
            f"the restored database's row counts {rows} differ from the backup's {manifest['rows']}"
        )
    return {
        "state_dir": str(state_dir),
        "database": database.mask(url),
        "blob_dir": str(blob_root),
        "schema_revision": manifest["schema_revision"],
        "rows": rows,
        "heads": manifest["heads"],
        "jobs": manifest["jobs"],
        "blobs": {"count": len(manifest["blob_list"]), "linked": linked},
        "backup_created": manifest["created"],
    }


def _check_empty_database(url: str) -> None:
    engine = database.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()
    if tables:
        raise BackupError(
            f"{database.mask(url)} is not empty (tables {', '.join(sorted(tables)[:5])}...): restore into a "
            "new database (createdb NAME), never over one in use"
        )


def _restored_rows(url: str) -> dict[str, int]:
    engine = database.create_engine(url)
    try:
        with engine.connect() as conn:
            return inventory.row_counts(conn)
    finally:
        engine.dispose()
