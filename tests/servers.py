"""Test helpers: in-process servers on port 0, valid knowledge packages, real server processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.cluster import ServerProcess, issue_token, start_server
from common.algorithms.stats import StatsBank
from common.fm import FoundationModel
from common.package import KnowledgePackage, encode_package
from common.zoo import SmallModel, parse_spec
from fcl_server.app import RunningServer, ServerConfig, create_server


def write_tiny_corpus(path: Path) -> Path:
    """A public corpus of 64 short sentences: a job on it takes about a second."""
    path.write_text("\n".join(f"public sentence number {i} about topic {i % 7}" for i in range(64)))
    return path


def inprocess_server(tmp_path: Path, fm: FoundationModel, **config: Any) -> RunningServer:
    """A real gRPC server on 127.0.0.1:0 sharing the session's FM; a tiny public corpus unless given."""
    if "public_corpus" not in config:
        config["public_corpus"] = write_tiny_corpus(tmp_path / "public.txt")
    cfg = ServerConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0", device="cpu", **config)
    return create_server(cfg, fm=fm)


def package_bytes(fm: FoundationModel, labels: list[str], spec: str = "linear") -> bytes:
    """An encoded, valid small-model package for `labels`, with class statistics (4 rows per label)."""
    torch.manual_seed(0)
    model = SmallModel(parse_spec(spec), fm.feature_dim, len(labels))
    bank = StatsBank(fm.feature_dim)
    bank.add_features(torch.randn(4 * len(labels), fm.feature_dim), [y for y in labels for _ in range(4)])
    return encode_package(
        KnowledgePackage.from_model(model, labels, fm.digest, "small", [4] * len(labels), bank)
    )


# -- real server processes (fault and soak tests) ---------------------------------------------------------
enroll = issue_token  # a token in process: `fcl-server enroll` has its own tests, this saves a process start
ACCEPTED = re.compile(r"upload (\S+) of (\S+) accepted: (\d+) bytes \((\d+) resumed")


def serve(state: Path, log: Path, tmp: Path, *extra: str) -> ServerProcess:
    """`fcl-server serve` with a tiny public corpus (jobs take about a second) and no upload-rate limit."""
    corpus = tmp / "public.txt"
    if not corpus.exists():
        write_tiny_corpus(corpus)
    return start_server(state, log, "--public-corpus", str(corpus), "--uploads-per-minute", "0", *extra)


def wait_until(check: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def held_parts(state: Path, client: str) -> dict[str, int]:
    """upload id → bytes the server holds of each unfinished upload of `client` (on disk)."""
    root = state / "partial-uploads" / client
    return {p.stem: p.stat().st_size for p in root.glob("*.part")} if root.is_dir() else {}


def accepted(log: Path) -> dict[str, tuple[int, int]]:
    """upload id → (size, bytes resumed from an earlier stream), from a server log."""
    return {m[1]: (int(m[3]), int(m[4])) for m in ACCEPTED.finditer(log.read_text())}


def predict_offline(work_dir: Path, *texts: str) -> list[dict[str, Any]]:
    """`fcl-client predict --json` in its own process: a trained client's answers from its work dir."""
    cmd = [sys.executable, "-m", "fcl_client.cli", "predict", "--work-dir", str(work_dir), "--json", *texts]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    answers: list[dict[str, Any]] = json.loads(out.stdout)
    return answers


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A one-day EC certificate for localhost and 127.0.0.1 (cert.pem, key.pem in `directory`): for HTTPS
    servers the tests trust by that file."""
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        cwd=directory,
        check=True,
        capture_output=True,
    )
    return directory / "cert.pem", directory / "key.pem"
