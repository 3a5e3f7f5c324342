"""Out-of-scope abstention: a confidence score per prediction, a threshold calibrated on held-out in-scope
data alone (real deployments have no out-of-scope examples to calibrate on), and `apply` (docs/abstention.md).

A threshold keeps a chosen fraction (`coverage`, default 95%) of held-out in-scope examples: scores below
it are answered `out_of_scope`. Calibrating on in-scope data needs nothing from the traffic to come, so
the same rule serves every deployment; what it costs is that ~5% of in-scope queries abstain by design.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from common.algorithms.stats import StatsBank

OUT_OF_SCOPE = "out_of_scope"
Score = Literal["msp", "energy"]
SCORES: tuple[str, ...] = ("msp", "energy")
DEFAULT_SCORE: Score = "msp"  # chosen on CLINC150 val + oos_val (docs/abstention.md)
DEFAULT_COVERAGE = 0.95
DEFAULT_HOLDOUT = 0.2  # fraction of a task's training examples a client's calibration copy does not see
STATS_DRAWS_PER_LABEL = 64  # pseudo-features per label a server head is calibrated on
MAX_SOURCE_CHARS = 64


class AbstentionError(ValueError):
    """A threshold or its description is malformed; the message says what is wrong."""


@dataclass(frozen=True)
class Threshold:
    """A calibrated abstention threshold: answer `out_of_scope` where `score` < `value`."""

    value: float
    score: str = DEFAULT_SCORE
    coverage: float = DEFAULT_COVERAGE  # the fraction of held-out in-scope examples it keeps
    source: str = ""  # what it was calibrated on, e.g. "holdout", "stats", "val+oos_val"
    samples: int = 0  # held-out examples it was calibrated on

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise AbstentionError(f"threshold value must be a finite number, not {self.value}")
        if self.score not in SCORES:
            raise AbstentionError(f"threshold score {self.score!r} is not one of {SCORES}")
        if not 0.0 < self.coverage <= 1.0:
            raise AbstentionError(f"threshold coverage must be in (0, 1], not {self.coverage}")
        if len(self.source) > MAX_SOURCE_CHARS:
            raise AbstentionError(f"threshold source is over {MAX_SOURCE_CHARS} characters")
        if self.samples < 0:
            raise AbstentionError(f"threshold samples must be >= 0, not {self.samples}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Threshold:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AbstentionError("threshold is not JSON") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: object) -> Threshold:
        if not isinstance(raw, dict) or set(raw) - {"value", "score", "coverage", "source", "samples"}:
            raise AbstentionError("threshold must be an object of value, score, coverage, source, samples")
        value, coverage, samples = (
            raw.get("value"),
            raw.get("coverage", DEFAULT_COVERAGE),
            raw.get("samples", 0),
        )
        score, source = raw.get("score", DEFAULT_SCORE), raw.get("source", "")
        if (
            not isinstance(value, int | float)
            or not isinstance(coverage, int | float)
            or isinstance(value, bool)
        ):
            raise AbstentionError("threshold value and coverage must be numbers")
        if type(samples) is not int or not isinstance(score, str) or not isinstance(source, str):
            raise AbstentionError("threshold samples must be an integer, score and source strings")
        return cls(float(value), score, float(coverage), source, samples)


def confidence(logits: torch.Tensor, score: str = DEFAULT_SCORE) -> torch.Tensor:
    """Per-row confidence, higher = more in-scope: the top softmax probability (msp) or the negative
    free energy logsumexp(logits) (energy, Liu et al. 2020)."""
    if score == "msp":
        return torch.softmax(logits.float(), dim=1).max(dim=1).values
    if score == "energy":
        return torch.logsumexp(logits.float(), dim=1)
    raise AbstentionError(f"unknown confidence score {score!r}; use one of {SCORES}")


def calibrate_threshold(scores_in_scope: torch.Tensor, target_coverage: float = DEFAULT_COVERAGE) -> float:
    """The largest threshold that keeps at least `target_coverage` of these in-scope scores (score >= it).

    Needs no out-of-scope data: it fixes the in-scope abstention rate, whatever the unknown traffic is.
    """
    if not 0.0 < target_coverage <= 1.0:
        raise AbstentionError(f"target coverage must be in (0, 1], not {target_coverage}")
    flat = scores_in_scope.detach().float().flatten()
    if flat.numel() == 0:
        raise AbstentionError("no held-out in-scope scores to calibrate a threshold on")
    ordered = flat.sort().values
    # keeping rows [k:] keeps n - k >= coverage·n of them; k as large as that allows
    k = math.floor((1.0 - target_coverage) * len(ordered) + 1e-9)
    return float(ordered[min(k, len(ordered) - 1)])


def calibrate(
    logits_in_scope: torch.Tensor,
    coverage: float = DEFAULT_COVERAGE,
    score: str = DEFAULT_SCORE,
    source: str = "",
) -> Threshold:
    """A Threshold from a model's logits on held-out in-scope examples."""
    scores = confidence(logits_in_scope, score)
    return Threshold(calibrate_threshold(scores, coverage), score, coverage, source, int(scores.numel()))


def abstains(logits: torch.Tensor, threshold: Threshold | None) -> torch.Tensor:
    """Per-row: True where the prediction is out of scope (never without a threshold)."""
    if threshold is None:
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    return confidence(logits, threshold.score) < threshold.value


def apply(logits: torch.Tensor, labels: list[str], threshold: Threshold | None) -> list[str]:
    """The top label of each row, or OUT_OF_SCOPE where its confidence is below the threshold."""
    top = logits.argmax(dim=1).tolist()
    out = abstains(logits, threshold).tolist()
    return [OUT_OF_SCOPE if o else labels[int(i)] for i, o in zip(top, out, strict=True)]


def holdout_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows to train on and rows held out, stratified by label; a label of one example is never held out."""
    if not 0.0 < fraction < 1.0:
        raise AbstentionError(f"held-out fraction must be in (0, 1), not {fraction}")
    gen = torch.Generator().manual_seed(seed + 4242)
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    train, held = [], []
    for y in sorted(by_label):
        rows = by_label[y]
        n_held = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
        order = [rows[int(j)] for j in torch.randperm(len(rows), generator=gen)]
        held += order[:n_held]
        train += order[n_held:]
    return sorted(train), sorted(held)


def stats_features(
    bank: StatsBank, labels: list[str], per_label: int = STATS_DRAWS_PER_LABEL, seed: int = 0
) -> torch.Tensor:
    """Pseudo-features drawn from the bank's Gaussians of those `labels` it describes (fresh draws: not the
    ones a head was trained on). Empty when it describes none of them."""
    described = [y for y in labels if y in bank]
    if not described or per_label <= 0:
        return torch.empty(0, bank.dim)
    feats, _ = bank.sample(described, per_label, torch.Generator().manual_seed(seed + 9001))
    return feats


@torch.no_grad()
def calibrate_on_stats(
    model: torch.nn.Module,
    labels: list[str],
    bank: StatsBank,
    coverage: float = DEFAULT_COVERAGE,
    score: str = DEFAULT_SCORE,
    per_label: int = STATS_DRAWS_PER_LABEL,
    seed: int = 0,
) -> Threshold | None:
    """A server head's threshold from the statistics bank (None where it describes none of its labels)."""
    feats = stats_features(bank, labels, per_label, seed)
    if not len(feats):
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = torch.cat([model(feats[i : i + 4096].to(device)).cpu() for i in range(0, len(feats), 4096)])
    model.train(was_training)
    return calibrate(logits, coverage, score, "stats")
