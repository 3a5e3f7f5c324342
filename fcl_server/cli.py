"""`fcl-server`: the daemon (serve), a worker, tokens (enroll, revoke), the database (db), the FM (fm);
the operator's commands (status, clients, jobs, heads, rollback, gc, backup, restore) are fcl_server.ops."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import sys
import threading
from pathlib import Path

import grpc
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from common.fm import FoundationModelError
from common.logs import setup_logging
from common.settings import add_settings_command, given_flags, load_settings
from fcl_server import ops
from fcl_server.app import create_server, open_state
from fcl_server.backup import BackupError
from fcl_server.database import (
    DatabaseError,
    create_engine,
    current,
    database_url,
    driver_reason,
    mask,
    upgrade,
)
from fcl_server.errors import Unavailable
from fcl_server.settings import FMInfoSettings, ServeSettings, WorkerSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcl-server", description="Federated continual learning server")
    sub = parser.add_subparsers(dest="command", required=True)

    add_settings_command(
        sub,
        "serve",
        "run the server until SIGTERM/SIGINT",
        ServeSettings,
        "FCL_STATE_DIR",
        "deploy/server.example.toml",
    )

    add_settings_command(
        sub,
        "worker",
        "run a distillation worker (no gRPC) on a shared database and blob dir, until SIGTERM/SIGINT",
        WorkerSettings,
        "FCL_DATABASE",
        "deploy/server.example.toml",
    )

    enroll = sub.add_parser("enroll", help="issue a bearer token for a client (or an admin) and print it")
    _database_flags(enroll)
    enroll.add_argument("client_id", help="client id (or admin name with --admin)")
    enroll.add_argument("--admin", action="store_true", help="issue an admin token (GetStatus, global head)")

    revoke = sub.add_parser("revoke", help="revoke every token of a client or admin")
    _database_flags(revoke)
    revoke.add_argument("client_id")

    fm = sub.add_parser("fm", help="the foundation model this server serves")
    fm_sub = fm.add_subparsers(dest="fm_command", required=True)
    info = add_settings_command(
        fm_sub,
        "info",
        "print the FM serve would serve: name, digest and encoding (what every node must match)",
        FMInfoSettings,
        "FCL_FM, FCL_FM_POOLING",
        "deploy/server.example.toml",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object (to compare nodes)")

    db = sub.add_parser("db", help="the state database's schema: upgrade it, or show its revision")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    _database_flags(
        db_sub.add_parser(
            "upgrade",
            help="migrate the database to this version's schema, keeping every row (a 0.1.0 state dir too)",
        )
    )
    _database_flags(
        db_sub.add_parser("current", help="print the database's schema revision; exit 1 when behind the head")
    )
    ops.add_commands(sub)
    return parser


_database_flags = ops.add_database_flags


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "worker":
            return worker(args)
        if args.command == "enroll":
            return enroll(args.state_dir, args.client_id, args.admin, args.database)
        if args.command == "revoke":
            return revoke(args.state_dir, args.client_id, args.database)
        if args.command == "fm":
            return fm_info(args)
        if args.command == "db":
            return db_command(args.db_command, args.state_dir, args.database)
        return ops.run(args)
    except grpc.RpcError as exc:  # an operator view asked a server (--server)
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"fcl-server: error: {args.server}: {code}: {details}", file=sys.stderr)
        return 2
    except (ValidationError, FoundationModelError, ValueError, OSError, DatabaseError, BackupError) as exc:
        print(f"fcl-server: error: {_explain(exc)}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:  # e.g. PostgreSQL unreachable: the driver's reason, never the URL
        reason = driver_reason(exc)
        print(f"fcl-server: error: database: {reason} (check --database / FCL_DATABASE)", file=sys.stderr)
        return 2
    except Unavailable as exc:
        print(f"fcl-server: error: {exc} (check --database / FCL_DATABASE)", file=sys.stderr)
        return 2
    return 2


def _explain(exc: Exception) -> str:
    """The problem in a sentence: pydantic's own text adds the input dump and a docs link."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(
        ".".join(map(str, err["loc"])) + ": " * bool(err["loc"]) + err["msg"].removeprefix("Value error, ")
        for err in exc.errors()
    )


TOKEN_PREFIX = "fcl_"


def new_token() -> str:
    """A fresh bearer token; the prefix keeps it from starting with '-', which argparse reads as a flag."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def enroll(state_dir: Path | None, client_id: str, admin: bool, database: str | None = None) -> int:
    from fcl_server.service import ID_RE

    if not ID_RE.match(client_id):
        raise ValueError(f"client id {client_id!r} must be 1-128 letters, digits, '_', '.' or '-'")
    token = new_token()
    state = open_state(state_dir, database)
    state.add_token(token, client_id, admin)
    state.close()
    print(token)
    return 0


def revoke(state_dir: Path | None, client_id: str, database: str | None = None) -> int:
    state = open_state(state_dir, database)
    count = state.revoke_tokens(client_id)
    state.close()
    print(f"revoked {count} token(s) of {client_id}", file=sys.stderr)
    return 0 if count else 1


def db_command(command: str, state_dir: Path | None, database: str | None) -> int:
    """`db upgrade`: migrate to the head revision; `db current`: print the revision (exit 1 when behind)."""
    url = database_url(state_dir, database)
    engine = create_engine(url)
    try:
        print(f"database: {mask(url)}", file=sys.stderr)
        if command == "upgrade":
            before, after = upgrade(engine)
            if before == after:
                print(f"already at {after.describe()}")
            else:
                print(f"upgraded {before.describe()} -> {after.describe()}")
            return 0
        revision = current(engine)
        print(revision.describe())
        return 0 if revision.at_head else 1
    finally:
        engine.dispose()


def fm_info(args: argparse.Namespace) -> int:
    """`fm info`: load the FM as serve would (same flags, FCL_* variables, --config file); describe it."""
    from common.fm import FoundationModel, default_device
    from common.fm_encoding import EncodingOverrides

    settings = load_settings(FMInfoSettings, given_flags(args, FMInfoSettings), args.config)
    fm = FoundationModel(
        settings.fm,
        device=settings.device or default_device(),
        overrides=EncodingOverrides.of(settings.fm_pooling, settings.fm_max_length, settings.fm_prompt),
        dtype=settings.fm_dtype,
    )
    described = fm.describe()
    if args.json:
        print(json.dumps(described, indent=1, ensure_ascii=False))
        return 0
    for key, value in described.items():
        print(f"{key:<14} {_shown(value)}")
    return 0


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "+".join(map(str, value))
    if isinstance(value, str) and (value == "" or value != value.strip()):
        return json.dumps(value, ensure_ascii=False)  # quoted, so '' and a trailing space show
    return str(value)


def serve(args: argparse.Namespace) -> int:
    settings = load_settings(ServeSettings, given_flags(args, ServeSettings), args.config)
    setup_logging(settings.log_level, settings.log_format)
    running = create_server(settings.server_config())
    if settings.port_file:
        tmp = settings.port_file.with_suffix(".tmp")
        tmp.write_text(str(running.port))
        tmp.replace(settings.port_file)
    if running.metrics_port is not None:
        print(f"fcl-server metrics on port {running.metrics_port} (/metrics)", flush=True)
    if running.dashboard is not None:
        print(f"fcl-server dashboard on port {running.dashboard.port} (/)", flush=True)
    print(f"fcl-server serving on port {running.port}", flush=True)
    _until_signalled()
    logging.getLogger(__name__).info("shutting down: draining calls and the running job")
    running.stop()
    return 0


def worker(args: argparse.Namespace) -> int:
    from fcl_server.worker_app import create_worker

    settings = load_settings(WorkerSettings, given_flags(args, WorkerSettings), args.config)
    setup_logging(settings.log_level, settings.log_format)
    running = create_worker(settings.server_config(), settings.worker_id)
    print(f"fcl-server worker {running.worker.worker_id} running", flush=True)
    _until_signalled()
    logging.getLogger(__name__).info("shutting down: the running job goes back to the queue")
    running.stop()
    return 0


def _until_signalled() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    raise SystemExit(main())
