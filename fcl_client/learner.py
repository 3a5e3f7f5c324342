"""A client's continual learner: small model, local statistics bank and personalised FM head."""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.algorithms.abstention import Threshold, abstains, calibrate, confidence, holdout_split
from common.algorithms.obod import Head
from common.algorithms.smcf import AssistHead, TaskData, consolidate, snapshot, train_task
from common.algorithms.stats import StatsBank
from common.config import AbstentionConfig, SMCFConfig
from common.metrics import head_accuracy
from common.package import KnowledgePackage, decode_package, decode_stats, encode_package, encode_stats
from common.zoo import ModelSpec, SmallModel
from fcl_client.durable import atomic_write


@dataclass(frozen=True)
class Prediction:
    """One text's ranking, and whether the head abstains on it (its confidence below the threshold)."""

    ranked: list[tuple[str, float]]
    out_of_scope: bool
    confidence: float  # the threshold's score (top probability for msp); nan without a threshold
    threshold: Threshold | None


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
    abstention: AbstentionConfig = field(default_factory=AbstentionConfig)  # how to calibrate (not saved)
    small_threshold: Threshold | None = None  # the small model's, from the last task's held-out slice
    personal_threshold: Threshold | None = None  # P_c's, calibrated here on the same slice
    calibration_s: float = 0.0  # seconds the last task's calibration copy took (its cost)
    _holdout: TaskData | None = field(default=None, repr=False)  # the last task's held-out slice

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
        before = copy.deepcopy(self.model) if self.abstention.enabled else None
        train_task(
            self.model, self.labels, TaskData(features, labels), self.bank, cfg, prev, assist, seed, on_epoch
        )
        if before is not None:
            self.small_threshold = self._calibration_copy(before, features, labels, cfg, prev, assist, seed)
        self.task_bank = StatsBank(self.feature_dim, cfg.stats_rank)
        self.task_bank.add_features(features, labels)
        self.task_counts = dict(Counter(labels))
        self.bank.merge_bank(self.task_bank)

    def holdout(self, features: torch.Tensor, labels: list[str], seed: int = 0) -> TaskData:
        """The task's held-out slice (deterministic in `seed`): what thresholds are calibrated on."""
        _, held = holdout_split(labels, self.abstention.holdout, seed)
        rows = torch.tensor(held, dtype=torch.long)
        return TaskData(features[rows], [labels[i] for i in held])

    def _calibration_copy(
        self,
        before: SmallModel,
        features: torch.Tensor,
        labels: list[str],
        cfg: SMCFConfig,
        prev: SmallModel | None,
        assist: AssistHead | None,
        seed: int,
    ) -> Threshold | None:
        """The small model's threshold: a copy of it as it was before this task, trained the same way on
        all but a held-out slice, scores that slice. The model itself has learnt from every example, so it
        is a little more confident than the copy: the threshold errs towards answering (docs/abstention.md).
        Costs a second training of the task; the global RNG is left as it was, so the model is unchanged."""
        started = time.perf_counter()
        train_rows, held = holdout_split(labels, self.abstention.holdout, seed)
        self._holdout = None
        if not held:
            return None
        rows = torch.tensor(train_rows, dtype=torch.long)
        assert self.bank is not None
        with torch.random.fork_rng(devices=[]):
            train_task(
                before,
                self.labels,
                TaskData(features[rows], [labels[i] for i in train_rows]),
                self.bank,
                cfg,
                prev,
                assist,
                seed,
            )
        self._holdout = self.holdout(features, labels, seed)
        device = next(before.parameters()).device
        with torch.no_grad():
            logits = before(self._holdout.features.to(device)).cpu()
        self.calibration_s = time.perf_counter() - started
        return calibrate(logits, self.abstention.coverage, self.abstention.score, "holdout")

    def calibrate_personal(self, held: TaskData | None = None) -> Threshold | None:
        """P_c's threshold on the task's held-out slice (given, or kept from `train` in this process).

        Those examples reached P_c only through their label's mean and covariance, never as inputs."""
        held = held if held is not None else self._holdout
        if not self.abstention.enabled or self.personal is None or held is None or not held.labels:
            return self.personal_threshold
        with torch.no_grad():
            logits = self.personal.model(held.features).cpu()
        self.personal_threshold = calibrate(
            logits, self.abstention.coverage, self.abstention.score, "holdout"
        )
        return self.personal_threshold

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
        self.personal = Head(pkg.build(), pkg.labels, pkg.abstention)
        self.personal_version = version

    def absorb_personal(
        self, head: Head, version: int, cfg: SMCFConfig, seed: int = 0, held: TaskData | None = None
    ) -> None:
        """Install a newly received P_c and (with cfg.consolidate_steps) pull the small model towards it;
        then calibrate P_c's threshold on the task's held-out slice (`held`, or the one `train` kept)."""
        self.personal, self.personal_version = head, version
        self.personal_threshold = None  # the old one was P_c's previous weights'
        if self.model is not None and self.bank is not None:
            consolidate(self.model, self.labels, self.bank, AssistHead(head.model, head.labels), cfg, seed)
        self.calibrate_personal(held)

    # -- evaluation and prediction ---------------------------------------------------------------
    def small_accuracy(self, features: torch.Tensor, labels: list[str]) -> float:
        """Class-incremental accuracy of the small model (argmax over every label it has seen)."""
        assert self.model is not None
        return head_accuracy(self.model, self.labels, features, labels)

    def personal_accuracy(self, features: torch.Tensor, labels: list[str]) -> float | None:
        if self.personal is None:
            return None
        return head_accuracy(self.personal.model, self.personal.labels, features, labels)

    def threshold(self, head: str = "small") -> Threshold | None:
        """The abstention threshold `head` answers with: this client's own calibration, else (P_c) the
        server's; None = never abstain (e.g. a checkpoint from before abstention existed)."""
        if head == "small":
            return self.small_threshold
        if self.personal_threshold is not None:
            return self.personal_threshold
        return self.personal.abstention if self.personal is not None else None

    def _head(self, head: str) -> tuple[torch.nn.Module, list[str]]:
        model, names = (
            (self.model, self.labels)
            if head == "small"
            else ((self.personal.model, self.personal.labels) if self.personal else (None, []))
        )
        if model is None:
            raise RuntimeError(f"no {head} model yet: run at least one task first")
        return model, names

    @torch.no_grad()
    def predict(
        self, features: torch.Tensor, top: int = 5, head: str = "small"
    ) -> list[list[tuple[str, float]]]:
        """The raw top-`top` ranking of each row (no abstention)."""
        return [p.ranked for p in self.predict_scoped(features, top, head, abstain=False)]

    @torch.no_grad()
    def predict_scoped(
        self, features: torch.Tensor, top: int = 5, head: str = "small", abstain: bool = True
    ) -> list[Prediction]:
        """Rankings with an out-of-scope verdict per row (never with `abstain` False or no threshold)."""
        model, names = self._head(head)
        logits = model(features)
        probs = torch.softmax(logits, dim=1)
        values, idx = probs.topk(min(top, probs.shape[1]), dim=1)
        threshold = self.threshold(head) if abstain else None
        out = abstains(logits, threshold).tolist()
        conf = confidence(logits, threshold.score).tolist() if threshold else [float("nan")] * len(out)
        return [
            Prediction([(names[int(i)], float(v)) for v, i in zip(vs, ids, strict=True)], o, c, threshold)
            for vs, ids, o, c in zip(values, idx, out, conf, strict=True)
        ]

    # -- checkpoint ------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the learner atomically (each file via temp + rename; meta.json last)."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.model is not None:
            atomic_write(
                directory / "model.safetensors",
                encode_package(KnowledgePackage.from_model(self.model, self.labels, self.fm_digest)),
            )
        if self.bank is not None and self.bank.stats:
            atomic_write(directory / "bank.safetensors", encode_stats(self.bank))
        if self.personal is not None:
            atomic_write(
                directory / "personal.safetensors",
                encode_package(
                    KnowledgePackage.from_model(
                        self.personal.model,
                        self.personal.labels,
                        self.fm_digest,
                        "head",
                        abstention=self.personal.abstention,
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
            "abstention": {
                "small": _threshold_dict(self.small_threshold),
                "personal": _threshold_dict(self.personal_threshold),
            },
        }
        atomic_write(directory / "meta.json", json.dumps(meta, indent=1).encode())

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
        thresholds = meta.get("abstention", {})  # absent in checkpoints from before abstention
        learner.small_threshold = _threshold_of(thresholds.get("small"))
        learner.personal_threshold = _threshold_of(thresholds.get("personal"))
        return learner


def _threshold_dict(threshold: Threshold | None) -> dict[str, object] | None:
    return None if threshold is None else json.loads(threshold.to_json())


def _threshold_of(raw: object) -> Threshold | None:
    return None if raw is None else Threshold.from_dict(raw)
