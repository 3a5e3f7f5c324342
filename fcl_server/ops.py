"""Operator commands of `fcl-server`: status, clients, jobs, heads (a table or JSON), rollback, gc, backup.

The views read the state directly (the database of --state-dir or --database), or ask a running server
over gRPC with an admin token (--server): GetStatus carries the FM, the live head versions, clients,
the newest jobs and the workers, but not a job's worker and attempts, nor the PERSONALIZING state (it
reads as running), nor the history of head versions; `heads` and `jobs --state personalizing` read
the database only. rollback, gc and backup change or copy state, and work on the database and blob
dir only (no RPC does any of that).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import wire_limits as wire
from fcl_server import backup as backups
from fcl_server import database
from fcl_server import gc as gcmod
from fcl_server.blobs import BlobStore
from fcl_server.state import GLOBAL, PERSONAL, HeadVersion, JobState, RollbackError, State

VIEWS = ("status", "clients", "jobs", "heads")
PB_STATES = {1: "queued", 2: "running", 3: "done", 4: "failed", 5: "superseded"}  # fcl.v1.JobState


class OpsError(ValueError):
    """An operator command that cannot run as given; the message says why and what to do."""


# -- flags ----------------------------------------------------------------------------------------------
def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def add_database_flags(parser: argparse.ArgumentParser, blobs: bool = False) -> None:
    parser.add_argument(
        "--state-dir", type=Path, default=_env_path("FCL_STATE_DIR"), help="state dir (env FCL_STATE_DIR)"
    )
    parser.add_argument(
        "--database",
        default=os.environ.get("FCL_DATABASE") or None,
        metavar="URL",
        help="database URL, e.g. postgresql+psycopg://USER:PASSWORD@HOST/DB (env FCL_DATABASE; "
        "default: SQLite in --state-dir)",
    )
    if blobs:
        parser.add_argument(
            "--blob-dir",
            type=Path,
            default=_env_path("FCL_BLOB_DIR"),
            help="the servers' --blob-dir, when they have one (env FCL_BLOB_DIR; default: --state-dir)",
        )


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("over gRPC instead of the database (an admin token)")
    group.add_argument("--server", metavar="HOST:PORT", help="ask this running server (GetStatus)")
    group.add_argument("--token-file", type=Path, help="file with an admin token (or env FCL_TOKEN)")
    group.add_argument("--token", help="the admin token itself (visible in ps; prefer --token-file)")
    group.add_argument("--tls-ca", type=Path, help="CA of the server's certificate (PEM)")
    group.add_argument("--tls-cert", type=Path, help="own certificate for mutual TLS (PEM)")
    group.add_argument("--tls-key", type=Path, help="own key for mutual TLS (PEM)")


def add_commands(sub: Any) -> None:
    """The operator subcommands, on `fcl-server`'s subparsers."""
    for name, text in (
        ("status", "the server at a glance: heads, queue, jobs by state, clients, workers"),
        ("clients", "every client: last seen, uploads, personalised head version, last metrics"),
    ):
        view = sub.add_parser(name, help=text, description=text)
        add_database_flags(view)
        add_server_flags(view)
        add_output_flag(view)
    jobs = sub.add_parser("jobs", help="the newest jobs, newest first", description="the newest jobs")
    add_database_flags(jobs)
    add_server_flags(jobs)
    add_output_flag(jobs)
    jobs.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in JobState],
        help="only jobs in this state (repeat for several)",
    )
    jobs.add_argument("--client", help="only this client's jobs")
    jobs.add_argument("--limit", type=int, default=50, help="jobs to list at most (default 50)")

    heads = sub.add_parser(
        "heads",
        help="every version of the global and personalised heads (the database only)",
        description="every head version, newest first: live, kept or collected by gc, and what a "
        "rollback republished",
    )
    add_database_flags(heads)
    add_server_flags(heads)  # refused with a reason: GetStatus has no version history
    add_output_flag(heads)
    heads.add_argument("--scope", choices=[GLOBAL, PERSONAL], help="only global or only personal heads")
    heads.add_argument("--client", help="only this client's personalised head")
    heads.add_argument("--limit", type=int, default=200, help="versions to list at most (default 200)")

    rollback = sub.add_parser(
        "rollback",
        help="publish an older head version again as a new version (history is never rewritten)",
        description="Publish version N of the global head (or of a client's personalised head) again, as "
        "the next version. The global head's statistics bank goes back to N's too. A job whose global "
        "step is running on the replaced version is dropped at publication and runs again on this one.",
    )
    add_database_flags(rollback, blobs=True)
    add_output_flag(rollback)
    rollback.add_argument(
        "--global-version", type=int, metavar="N", help="the global head's version to republish"
    )
    rollback.add_argument("--client", metavar="ID", help="whose personalised head (with --personal-version)")
    rollback.add_argument(
        "--personal-version", type=int, metavar="N", help="the client's version to republish"
    )

    gc = sub.add_parser(
        "gc",
        help="delete blobs of old head versions and finished jobs; prints what it freed",
        description="Delete the blobs of head versions and packages no longer needed: never one a "
        "queued or running job, a live head, the newest K versions of each head or a kv entry uses, nor "
        "one touched within the grace period (safe while servers and workers run, on a shared blob dir "
        "too). History rows stay; their blobs read as collected.",
    )
    add_database_flags(gc, blobs=True)
    add_output_flag(gc)
    gc.add_argument("--keep-versions", type=int, required=True, metavar="K", help="versions kept per head")
    gc.add_argument(
        "--grace-s",
        type=float,
        default=gcmod.DEFAULT_GRACE_S,
        help=f"never delete a blob written or touched this recently (default {gcmod.DEFAULT_GRACE_S:.0f})",
    )
    gc.add_argument("--dry-run", action="store_true", help="only say what would be freed")
    gc.add_argument(
        "--orphans",
        action="store_true",
        help="also delete blobs that no database row names (a head written by a worker that crashed "
        "before its commit, an upload whose commit failed), older than the grace period",
    )

    bk = sub.add_parser(
        "backup",
        help="consistent online backup of the database and the blobs it references",
        description="Back up the database (SQLite backup API, or pg_dump) and every blob its snapshot "
        "references, while servers run, into DEST (new or empty); writes DEST/manifest.json last.",
    )
    bk.add_argument("dest", type=Path, metavar="DEST")
    add_database_flags(bk, blobs=True)
    add_output_flag(bk)
    bk.add_argument("--copy", action="store_true", help="copy blobs even where a hard link would do")
    bk.add_argument(
        "--allow-missing",
        action="store_true",
        help="back up even when referenced blobs are missing (listed in the manifest)",
    )
    bk.add_argument("--pg-dump", default="pg_dump", metavar="PATH", help="pg_dump to run (PostgreSQL)")

    rs = sub.add_parser(
        "restore",
        help="restore a backup into a new state dir (and a new database for PostgreSQL)",
        description="Restore a backup made by `fcl-server backup` into a new or empty --state-dir (and, "
        "for a PostgreSQL backup, a new empty --database); then start `fcl-server serve` on it.",
    )
    rs.add_argument("src", type=Path, metavar="SRC")
    # no FCL_* defaults here: a restore names its target explicitly, never the live one by accident
    rs.add_argument("--state-dir", type=Path, required=True, help="new or empty state dir to restore into")
    rs.add_argument("--database", metavar="URL", help="new, empty PostgreSQL database (PostgreSQL backups)")
    rs.add_argument("--blob-dir", type=Path, help="new or empty blob dir (default: in --state-dir)")
    rs.add_argument("--copy", action="store_true", help="copy blobs even where a hard link would do")
    rs.add_argument("--pg-restore", default="pg_restore", metavar="PATH", help="pg_restore to run")
    add_output_flag(rs)


# -- opening the state -------------------------------------------------------------------------------------
def open_existing_state(state_dir: Path | None, url: str | None) -> State:
    """The state database as it is: never created, never migrated by an operator command."""
    if not url:
        if state_dir is None:
            raise OpsError("no database: pass --state-dir (SQLite in it) or --database URL")
        path = state_dir / database.SQLITE_NAME
        if not path.exists():
            raise OpsError(f"no state database at {path}: is --state-dir right (or give --database URL)?")
    return State(database.database_url(state_dir, url), upgrade=False)


def open_blobs(state: State, state_dir: Path | None, blob_dir: Path | None) -> BlobStore:
    """The servers' blob store, checked to be this database's (its token) without writing to it."""
    base = blob_dir or state_dir
    if base is None:
        raise OpsError("no blob dir: pass --blob-dir (as the servers have it) or --state-dir")
    root = base / "blobs"
    if not root.is_dir():
        raise OpsError(f"no blob store at {root}: give --blob-dir (or --state-dir) as the servers have it")
    store = BlobStore(root)
    try:
        store.check_mark(state.get_kv("blob_dir_token"))
    except BaseException:
        store.close()
        raise
    return store


# -- views -----------------------------------------------------------------------------------------------
def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


def _ago(ts: float, now: float) -> str:
    if not ts:
        return "never"
    s = max(0.0, now - ts)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(c) for c in headers], *[["-" if c is None or c == "" else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], int | float) for r in rows) and bool(rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


@dataclass
class Source:
    """Where a view reads from: the database (state) or a server's GetStatus (conn)."""

    state: State | None = None
    target: str = ""
    status: Callable[[int], Any] | None = None  # GetStatus(max_jobs) over gRPC


def open_source(args: argparse.Namespace) -> tuple[Source, Callable[[], None]]:
    if not args.server:
        if args.token or args.token_file or args.tls_ca or args.tls_cert or args.tls_key:
            raise OpsError(
                "--token, --token-file and --tls-* are for --server; without it the database is read"
            )
        state = open_existing_state(args.state_dir, args.database)
        return Source(state=state), state.close
    from common.tls import TLSFiles
    from fcl_client.connection import Connection
    from fcl_client.settings import resolve_token

    token = resolve_token(args.token, args.token_file, os.environ.get("FCL_TOKEN"))
    conn = Connection(
        args.server, token, timeout=30.0, retries=2, tls=TLSFiles(args.tls_cert, args.tls_key, args.tls_ca)
    )
    return Source(target=args.server, status=conn.status), conn.close


def view_status(src: Source) -> dict[str, Any]:
    now = time.time()
    if src.state is None:
        assert src.status is not None
        st = src.status(wire.MAX_STATUS_JOBS)
        counts: dict[str, int] = {}
        for j in st.jobs:
            counts[PB_STATES.get(j.state, "unknown")] = counts.get(PB_STATES.get(j.state, "unknown"), 0) + 1
        return {
            "source": f"server {src.target}",
            "server_version": st.server_version,
            "uptime_s": round(st.uptime_s, 1),
            "fm": {"name": st.foundation_model.name, "digest": st.foundation_model.digest},
            "global_head": {"version": st.global_version} if st.global_version else None,
            "labels": st.num_labels,
            "clients": len(st.clients),
            "personal_heads": sum(1 for c in st.clients if c.personal_version),
            "queue_depth": st.queue_depth,
            "jobs": counts,
            "jobs_counted": f"among the newest {len(st.jobs)}; personalizing reads as running",
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "job_id": w.job_id,
                    "heartbeat": w.heartbeat,
                    "seen": _ago(w.heartbeat, now),
                }
                for w in st.workers
            ],
        }
    state = src.state
    g = state.head(GLOBAL, "")
    with state.engine.connect() as conn:
        revision = database.read_revision(conn)
    clients = state.clients()
    personal = sum(1 for c in clients if state.head(PERSONAL, c["client_id"]) is not None)
    return {
        "source": f"database {state.url}",
        "schema_revision": revision.describe(),
        "global_head": None
        if g is None
        else {
            "version": g.version,
            "num_labels": g.num_labels,
            "created": g.created,
            "rollback_of": g.rollback_of,
        },
        "labels": state.label_count(),
        "clients": len(clients),
        "personal_heads": personal,
        "queue_depth": state.queue_depth(),
        "jobs": {s.value: n for s, n in state.job_counts().items()},
        "workers": [
            {
                "worker_id": w["worker_id"],
                "job_id": int(w["job_id"]),
                "heartbeat": float(w["heartbeat"]),
                "seen": _ago(float(w["heartbeat"]), now),
            }
            for w in state.workers()
        ],
    }


def render_status(view: dict[str, Any]) -> str:
    g = view["global_head"]
    head = "none yet"
    if g is not None:
        head = f"v{g['version']}"
        if "num_labels" in g:
            head += f", {g['num_labels']} labels, {_when(g['created'])}"
        if g.get("rollback_of"):
            head += f" (rollback to v{g['rollback_of']})"
    jobs = ", ".join(f"{n} {s}" for s, n in view["jobs"].items() if n) or "none"
    rows = [("source", view["source"])]
    if "schema_revision" in view:
        rows.append(("schema", view["schema_revision"]))
    if "server_version" in view:
        rows += [
            ("server", f"fcl {view['server_version']}, up {view['uptime_s']:.0f} s"),
            ("FM", f"{view['fm']['name']} {view['fm']['digest'][:12]}"),
        ]
    rows += [
        ("global head", head),
        ("labels", str(view["labels"])),
        ("clients", f"{view['clients']} ({view['personal_heads']} with a personalised head)"),
        ("queue", f"{view['queue_depth']} queued"),
        ("jobs", jobs + (f" ({view['jobs_counted']})" if "jobs_counted" in view else "")),
    ]
    workers = view["workers"]
    rows.append(
        (
            "workers",
            ", ".join(_worker(w) for w in workers) or "none heard from in the last hour",
        )
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _worker(w: dict[str, Any]) -> str:
    doing = f"job {w['job_id']}" if w["job_id"] else "idle"
    return f"{w['worker_id']} ({doing}, {w['seen']})"


def view_clients(src: Source) -> list[dict[str, Any]]:
    if src.state is None:
        assert src.status is not None
        st = src.status(1)
        return [
            {
                "client_id": c.client_id,
                "last_seen": c.last_seen,
                "uploads": c.uploads,
                "personal_version": c.personal_version,
                "last_metrics": dict(sorted(c.last_metrics.items())),
            }
            for c in st.clients
        ]
    state = src.state
    out = []
    for row in state.clients():
        head = state.head(PERSONAL, row["client_id"])
        out.append(
            {
                "client_id": row["client_id"],
                "last_seen": float(row["last_seen"]),
                "uploads": int(row["uploads"]),
                "personal_version": head.version if head else 0,
                "last_metrics": dict(sorted(state.last_metrics(row["client_id"]).items())),
            }
        )
    return out


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def render_clients(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no clients yet"
    return table(
        ["CLIENT", "LAST SEEN", "UPLOADS", "PERSONAL", "LAST METRICS"],
        [
            (
                r["client_id"],
                _when(r["last_seen"]),
                r["uploads"],
                f"v{r['personal_version']}" if r["personal_version"] else "",
                " ".join(f"{k}={_number(v)}" for k, v in r["last_metrics"].items()),
            )
            for r in rows
        ],
    )


def view_jobs(src: Source, states: list[str] | None, client: str | None, limit: int) -> list[dict[str, Any]]:
    if limit < 1:
        raise OpsError(f"--limit must be >= 1, not {limit}")
    now = time.time()
    if src.state is None:
        assert src.status is not None
        if states and JobState.PERSONALIZING.value in states:
            raise OpsError(
                "GetStatus reports a personalizing job as running: `jobs --state personalizing` reads the "
                "database only (run it with --state-dir / --database on the server's host)"
            )
        st = src.status(wire.MAX_STATUS_JOBS if states or client else min(limit, wire.MAX_STATUS_JOBS))
        out = []
        for j in st.jobs:
            name = PB_STATES.get(j.state, "unknown")
            if (states and name not in states) or (client and j.client_id != client):
                continue
            out.append(
                {
                    "job_id": j.job_id, "client_id": j.client_id, "task_key": j.task_key,
                    "task_index": j.task_index, "state": name, "global_version": j.global_version,
                    "personal_version": j.personal_version, "created": j.created, "finished": j.finished,
                    "duration_s": round(j.duration_s, 2), "message": j.message,
                }
            )  # fmt: skip
        return out[:limit]
    wanted = [JobState(s) for s in states] if states else None
    out = []
    for j in src.state.jobs(limit, wanted, client):
        end = j.finished or (now if j.state in (JobState.RUNNING, JobState.PERSONALIZING) else 0.0)
        out.append(
            {
                "job_id": j.job_id, "client_id": j.client_id, "task_key": j.task_key,
                "task_index": j.task_index, "state": j.state.value, "global_version": j.global_version,
                "personal_version": j.personal_version, "created": j.created, "finished": j.finished,
                "duration_s": round(end - j.started, 2) if j.started and end else 0.0,
                "message": j.message, "attempts": j.attempts, "worker": j.worker,
            }
        )  # fmt: skip
    return out


def render_jobs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs"
    direct = "attempts" in rows[0]
    headers = ["JOB", "CLIENT", "TASK", "STATE", "G", "P", "CREATED", "SECONDS"]
    headers += ["TRIES", "WORKER", "MESSAGE"] if direct else ["MESSAGE"]
    out = []
    for r in rows:
        row: list[object] = [
            r["job_id"], r["client_id"], r["task_key"], r["state"],
            f"v{r['global_version']}" if r["global_version"] else "",
            f"v{r['personal_version']}" if r["personal_version"] else "",
            _when(r["created"]), f"{r['duration_s']:.1f}" if r["duration_s"] else "",
        ]  # fmt: skip
        if direct:
            row += [r["attempts"], r["worker"]]
        row.append(r["message"][:60])
        out.append(row)
    return table(headers, out)


def view_heads(src: Source, scope: str | None, client: str | None, limit: int) -> list[dict[str, Any]]:
    if src.state is None:
        raise OpsError(
            "GetStatus carries only the live head versions, not their history: `heads` reads the database "
            "(--state-dir / --database on the server's host); `status --server` and `clients --server` "
            "show the live versions"
        )
    if limit < 1:
        raise OpsError(f"--limit must be >= 1, not {limit}")
    if client is not None and scope == GLOBAL:
        raise OpsError("--client names a personalised head: drop --scope global, or --client")
    history = src.state.head_history(PERSONAL if client else scope, client, limit)
    collected = src.state.collected({h.blob for h in history})
    live: dict[tuple[str, str], int] = {}
    for h in history:
        live[(h.scope, h.client_id)] = max(live.get((h.scope, h.client_id), 0), h.version)
    return [
        {
            "scope": h.scope,
            "client_id": h.client_id,
            "version": h.version,
            "num_labels": h.num_labels,
            "job_id": h.job_id,
            "rollback_of": h.rollback_of,
            "created": h.created,
            "blob": h.blob,
            "live": live[(h.scope, h.client_id)] == h.version,
            "collected": collected.get(h.blob),
        }
        for h in history
    ]


def render_heads(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no head versions yet"

    def made_by(r: dict[str, Any]) -> str:
        return f"rollback to v{r['rollback_of']}" if r["rollback_of"] else f"job {r['job_id']}"

    def status(r: dict[str, Any]) -> str:
        return "live" if r["live"] else f"collected {_when(r['collected'])}" if r["collected"] else ""

    return table(
        ["SCOPE", "CLIENT", "VERSION", "LABELS", "MADE BY", "CREATED", "BLOB", "STATUS"],
        [
            (
                r["scope"],
                r["client_id"],
                f"v{r['version']}",
                r["num_labels"],
                made_by(r),
                _when(r["created"]),
                r["blob"][:12],
                status(r),
            )
            for r in rows
        ],
    )


# -- commands --------------------------------------------------------------------------------------------
def _emit(args: argparse.Namespace, value: Any, render: Callable[[Any], str]) -> None:
    print(json.dumps(value, indent=1, sort_keys=True) if args.json else render(value))


def run_view(args: argparse.Namespace) -> int:
    src, close = open_source(args)
    try:
        if args.command == "status":
            _emit(args, view_status(src), render_status)
        elif args.command == "clients":
            _emit(args, view_clients(src), render_clients)
        elif args.command == "jobs":
            _emit(args, view_jobs(src, args.state, args.client, args.limit), render_jobs)
        else:
            _emit(args, view_heads(src, args.scope, args.client, args.limit), render_heads)
    finally:
        close()
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    if args.global_version is not None:
        if args.client is not None or args.personal_version is not None:
            raise OpsError("give --global-version N, or --client ID --personal-version N; not both")
        scope, client, version = GLOBAL, "", args.global_version
    elif args.client is not None and args.personal_version is not None:
        scope, client, version = PERSONAL, args.client, args.personal_version
    else:
        raise OpsError("say which version: --global-version N, or --client ID --personal-version N")
    if version < 1:
        raise OpsError(f"versions start at 1, not {version}")
    state = open_existing_state(args.state_dir, args.database)
    try:
        blobs = open_blobs(state, args.state_dir, args.blob_dir)
        try:
            running = [j for j in state.jobs(100, [JobState.RUNNING]) if scope == GLOBAL]
            new, bank = state.rollback_head(scope, client, version, _blobs_present(state, blobs))
        finally:
            blobs.close()
        pending = (
            []
            if scope == GLOBAL
            else state.jobs(100, [JobState.QUEUED, JobState.RUNNING, JobState.PERSONALIZING], client)
        )
    finally:
        state.close()
    notes = []
    if scope == GLOBAL:
        if bank is None:
            notes.append(f"v{version}'s statistics bank is not recorded: the live bank was kept")
        else:
            notes.append(f"statistics bank set back to v{version}'s" + ("" if bank else " (empty)"))
        notes += [
            f"job {j.job_id} ({j.client_id}) was running its global step on the replaced version: it is "
            f"dropped when it publishes and runs again on v{new.version}"
            for j in running
        ]
    else:
        notes += [
            f"job {j.job_id} of {client} is {j.state.value}: when it finishes it publishes a newer "
            "personalised head over this one"
            for j in pending
        ]
    result = {
        "scope": scope, "client_id": client, "version": new.version, "rollback_of": version,
        "blob": new.blob, "num_labels": new.num_labels, "bank": bank, "notes": notes,
    }  # fmt: skip
    which = "global head" if scope == GLOBAL else f"personalised head of {client}"
    text = f"published {which} v{new.version}: the blob of v{version} ({new.num_labels} labels)"
    _emit(args, result, lambda _: "\n".join([text, *(f"note: {n}" for n in notes)]))
    return 0


def _blobs_present(state: State, blobs: BlobStore) -> Callable[[HeadVersion, str | None], None]:
    """The rollback's check: the blobs it republishes are there (and touched, so gc keeps them)."""

    def check(source: HeadVersion, bank: str | None) -> None:
        for digest, what in (
            (source.blob, f"v{source.version}'s head"),
            (bank or "", f"v{source.version}'s bank"),
        ):
            if digest and not blobs.touch(digest):
                when = state.collected({digest}).get(digest)
                why = (
                    f"was deleted by fcl-server gc at {_when(when)}"
                    if when
                    else f"is missing from {blobs.root}"
                )
                raise RollbackError(
                    f"{what} (blob {digest[:12]}) {why}: choose a version `fcl-server heads` lists as kept"
                )

    return check


def run_gc(args: argparse.Namespace) -> int:
    state = open_existing_state(args.state_dir, args.database)
    try:
        blobs = open_blobs(state, args.state_dir, args.blob_dir)
        try:
            report = gcmod.collect(
                state, blobs, args.keep_versions, args.grace_s, args.dry_run, orphans=args.orphans
            )
        finally:
            blobs.close()
    finally:
        state.close()

    def render(_: object) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(report.freed.items()))
        verb = "would free" if report.dry_run else "freed"
        lines = [
            f"{verb} {report.freed_count} blobs, {_size(report.freed_bytes)}"
            + (f" ({kinds})" if kinds else "")
        ]
        lines.append(
            f"kept {report.kept} blobs still needed (live heads, newest {report.keep_versions} versions, "
            "unfinished jobs, kv)"
        )
        if report.recent:
            lines.append(
                f"left {report.recent} younger than the grace period ({report.grace_s:.0f} s) for a later run"
            )
        if report.in_use:
            lines.append(f"put back {report.in_use} that became needed while gc ran")
        if report.missing:
            lines.append(f"{report.missing} no longer had a file (collected before)")
        return "\n".join(lines)

    _emit(args, report.as_json(), render)
    return 0


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def run_backup(args: argparse.Namespace) -> int:
    state = open_existing_state(args.state_dir, args.database)
    try:
        blobs = open_blobs(state, args.state_dir, args.blob_dir)
        try:
            tools = backups.Tools(pg_dump=args.pg_dump)
            manifest = backups.backup(state, blobs, args.dest, args.copy, args.allow_missing, tools)
        finally:
            blobs.close()
    finally:
        state.close()
    summary = {k: v for k, v in manifest.items() if k != "blob_list"}
    b = manifest["blobs"]

    def render(_: object) -> str:
        db = manifest["database"]
        heads = ", ".join(f"{k} v{v}" for k, v in sorted(manifest["heads"].items())) or "none"
        return "\n".join(
            [
                f"backup written to {args.dest} (schema {manifest['schema_revision']}, "
                f"{manifest['took_s']:.1f} s)",
                f"database: {db['backend']} snapshot {db['file']} ({_size(db['size'])}, "
                f"sha256 {db['sha256'][:12]})",
                f"blobs: {b['count']} ({_size(b['bytes'])}; {b['linked']} hard-linked, "
                f"{b['copied']} copied), "
                f"every sha256 checked; {b['collected']} referenced ones were deleted by gc before",
                "jobs: " + (", ".join(f"{n} {s}" for s, n in sorted(manifest["jobs"].items())) or "none"),
                f"heads: {heads}",
            ]
            + ([f"missing (--allow-missing): {len(b['missing'])} blobs"] if b["missing"] else [])
        )

    _emit(args, summary, render)
    return 0


def run_restore(args: argparse.Namespace) -> int:
    tools = backups.Tools(pg_restore=args.pg_restore)
    summary = backups.restore(args.src, args.state_dir, args.database, args.blob_dir, args.copy, tools)

    def render(_: object) -> str:
        flags = f"--state-dir {args.state_dir}"
        if args.database:
            flags += " --database URL"
        if args.blob_dir:
            flags += f" --blob-dir {args.blob_dir}"
        heads = ", ".join(f"{k} v{v}" for k, v in sorted(summary["heads"].items())) or "none"
        return "\n".join(
            [
                f"restored {args.src} into {summary['state_dir']} ({summary['database']}, "
                f"schema {summary['schema_revision']})",
                f"blobs: {summary['blobs']['count']} in {summary['blob_dir']} (every sha256 checked)",
                "jobs: " + (", ".join(f"{n} {s}" for s, n in sorted(summary["jobs"].items())) or "none"),
                f"heads: {heads}",
                f"next: fcl-server serve {flags} ...  (jobs left running are re-queued at start)",
            ]
        )

    _emit(args, summary, render)
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch one operator command; errors go up to fcl_server.cli.main, which prints them."""
    if args.command in VIEWS:
        return run_view(args)
    return {"rollback": run_rollback, "gc": run_gc, "backup": run_backup, "restore": run_restore}[
        args.command
    ](args)
