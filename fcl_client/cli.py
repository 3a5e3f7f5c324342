"""`fcl-client`: learn a client's task stream with a server (run, or agent: for as long as it grows), and use
what it learned (predict, serve)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from pydantic import ValidationError

from common.algorithms.abstention import OUT_OF_SCOPE
from common.datasets.records import DataFormatError
from common.fm import FoundationModelError
from common.logs import setup_logging
from common.settings import SettingsError, add_settings_command, given_flags, load_settings
from common.tls import TLSConfigError, TLSFiles, is_loopback, ssl_context
from common.zoo import SpecError
from fcl_client.agent import run_agent
from fcl_client.connection import Connection, TransferError
from fcl_client.progress import Bars
from fcl_client.runner import ClientRunner, load_fm, load_trained
from fcl_client.serving import MAX_IN_FLIGHT, RELOAD_INTERVAL_S, CheckpointRefused, EdgePredictor
from fcl_client.settings import AgentSettings, RunSettings, TokenError, resolve_token

TOKEN_ENV = "FCL_TOKEN"  # the `token` option's environment variable
__all__ = ["TOKEN_ENV", "TokenError", "build_parser", "main", "resolve_token"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcl-client", description="Federated continual learning edge client"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    add_settings_command(
        sub,
        "run",
        "learn the task stream: train, upload, receive the personalised FM head",
        RunSettings,
        "FCL_SERVER, FCL_TOKEN",
        "deploy/client.example.toml",
    )

    add_settings_command(
        sub,
        "agent",
        "run as a long-lived edge agent: learn every task folder of the stream directory, then each new "
        "folder (and each growth of one) as it arrives; serves /metrics and /healthz (docs/agent.md)",
        AgentSettings,
        "FCL_SERVER, FCL_TOKEN, FCL_POLL_S",
        "deploy/agent.example.toml",
    )

    predict = sub.add_parser("predict", help="top labels with probabilities for some text")
    predict.add_argument("--work-dir", type=Path, required=True)
    predict.add_argument("--head", choices=["small", "personal"], default="small")
    predict.add_argument("--top", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument(
        "--no-abstain",
        action="store_true",
        help="show the raw ranking even where the head abstains (out_of_scope, docs/abstention.md)",
    )
    predict.add_argument("texts", nargs="+")

    serve = sub.add_parser(
        "serve", help="answer predictions over local HTTP (JSON), reloading newer checkpoints as they appear"
    )
    serve.add_argument("--work-dir", type=Path, required=True)
    serve.add_argument(
        "--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080; port 0 picks one)"
    )
    serve.add_argument("--device", default="cpu", help="where the FM encodes (default cpu)")
    serve.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    serve.add_argument(
        "--max-in-flight",
        type=int,
        default=MAX_IN_FLIGHT,
        help=f"predict requests admitted at once; past it 503 with Retry-After (default {MAX_IN_FLIGHT})",
    )
    serve.add_argument(
        "--reload-interval",
        type=float,
        default=RELOAD_INTERVAL_S,
        help=f"seconds between checks for a newer checkpoint (default {RELOAD_INTERVAL_S:g})",
    )
    serve.add_argument(
        "--api-token-file",
        type=Path,
        help="require 'Authorization: Bearer <the file's contents>' on /v1/ requests (docs/edge-serving.md)",
    )
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate chain")
    serve.add_argument("--tls-key", type=Path, help="the certificate's PEM private key")
    serve.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen without TLS or without --api-token-file",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"run": run, "agent": agent, "predict": predict, "serve": serve}
        return commands[args.command](args)
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"fcl-client: server error {code}: {details}", file=sys.stderr)
    except (
        ValidationError,
        SpecError,
        DataFormatError,
        FoundationModelError,
        TransferError,
        TLSConfigError,
        TokenError,
        SettingsError,
        OSError,
        CheckpointRefused,
    ) as exc:
        print(f"fcl-client: error: {exc}", file=sys.stderr)
    except RuntimeError as exc:
        print(f"fcl-client: error: {exc}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    settings = load_settings(RunSettings, given_flags(args, RunSettings), args.config)
    setup_logging(settings.log_level, settings.log_format)
    cfg = settings.client_config()
    bars = Bars.for_terminal(settings.progress)
    with Connection(cfg.server, cfg.token, timeout=cfg.timeout, tls=cfg.tls()) as conn:
        summary = ClientRunner(cfg, conn, say=lambda line: print(line, flush=True), bars=bars).run()
    print(f"[{cfg.client_id}] finished {summary.tasks_done} tasks", flush=True)
    if summary.failed_jobs:
        print(f"fcl-client: distillation failed for jobs {summary.failed_jobs}", file=sys.stderr)
        return 1
    return 0


def agent(args: argparse.Namespace) -> int:
    settings = load_settings(AgentSettings, given_flags(args, AgentSettings), args.config)
    setup_logging(settings.log_level, settings.log_format)
    cfg = settings.client_config()
    bars = Bars.for_terminal(settings.progress)
    say = lambda line: print(line, flush=True)  # noqa: E731
    return run_agent(cfg, settings.agent_options(), settings.metrics_listen, say=say, bars=bars)


def predict(args: argparse.Namespace) -> int:
    fm, learner = load_trained(args.work_dir)
    abstain = not args.no_abstain
    results = learner.predict_scoped(fm.encode(args.texts), top=args.top, head=args.head, abstain=abstain)
    if abstain and learner.threshold(args.head) is None:
        print(
            f"fcl-client: the {args.head} model has no abstention threshold (trained before abstention, "
            "or with it off): it never answers out_of_scope",
            file=sys.stderr,
        )
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "text": t,
                        "out_of_scope": r.out_of_scope,
                        "labels": [{"label": y, "p": p} for y, p in r.ranked],
                    }
                    for t, r in zip(args.texts, results, strict=True)
                ],
                indent=1,
            )
        )
        return 0
    for text, result in zip(args.texts, results, strict=True):
        print(text)
        if result.out_of_scope and result.threshold is not None:
            label, prob = result.ranked[0]
            print(
                f"  {OUT_OF_SCOPE}  (top label {label} {prob:.3f}; {result.threshold.score} "
                f"{result.confidence:.3f} < threshold {result.threshold.value:.3f})"
            )
            continue
        for label, prob in result.ranked:
            print(f"  {prob:6.3f}  {label}")
    return 0


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT ([::1]:PORT for IPv6) → (host, port); ValueError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"--listen must be HOST:PORT with a port 0-65535, such as 127.0.0.1:8080, not {value!r}"
        )
    return host.strip("[]"), int(port)


MIN_API_TOKEN_CHARS = 16


def read_api_token(path: Path) -> str:
    """The API token in `path` (surrounding whitespace dropped): printable ASCII, no spaces, >= 16 chars."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --api-token-file {path}: {exc}") from exc
    if len(token) < MIN_API_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        raise ValueError(
            f"the API token in {path} must be at least {MIN_API_TOKEN_CHARS} printable ASCII characters "
            "without spaces; make one with: openssl rand -hex 32 > FILE"
        )
    return token


def serve_protection(args: argparse.Namespace, host: str) -> tuple[TLSFiles, str | None]:
    """serve's TLS files (checked by loading them) and API token. A non-loopback address needs both,
    as the server's and the dashboard's ports do, unless --insecure: what the node learned is private."""
    tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    ssl_context(tls)
    token = read_api_token(args.api_token_file) if args.api_token_file else None
    guards = (("TLS (--tls-cert/--tls-key)", tls.cert), ("an API token (--api-token-file)", token))
    missing = [what for what, have in guards if not have]
    if missing and not is_loopback(f"{host}:0") and not args.insecure:
        raise ValueError(
            f"refusing to serve on {host} without {' and '.join(missing)}: anyone who reaches it could "
            "read what this node learned; pass them, or --insecure to accept that"
        )
    return tls, token


def serve(args: argparse.Namespace) -> int:
    import socket
    import ssl

    import torch
    import uvicorn

    from fcl_client.http_api import create_app

    setup_logging(args.log_level.upper(), "text")
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        print(f"fcl-client: error: {exc}", file=sys.stderr)
        return 2
    if args.max_in_flight < 1 or args.reload_interval <= 0:
        print("fcl-client: error: --max-in-flight must be >= 1 and --reload-interval > 0", file=sys.stderr)
        return 2
    try:
        tls, token = serve_protection(args, host)
    except (TLSConfigError, ValueError) as exc:
        print(f"fcl-client: error: {exc}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    predictor = EdgePredictor(args.work_dir, load_fm(args.work_dir, args.device), args.reload_interval)
    app = create_app(predictor, max_in_flight=args.max_in_flight, api_token=token)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    scheme, guard = ("https" if tls.cert else "http"), ("API token required" if token else "no API token")
    print(
        f"fcl-client serve: listening on {scheme}://{shown}:{bound} "
        f"(snapshot {predictor.current.snapshot}, {guard})",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=False,
        log_config=None,  # uvicorn's records go through the root logger set up above
        # open connections of any kind (uvicorn answers 503 past it); predicts have their own bound
        limit_concurrency=args.max_in_flight + 64,
        timeout_graceful_shutdown=30,
        ssl_certfile=tls.cert,
        ssl_keyfile=tls.key,
        ssl_ca_certs=str(tls.ca) if tls.ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.ca else ssl.CERT_NONE,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
