"""A client's continual learner: small model, local statistics bank and personalised FM head."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.algorithms.obod import Head
from common.algorithms.smcf import AssistHead, TaskData, consolidate, snapshot, train_task
from common.algorithms.stats import StatsBank
from common.config import SMCFConfig
from common.metrics import head_accuracy
from common.package import KnowledgePackage, decode_package, decode_stats, encode_package, encode_stats
from common.zoo import ModelSpec, SmallModel


@dataclass
class Learner:
    spec: ModelSpec
    feature_dim: int
    fm_digest: str
    labels: list[str] = field(default_factory=list)
    model: SmallModel | None = None
    bank: StatsBank | None = None
    task_bank: StatsBank | None = None  # statistics of the last task only: what an upload shares
    task_counts: dict[str, int] = field(default_factory=dict)
    personal: Head | None = None
    personal_version: int = 0

    def __post_init__(self) -> None:
        self.bank = self.bank or StatsBank(self.feature_dim)

    def train(
        self,
        features: torch.Tensor,
        labels: list[str],
        cfg: SMCFConfig,
        seed: int = 0,
        on_epoch: Callable[[int, int], None] | None = None,
    ) -> None:
        """Learn one task with SMCF, then fold its statistics into the local bank."""
        assert self.bank is not None
        prev = snapshot(self.model) if self.model is not None else None
        known = set(self.labels)
        self.labels += [y for y in dict.fromkeys(labels) if y not in known]
        if self.model is None:
            self.model = SmallModel(self.spec, self.feature_dim, len(self.labels))
        self.model.grow(len(self.labels))
        assist = AssistHead(self.personal.model, self.personal.labels) if self.personal else None
        train_task(
            self.model, self.labels, TaskData(features, labels), self.bank, cfg, prev, assist, seed, on_epoch
        )
        self.task_bank = StatsBank(self.feature_dim, cfg.stats_rank)
        self.task_bank.add_features(features, labels)
        self.task_counts = dict(Counter(labels))
        self.bank.merge_bank(self.task_bank)

    def package(self, cfg: SMCFConfig, seed: int = 0) -> KnowledgePackage:
        """What leaves the client: spec, weights, label names, class counts and (optionally) statistics."""
        if self.model is None:
            raise RuntimeError("nothing to upload before the first task is trained")
        stats = None
        if cfg.share_stats and self.task_bank is not None:
            stats = self.task_bank
            if cfg.stats_noise > 0:
                stats = stats.noised(cfg.stats_noise, torch.Generator().manual_seed(seed))
        counts = [self.task_counts.get(y, 0) for y in self.labels]
        return KnowledgePackage.from_model(self.model, self.labels, self.fm_digest, "small", counts, stats)

    def set_personal(self, data: bytes, version: int) -> None:
        pkg = decode_package(data)
        self.personal = Head(pkg.build(), pkg.labels)
        self.personal_version = version

    def absorb_personal(self, head: Head, version: int, cfg: SMCFConfig, seed: int = 0) -> None:
        """Install a newly received P_c and (with cfg.consolidate_steps) pull the small model towards it."""
        self.personal, self.personal_version = head, version
        if self.model is not None and self.bank is not None:
            consolidate(self.model, self.labels, self.bank, AssistHead(head.model, head.labels), cfg, seed)

    # -- evaluation and prediction ---------------------------------------------------------------
    def small_accuracy(self, features: torch.Tensor, labels: list[str]) -> float:
        """Class-incremental accuracy of the small model (argmax over every label it has seen)."""
        assert self.model is not None
        return head_accuracy(self.model, self.labels, features, labels)

    def personal_accuracy(self, features: torch.Tensor, labels: list[str]) -> float | None:
        if self.personal is None:
            return None
        return head_accuracy(self.personal.model, self.personal.labels, features, labels)

    @torch.no_grad()
    def predict(
        self, features: torch.Tensor, top: int = 5, head: str = "small"
    ) -> list[list[tuple[str, float]]]:
        model, names = (
            (self.model, self.labels)
            if head == "small"
            else ((self.personal.model, self.personal.labels) if self.personal else (None, []))
        )
        if model is None:
            raise RuntimeError(f"no {head} model yet: run at least one task first")
        probs = torch.softmax(model(features), dim=1)
        values, idx = probs.topk(min(top, probs.shape[1]), dim=1)
        return [
            [(names[int(i)], float(v)) for v, i in zip(vs, ids, strict=True)]
            for vs, ids in zip(values, idx, strict=True)
        ]

    # -- checkpoint ------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the learner atomically (each file via temp + rename; meta.json last)."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.model is not None:
            _atomic_write(
                directory / "model.safetensors",
                encode_package(KnowledgePackage.from_model(self.model, self.labels, self.fm_digest)),
            )
        if self.bank is not None and self.bank.stats:
            _atomic_write(directory / "bank.safetensors", encode_stats(self.bank))
        if self.personal is not None:
            _atomic_write(
                directory / "personal.safetensors",
                encode_package(
                    KnowledgePackage.from_model(
                        self.personal.model, self.personal.labels, self.fm_digest, "head"
                    )
                ),
            )
        meta = {
            "spec": self.spec.model_dump(),
            "feature_dim": self.feature_dim,
            "fm_digest": self.fm_digest,
            "labels": self.labels,
            "personal_version": self.personal_version,
            "task_counts": self.task_counts,
        }
        _atomic_write(directory / "meta.json", json.dumps(meta, indent=1).encode())

    @classmethod
    def load(cls, directory: Path) -> Learner:
        meta = json.loads((directory / "meta.json").read_text())
        learner = cls(
            ModelSpec.model_validate(meta["spec"]),
            int(meta["feature_dim"]),
            meta["fm_digest"],
            list(meta["labels"]),
            task_counts=dict(meta.get("task_counts", {})),
        )
        if (directory / "model.safetensors").exists():
            learner.model = decode_package((directory / "model.safetensors").read_bytes()).build()
        if (directory / "bank.safetensors").exists():
            learner.bank = decode_stats((directory / "bank.safetensors").read_bytes())
        if (directory / "personal.safetensors").exists():
            learner.set_personal(
                (directory / "personal.safetensors").read_bytes(), int(meta["personal_version"])
            )
        return learner


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
