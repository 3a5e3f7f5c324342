"""`fcl-server`: run the daemon (serve) and manage tokens (enroll, revoke)."""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from common.config import OBODConfig
from common.fm import DEFAULT_FM, FoundationModelError
from fcl_server.app import ServerConfig, create_server, open_state


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcl-server", description="Federated continual learning server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server until SIGTERM/SIGINT")
    serve.add_argument("--state-dir", type=Path, required=True, help="database, blobs and caches live here")
    serve.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to bind (port 0 = any free)")
    serve.add_argument(
        "--fm", default=DEFAULT_FM, help="FM name (packaged default) or a local model directory"
    )
    serve.add_argument(
        "--public-corpus",
        type=Path,
        help="unlabeled text file, one sentence per line (default: the built-in public split)",
    )
    serve.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    serve.add_argument("--head-spec", help="zoo spec of the FM heads, e.g. mlp:768:gelu")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    serve.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", type=Path, help="CA of client certificates: enables mutual TLS")
    serve.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback address")
    serve.add_argument(
        "--uploads-per-minute", type=int, default=60, help="per-client upload rate (0: no limit)"
    )
    serve.add_argument("--log-level", default="INFO")

    enroll = sub.add_parser("enroll", help="issue a bearer token for a client (or an admin) and print it")
    enroll.add_argument("--state-dir", type=Path, required=True)
    enroll.add_argument("client_id", help="client id (or admin name with --admin)")
    enroll.add_argument("--admin", action="store_true", help="issue an admin token (GetStatus, global head)")

    revoke = sub.add_parser("revoke", help="revoke every token of a client or admin")
    revoke.add_argument("--state-dir", type=Path, required=True)
    revoke.add_argument("client_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "enroll":
            return enroll(args.state_dir, args.client_id, args.admin)
        if args.command == "revoke":
            return revoke(args.state_dir, args.client_id)
    except (ValidationError, FoundationModelError, ValueError, OSError) as exc:
        print(f"fcl-server: error: {exc}", file=sys.stderr)
        return 2
    return 2


TOKEN_PREFIX = "fcl_"


def new_token() -> str:
    """A fresh bearer token; the prefix keeps it from starting with '-', which argparse reads as a flag."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def enroll(state_dir: Path, client_id: str, admin: bool) -> int:
    from fcl_server.service import ID_RE

    if not ID_RE.match(client_id):
        raise ValueError(f"client id {client_id!r} must be 1-128 letters, digits, '_', '.' or '-'")
    token = new_token()
    state = open_state(state_dir)
    state.add_token(token, client_id, admin)
    state.close()
    print(token)
    return 0


def revoke(state_dir: Path, client_id: str) -> int:
    state = open_state(state_dir)
    count = state.revoke_tokens(client_id)
    state.close()
    print(f"revoked {count} token(s) of {client_id}", file=sys.stderr)
    return 0 if count else 1


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    obod = OBODConfig(**({"head_spec": args.head_spec} if args.head_spec else {}))
    fields = {
        "state_dir": args.state_dir,
        "listen": args.listen,
        "fm": args.fm,
        "obod": obod,
        "public_corpus": args.public_corpus,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "insecure": args.insecure,
        "uploads_per_minute": args.uploads_per_minute,
    }
    if args.device:
        fields["device"] = args.device
    running = create_server(ServerConfig(**fields))
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(running.port))
        tmp.replace(args.port_file)
    print(f"fcl-server serving on port {running.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logging.getLogger(__name__).info("shutting down: draining calls and the running job")
    running.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
