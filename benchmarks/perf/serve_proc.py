"""A benchmark fcl-server in its own process: `python -m benchmarks.perf.serve_proc DIR SIZE` (see flower.py).

Prints one JSON line (port, token, FM digest) once it serves, then runs until stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    from benchmarks.perf.harness import enroll, serve_synthetic_archive, start_server
    from common.fm import FoundationModel

    root, size = Path(sys.argv[1]), int(sys.argv[2])
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    if threads:
        import torch

        torch.set_num_threads(threads)
    fm = FoundationModel(device="cpu")
    server = start_server(root, fm, max_upload_bytes=size + 16 * 1024 * 1024)
    serve_synthetic_archive(server, size)
    token = enroll(server, "perf-client")
    print(json.dumps({"port": server.port, "token": token, "fm_digest": fm.digest}), flush=True)
    try:
        sys.stdin.read()  # the parent closes stdin (or dies) to stop us
    finally:
        server.stop(grace=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
