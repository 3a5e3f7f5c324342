"""One-by-One Distillation of each uploaded small model into the FM's global and personal heads."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.algorithms.losses import column_index, kd_loss
from common.algorithms.stats import StatsBank
from common.config import OBODConfig
from common.zoo import SmallModel, parse_spec


@dataclass
class Head:
    """An FM knowledge head (G or P_c): a model over FM features and the label of each output column."""

    model: SmallModel
    labels: list[str]

    def copy(self) -> Head:
        return Head(copy.deepcopy(self.model), list(self.labels))


@dataclass
class Teacher:
    """An uploaded small model with its label names (its output columns)."""

    model: SmallModel
    labels: list[str]


class Cancelled(Exception):
    """The caller asked the job to stop (e.g. server shutdown); nothing it computed is to be used."""


@dataclass
class JobOutcome:
    global_head: Head
    personal_head: Head
    bank: StatsBank


def run_job(
    global_head: Head | None,
    bank: StatsBank,
    teacher: Teacher,
    teacher_stats: StatsBank | None,
    public: torch.Tensor,
    cfg: OBODConfig,
    seed: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> JobOutcome:
    """One OBOD job (DESIGN §3.2 steps 1-4): merge the upload's statistics, update G, personalise P_c.

    Inputs are not modified; the server persists the outcome atomically, the benchmark keeps it in memory.
    """
    merged = StatsBank(bank.dim)
    merged.merge_bank(bank)
    if teacher_stats is not None:
        merged.merge_bank(teacher_stats)
    new_global = distill_global(global_head, teacher, public, merged, cfg, seed=seed, cancel=cancel)
    personal = personalise(new_global, teacher, public, merged, cfg, seed=seed, cancel=cancel)
    return JobOutcome(new_global, personal, merged)


def distill_global(
    head: Head | None,
    teacher: Teacher,
    public: torch.Tensor,
    bank: StatsBank,
    cfg: OBODConfig,
    seed: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> Head:
    """G ← one OBOD step with `teacher`: KD on the public features, anchor on other labels, bank CE."""
    if head is None:
        model = SmallModel(parse_spec(cfg.head_spec), public.shape[1], len(teacher.labels))
        head = Head(model, [])
    new = head.copy()
    known = set(head.labels)
    new.labels += [y for y in teacher.labels if y not in known]
    new.model.grow(len(new.labels))
    _fit(new, head, teacher, public, bank, bank.labels(), cfg, cfg.epochs, seed, cancel)
    return new


def personalise(
    global_head: Head,
    teacher: Teacher,
    public: torch.Tensor,
    bank: StatsBank,
    cfg: OBODConfig,
    seed: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> Head:
    """P_c ← the new G, fitted further to client c's teacher (anchored to G on the other labels)."""
    personal = global_head.copy()
    if cfg.personal_epochs > 0:
        _fit(
            personal,
            global_head,
            teacher,
            public,
            bank,
            bank.labels(),
            cfg,
            cfg.personal_epochs,
            seed + 1,
            cancel,
        )
    return personal


def _fit(
    student: Head,
    anchor: Head,
    teacher: Teacher,
    public: torch.Tensor,
    bank: StatsBank,
    proto_labels: list[str],
    cfg: OBODConfig,
    epochs: int,
    seed: int,
    cancel: Callable[[], bool] | None = None,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    device = next(student.model.parameters()).device
    teacher_cols = column_index(student.labels, teacher.labels).to(device)
    taught = set(teacher.labels)
    kept = [y for y in anchor.labels if y not in taught]
    kept_student, kept_anchor = (
        column_index(student.labels, kept).to(device),
        column_index(anchor.labels, kept),
    )
    student_labels = set(student.labels)
    proto_labels = [y for y in proto_labels if y in student_labels]
    sampler = bank.sampler(proto_labels) if proto_labels else None
    proto_cols = column_index(student.labels, proto_labels)

    with torch.no_grad():
        u = public.to(device)
        teacher_logits = _batched(teacher.model.eval(), u)
        anchor_logits = _batched(anchor.model.eval(), u)[:, kept_anchor.to(device)] if kept else None

    opt = torch.optim.Adam(student.model.parameters(), lr=cfg.lr)
    student.model.train()
    # a small public corpus must not mean a handful of optimizer steps: train for at least min_steps
    steps = max(cfg.min_steps, epochs * max(1, (len(u) + cfg.batch_size - 1) // cfg.batch_size))
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if cancel is not None and cancel():
            raise Cancelled("distillation cancelled")
        if len(order) < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(u), generator=gen)])
        idx, order = order[: cfg.batch_size].to(device), order[cfg.batch_size :]
        logits = student.model(u[idx])
        student_taught = logits[:, teacher_cols]
        target = teacher_logits[idx]
        if cfg.kd_standardize:
            target, student_taught = _zscore(target), _zscore(student_taught)
        loss = cfg.lambda_kd * kd_loss(target, student_taught, cfg.temperature)
        if anchor_logits is not None and cfg.lambda_anchor > 0:
            loss = loss + cfg.lambda_anchor * F.mse_loss(logits[:, kept_student], anchor_logits[idx])
        if sampler is not None and cfg.lambda_proto > 0:
            which = torch.randint(len(proto_labels), (cfg.proto_batch,), generator=gen)
            feats = sampler.draw(which, gen).to(device)
            target = proto_cols[which].to(device)
            loss = loss + cfg.lambda_proto * F.cross_entropy(student.model(feats), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.model.eval()


def _zscore(logits: torch.Tensor) -> torch.Tensor:
    """Per-row standardised logits: KD then compares rankings, not the scales of different models."""
    return (logits - logits.mean(dim=1, keepdim=True)) / logits.std(dim=1, keepdim=True).clamp_min(1e-6)


def _batched(model: SmallModel, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
