"""OBOD job time (obod.run_job) as the public corpus and the label count grow, and a fitted cost model."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from benchmarks.perf.util import timed
from common.algorithms.losses import adam
from common.algorithms.obod import Head, Teacher, run_job
from common.algorithms.stats import StatsBank
from common.config import OBODConfig, SMCFConfig
from common.zoo import SmallModel, parse_spec

DIM = 384
TEACHER_SPEC = "mlp:256"
PER_LABEL = 24  # synthetic examples per label behind each label's statistics


def _examples(labels: list[str], gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    centers = torch.randn(len(labels), DIM, generator=gen)
    feats = centers.repeat_interleave(PER_LABEL, 0) + 0.3 * torch.randn(
        len(labels) * PER_LABEL, DIM, generator=gen
    )
    return torch.nn.functional.normalize(feats, dim=1), [y for y in labels for _ in range(PER_LABEL)]


def _bank(features: torch.Tensor, names: list[str]) -> StatsBank:
    bank = StatsBank(DIM, SMCFConfig().stats_rank)  # the rank clients send by default
    bank.add_features(features, names)
    return bank


def _trained_teacher(features: torch.Tensor, names: list[str], labels: list[str]) -> SmallModel:
    """A teacher fitted to its labels' examples, as an upload is: inverting an untrained model would
    run every point to the step limit, a cost no real job pays."""
    model = SmallModel(parse_spec(TEACHER_SPEC), DIM, len(labels))
    target = torch.tensor([labels.index(y) for y in names])
    opt = adam(model.parameters(), 1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model(features), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def setup(public_n: int, num_labels: int, seed: int = 0) -> dict[str, Any]:
    """The last job of a 5-task stream: G knows 4/5 of the labels, the upload teaches the other 1/5."""
    gen = torch.Generator().manual_seed(seed)
    labels = [f"label_{i}" for i in range(num_labels)]
    taught = max(1, num_labels // 5)
    old, new = labels[: num_labels - taught], labels[num_labels - taught :]
    head = Head(SmallModel(parse_spec("linear"), DIM, len(old)), old) if old else None
    public = torch.nn.functional.normalize(torch.randn(public_n, DIM, generator=gen), dim=1)
    new_x, new_y = _examples(new, gen)
    teacher = Teacher(_trained_teacher(new_x, new_y, new), new, {y: PER_LABEL for y in new})
    return {
        "head": head,
        "bank": _bank(*_examples(old, gen)) if old else StatsBank(DIM),
        "teacher": teacher,
        "teacher_stats": _bank(new_x, new_y),
        "public": public,
    }


def steps_of(public_n: int, cfg: OBODConfig) -> int:
    """Optimizer steps of one job: the global fit plus the personal fit (obod._fit's rule)."""
    per_epoch = max(1, math.ceil(public_n / cfg.batch_size))
    personal = max(cfg.min_steps, cfg.personal_epochs * per_epoch) if cfg.personal_epochs > 0 else 0
    return max(cfg.min_steps, cfg.epochs * per_epoch) + personal


def time_job(public_n: int, num_labels: int, cfg: OBODConfig, repeat: int, with_stats: bool = True) -> float:
    """Best-of-`repeat` seconds of one job; `with_stats=False`: the upload has no statistics (the
    `--no-share-stats` mode), so the job also inverts the teacher for every label it teaches."""
    s = setup(public_n, num_labels)
    stats = s["teacher_stats"] if with_stats else None
    run_once = lambda: run_job(s["head"], s["bank"], s["teacher"], stats, s["public"], cfg)  # noqa: E731
    return min(timed(run_once)[0] for _ in range(max(1, repeat)))


def fit_cost_model(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Least squares: seconds ≈ steps·(b + c·labels) + d·public (steps = optimizer steps of the job).

    Per step: a batch of public features and one of pseudo-features through the head, backward, Adam;
    per public row: the teacher's and the anchor's logits, computed once per fit.
    """
    x = np.array([[p["steps"], p["steps"] * p["labels"], p["public"]] for p in points], dtype=float)
    y = np.array([p["seconds"] for p in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    b, c, d = (float(v) for v in coef)
    return {
        "formula": "seconds = steps*(b + c*labels) + d*public",
        "b_ms_per_step": b * 1e3,
        "c_us_per_step_label": c * 1e6,
        "d_us_per_public_row": d * 1e6,
        "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "max_abs_error_s": float(np.abs(y - pred).max()),
        "steps_rule": "max(min_steps, epochs*ceil(public/batch)) + max(min_steps, personal_epochs*ceil(...))",
    }


def run(corpus_sizes: list[int], label_counts: list[int], repeat: int) -> dict[str, Any]:
    cfg = OBODConfig()
    points = []
    for public_n in corpus_sizes:
        for labels in label_counts:
            seconds = time_job(public_n, labels, cfg, repeat)
            points.append(
                {"public": public_n, "labels": labels, "steps": steps_of(public_n, cfg), "seconds": seconds}
            )
    model = fit_cost_model(points) if len(points) >= 3 else None
    target = next((p["seconds"] for p in points if (p["public"], p["labels"]) == (15_000, 150)), None)
    no_stats = time_job(15_000, 150, cfg, repeat, with_stats=False) if target is not None else None
    return {
        "what": (
            "run_job on synthetic L2-normalised 384-d public features; the job is the last of a 5-task "
            f"stream: G (linear head) knows 4/5 of the labels with rank-{SMCFConfig().stats_rank} "
            f"statistics, the upload (an {TEACHER_SPEC} teacher trained on its labels, with statistics) "
            "teaches the other 1/5; "
            f"default OBODConfig; best of {repeat}"
        ),
        "config": cfg.model_dump(),
        "torch_threads": torch.get_num_threads(),
        "points": points,
        "cost_model": model,
        "job_s_15k_150": target,
        "job_s_15k_150_no_stats": no_stats,
    }
