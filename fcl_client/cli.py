"""`fcl-client`: learn a client's task stream with a server (run, or agent: for as long as it grows), and use
what it learned (predict)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from pydantic import ValidationError

from common.datasets.records import DataFormatError
from common.fm import FoundationModelError
from common.logs import setup_logging
from common.settings import SettingsError, add_settings_command, given_flags, load_settings
from common.tls import TLSConfigError
from common.zoo import SpecError
from fcl_client.agent import run_agent
from fcl_client.connection import Connection, TransferError
from fcl_client.progress import Bars
from fcl_client.runner import ClientRunner, load_trained
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
    predict.add_argument("texts", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"run": run, "agent": agent, "predict": predict}
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
    results = learner.predict(fm.encode(args.texts), top=args.top, head=args.head)
    if args.json:
        print(
            json.dumps(
                [
                    {"text": t, "labels": [{"label": y, "p": p} for y, p in r]}
                    for t, r in zip(args.texts, results, strict=True)
                ],
                indent=1,
            )
        )
        return 0
    for text, ranked in zip(args.texts, results, strict=True):
        print(text)
        for label, prob in ranked:
            print(f"  {prob:6.3f}  {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
