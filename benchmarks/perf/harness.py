"""An in-process fcl-server on loopback for the benchmark: no rate limits, tokens, synthetic payloads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from common.algorithms.stats import StatsBank
from common.fm import FoundationModel
from common.package import KnowledgePackage, encode_package
from common.zoo import MAX_HIDDEN_WIDTH, ModelSpec, SmallModel
from fcl_server.app import RunningServer, ServerConfig, create_server
from fcl_server.cli import new_token

FEATURE_DIM = 384
ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def start_server(
    root: Path, fm: FoundationModel, max_upload_bytes: int = 64 * MIB, worker: bool = False, **cfg: Any
) -> RunningServer:
    """A real server on 127.0.0.1:0 with a tiny public corpus and no upload rate, byte or storage limits.

    With `worker=False` the distillation worker is stopped once U is computed, so uploads only queue
    jobs and no OBOD job competes with the transfer being measured.
    """
    corpus = root / "public.txt"
    corpus.write_text("\n".join(f"public sentence number {i} about topic {i % 7}" for i in range(64)))
    config = ServerConfig(
        state_dir=root / "state",
        listen="127.0.0.1:0",
        device="cpu",
        public_corpus=corpus,
        uploads_per_minute=0,
        upload_mb_per_hour=0,
        client_quota_mb=0,  # a benchmark client stores GBs of packages
        max_upload_bytes=max_upload_bytes,
        **cfg,
    )
    server = create_server(config, fm=fm)
    server.service.fm_host.public_features()  # the worker's first step; wait for it here
    if not worker:
        server.worker.stop(timeout=60)
    return server


def enroll(server: RunningServer, name: str, admin: bool = False) -> str:
    token = new_token()
    server.state.add_token(token, name, admin)
    return token


def serve_synthetic_archive(server: RunningServer, size: int, seed: int = 0) -> str:
    """Make GetFoundationModel stream `size` random bytes (a blob) instead of the FM archive; its sha256."""
    blobs = server.service.blobs
    tmp = blobs.new_temp()
    digest = hashlib.sha256()
    gen = torch.Generator().manual_seed(seed)
    with tmp.open("wb") as fh:
        left = size
        while left:
            n = min(left, 8 * 1024 * 1024)
            block = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).numpy().tobytes()
            fh.write(block)
            digest.update(block)
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    sha = blobs.put_file(tmp, digest.hexdigest())
    host = server.service.fm_host
    host.info = dataclasses.replace(host.info, archive_blob=sha, archive_size=size)
    return sha


def mlp_hidden_for(target_bytes: int, num_labels: int, dim: int = FEATURE_DIM) -> tuple[int, ...]:
    """Hidden widths of an MLP whose float32 weights take about `target_bytes` (one or two layers)."""
    floats = target_bytes // 4
    one = (floats - num_labels) // (dim + 1 + num_labels)
    if one <= MAX_HIDDEN_WIDTH:
        return (max(1, one),)
    first = MAX_HIDDEN_WIDTH
    rest = floats - first * (dim + 1)
    second = (rest - num_labels) // (first + 1 + num_labels)
    if not 1 <= second <= MAX_HIDDEN_WIDTH:
        raise ValueError(f"no two-layer MLP of {target_bytes} bytes within the zoo's width limit")
    return (first, second)


def package_of_size(fm_digest: str, target_bytes: int, num_labels: int = 10, seed: int = 0) -> bytes:
    """A valid small-model knowledge package (an `mlp` spec, with statistics) of about `target_bytes`."""
    torch.manual_seed(seed)
    spec = ModelSpec(kind="mlp", hidden=mlp_hidden_for(target_bytes, num_labels))
    labels = [f"label_{i}" for i in range(num_labels)]
    with torch.no_grad():
        model = SmallModel(spec, FEATURE_DIM, num_labels)
    bank = StatsBank(FEATURE_DIM)
    bank.add_features(torch.randn(4 * num_labels, FEATURE_DIM), [y for y in labels for _ in range(4)])
    pkg = KnowledgePackage.from_model(model, labels, fm_digest, "small", [4] * num_labels, bank)
    return encode_package(pkg)


class ServerProcess:
    """benchmarks.perf.serve_proc in a child process; `info` is what it printed (port, pid, tokens)."""

    def __init__(self, root: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.perf.serve_proc", str(root), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the benchmark fcl-server process did not start")
        self.info: dict[str, Any] = json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
