"""A benchmark fcl-server in its own process: `python -m benchmarks.perf.serve_proc DIR [options]`.

Prints one JSON line (port, pid, FM digest, client tokens, admin token) once it serves, then runs until
stdin closes. Used where clients must not share the server's interpreter (Flower comparison,
concurrency): a real server does not share its GIL with its clients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--archive-bytes", type=int, default=0, help="serve a blob this big as the FM")
    parser.add_argument("--max-upload-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clients", type=int, default=1, help="client tokens to enroll")
    parser.add_argument("--worker", action="store_true", help="keep the distillation worker running")
    parser.add_argument("--max-workers", type=int, default=32, help="gRPC worker threads")
    parser.add_argument("--log-level", default="INFO", help="as fcl-server's (its default: a line per RPC)")
    args = parser.parse_args()

    from benchmarks.perf.harness import enroll, serve_synthetic_archive, start_server
    from common.fm import FoundationModel
    from common.logs import setup_logging

    setup_logging(args.log_level)  # to stderr, which the benchmark discards; formatting them is the cost

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    fm = FoundationModel(device="cpu")
    server = start_server(
        args.root,
        fm,
        max_upload_bytes=args.max_upload_bytes,
        worker=args.worker,
        max_workers=args.max_workers,
    )
    if args.archive_bytes:
        serve_synthetic_archive(server, args.archive_bytes)
    info = {
        "port": server.port,
        "pid": os.getpid(),
        "fm_digest": fm.digest,
        "tokens": [enroll(server, f"client-{i}") for i in range(args.clients)],
        "admin_token": enroll(server, "perf-admin", admin=True),
    }
    print(json.dumps(info), flush=True)
    try:
        sys.stdin.read()  # the parent closes stdin (or dies) to stop us
    finally:
        server.stop(grace=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
