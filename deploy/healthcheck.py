#!/usr/bin/env python3
"""Container probe: exit 0 when fcl-server answers SERVING on the standard gRPC health service, else 1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__)
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="HOST:PORT of fcl-server")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        help="use TLS when DIR/ca.pem exists, and DIR/healthcheck.pem + .key as client certificate "
        "when they exist (the layout of deploy/make-certs.sh); plaintext otherwise",
    )
    parser.add_argument("--tls-ca", type=Path, help="CA of the server certificate: enables TLS")
    parser.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client key for mutual TLS")
    return parser


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def channel(args: argparse.Namespace) -> grpc.Channel:
    ca, cert, key = args.tls_ca, args.tls_cert, args.tls_key
    if args.tls_dir is not None and (args.tls_dir / "ca.pem").is_file():
        ca = ca or args.tls_dir / "ca.pem"
        if (args.tls_dir / "healthcheck.pem").is_file() and cert is None:
            cert, key = args.tls_dir / "healthcheck.pem", args.tls_dir / "healthcheck.key"
    if ca is None and cert is None:
        return grpc.insecure_channel(args.target)
    creds = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(cert))
    return grpc.secure_channel(args.target, creds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with channel(args) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except (grpc.RpcError, OSError) as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"unhealthy: {args.target}: {detail}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main())
