"""`fcl-client`: run a client's task stream against a server (run) and use what it learned (predict)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import grpc
from pydantic import ValidationError

from common.config import SMCFConfig
from common.datasets.records import DataFormatError
from common.fm import FoundationModel, FoundationModelError
from common.tls import TLSConfigError
from common.zoo import SpecError
from fcl_client.checkpoint import CheckpointStore
from fcl_client.connection import Connection, TransferError
from fcl_client.runner import FM_PATH_FILE, ClientConfig, ClientRunner

TOKEN_ENV = "FCL_TOKEN"


class TokenError(ValueError):
    """No usable bearer token was given."""


def resolve_token(flag: str | None, file: Path | None, env: str | None) -> str:
    """The bearer token from exactly one of --token, --token-file or $FCL_TOKEN."""
    given = [v for v in (flag, file, env) if v]
    if len(given) != 1:
        raise TokenError(
            f"give the bearer token exactly one way (--token, --token-file or ${TOKEN_ENV}); got {len(given)}"
        )
    token = (file.read_text() if file else str(given[0])).strip()
    if not token:
        raise TokenError(f"the bearer token is empty{f' (file {file})' if file else ''}")
    return token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcl-client", description="Federated continual learning edge client"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="learn the task stream: train, upload, receive the personalised FM head")
    run.add_argument("--server", required=True, help="HOST:PORT of fcl-server")
    run.add_argument("--client-id", required=True)
    run.add_argument(
        "--token",
        help="bearer token from `fcl-server enroll`; prefer --token-file or $FCL_TOKEN "
        "(a command line is visible to every user of the node)",
    )
    run.add_argument("--token-file", type=Path, help="file holding the bearer token")
    run.add_argument("--stream", type=Path, required=True, help="task stream directory (one subdir per task)")
    run.add_argument(
        "--model", default="mlp:256", help="small-model spec: linear | mlp:W[,W...][:act][:ln] | JSON"
    )
    run.add_argument("--work-dir", type=Path, required=True, help="checkpoints, caches and metrics")
    run.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    run.add_argument(
        "--fm",
        help="local FM (name or directory) to use when it is the server's; "
        "otherwise the server's FM is downloaded",
    )
    run.add_argument("--epochs", type=int, help="SMCF epochs per task (default 20)")
    run.add_argument(
        "--share-stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="upload per-label feature mean/std with the model (default: on)",
    )
    run.add_argument("--stats-noise", type=float, help="Gaussian noise std added to shared statistics")
    run.add_argument("--tls-ca", type=Path, help="CA that signed the server certificate: enables TLS")
    run.add_argument("--tls-cert", type=Path, help="client certificate chain for mutual TLS (PEM)")
    run.add_argument("--tls-key", type=Path, help="client private key for mutual TLS (PEM)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--timeout", type=float, default=60.0, help="per-call deadline in seconds")
    run.add_argument("--log-level", default="WARNING")

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
        OSError,
    ) as exc:
        print(f"fcl-client: error: {exc}", file=sys.stderr)
    except RuntimeError as exc:
        print(f"fcl-client: error: {exc}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    smcf = SMCFConfig(
        **{
            k: v
            for k, v in {
                "epochs": args.epochs,
                "stats_noise": args.stats_noise,
                "share_stats": args.share_stats,
            }.items()
            if v is not None
        }
    )
    fields = {
        "server": args.server,
        "client_id": args.client_id,
        "token": resolve_token(args.token, args.token_file, os.environ.get(TOKEN_ENV)),
        "stream": args.stream,
        "model": args.model,
        "work_dir": args.work_dir,
        "smcf": smcf,
        "seed": args.seed,
        "timeout": args.timeout,
    }
    fields.update(
        {
            k: v
            for k, v in {
                "device": args.device,
                "fm": args.fm,
                "tls_ca": args.tls_ca,
                "tls_cert": args.tls_cert,
                "tls_key": args.tls_key,
            }.items()
            if v
        }
    )
    cfg = ClientConfig(**fields)
    with Connection(cfg.server, cfg.token, timeout=cfg.timeout, tls=cfg.tls()) as conn:
        summary = ClientRunner(cfg, conn, say=lambda line: print(line, flush=True)).run()
    print(f"[{cfg.client_id}] finished {summary.tasks_done} tasks", flush=True)
    if summary.failed_jobs:
        print(f"fcl-client: distillation failed for jobs {summary.failed_jobs}", file=sys.stderr)
        return 1
    return 0


def predict(args: argparse.Namespace) -> int:
    fm_file = args.work_dir / FM_PATH_FILE
    _, learner = CheckpointStore(args.work_dir).load()
    if learner is None or not fm_file.exists():
        raise RuntimeError(f"{args.work_dir} holds no trained client; run `fcl-client run` first")
    fm = FoundationModel(fm_file.read_text().strip(), device="cpu")
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
