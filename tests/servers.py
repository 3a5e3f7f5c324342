"""Test helpers: an in-process server on port 0 and valid knowledge packages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.algorithms.stats import StatsBank
from common.fm import FoundationModel
from common.package import KnowledgePackage, encode_package
from common.zoo import SmallModel, parse_spec
from fcl_server.app import RunningServer, ServerConfig, create_server


def inprocess_server(tmp_path: Path, fm: FoundationModel, **config: Any) -> RunningServer:
    """A real gRPC server on 127.0.0.1:0 sharing the session's FM; a tiny public corpus unless given."""
    if "public_corpus" not in config:
        corpus = tmp_path / "public.txt"
        corpus.write_text("\n".join(f"public sentence number {i} about topic {i % 7}" for i in range(64)))
        config["public_corpus"] = corpus
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
