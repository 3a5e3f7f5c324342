"""`fcl-client`: run a client's task stream against a server (run) and use what it learned (predict)."""

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
from common.tls import TLSConfigError
from common.zoo import SpecError
from fcl_client.connection import Connection, TransferError
from fcl_client.progress import Bars
from fcl_client.runner import ClientRunner, load_trained
from fcl_client.settings import RunSettings, TokenError, resolve_token

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args) if args.command == "run" else predict(args)
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


if __name__ == "__main__":
    raise SystemExit(main())
