"""Small Model Continual Fine-tuning: class-statistics replay + LwF + FM assistance (DESIGN §3.1)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.algorithms.losses import adam, column_index, kd_loss
from common.algorithms.stats import StatsBank
from common.config import SMCFConfig
from common.zoo import SmallModel


@dataclass
class AssistHead:
    """The personalised FM head P_c as a teacher: its logits and the label of each column."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    labels: list[str]


@dataclass
class TaskData:
    features: torch.Tensor  # (N, D) FM features of the task's training texts
    labels: list[str]  # label name of each row


def train_task(
    model: SmallModel,
    model_labels: list[str],
    task: TaskData,
    bank: StatsBank,
    cfg: SMCFConfig,
    prev_model: SmallModel | None = None,
    assist: AssistHead | None = None,
    seed: int = 0,
    on_epoch: Callable[[int, int], None] | None = None,
) -> None:
    """Train `model` (output columns = `model_labels`) on one task in place.

    `bank` holds the statistics of labels seen in earlier tasks; `prev_model` is the snapshot taken at
    the end of the previous task (its columns are the first columns of `model_labels`). `on_epoch`
    is told (epochs done, epochs) after each epoch, e.g. to draw a progress bar.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    label_pos = {name: i for i, name in enumerate(model_labels)}
    real_y = torch.tensor([label_pos[y] for y in task.labels], dtype=torch.long)
    current = set(task.labels)
    old_labels = [y for y in bank.labels() if y not in current and y in label_pos] if cfg.replay else []
    per_label = max(1, round(len(task.labels) / max(1, len(current))))
    prev_cols = prev_model.num_labels if prev_model is not None else 0
    assist_cols, assist_src = _assist_columns(assist, model_labels)

    opt = adam(model.parameters(), cfg.lr, cfg.weight_decay)
    model.train()
    sampler = bank.sampler(old_labels) if old_labels else None
    old_cols = column_index(model_labels, old_labels) if old_labels else None
    batches_per_epoch = max(1, -(-(len(real_y) + per_label * len(old_labels)) // cfg.batch_size))
    # few examples must not mean few optimizer steps: stretch the epochs to at least min_steps
    epochs = max(cfg.epochs, -(-cfg.min_steps // batches_per_epoch))
    for epoch in range(epochs):
        feats, ys = task.features, real_y
        if sampler is not None and old_cols is not None:
            which = torch.arange(len(old_labels)).repeat_interleave(per_label)
            feats = torch.cat([feats, sampler.draw(which, gen)])
            ys = torch.cat([ys, old_cols[which]])
        order = torch.randperm(len(ys), generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x, y = feats[idx].to(device), ys[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if prev_model is not None and cfg.lambda_old > 0 and prev_cols > 1:
                with torch.no_grad():
                    old_logits = prev_model(x)
                loss = loss + cfg.lambda_old * kd_loss(old_logits, logits[:, :prev_cols], cfg.temperature)
            if assist is not None and cfg.lambda_fm > 0 and len(assist_cols) > 1:
                with torch.no_grad():
                    fm_logits = assist.forward(x)[:, assist_src.to(device)]
                loss = loss + cfg.lambda_fm * kd_loss(
                    fm_logits, logits[:, assist_cols.to(device)], cfg.temperature
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
    model.eval()


def consolidate(
    model: SmallModel,
    model_labels: list[str],
    bank: StatsBank,
    assist: AssistHead,
    cfg: SMCFConfig,
    seed: int = 0,
) -> None:
    """Pull the small model towards a freshly received P_c, on pseudo-features of every label it has seen.

    No real data is needed: the batches are drawn from the local statistics bank (class-balanced), the
    loss is the SMCF loss without the LwF term — CE on the drawn labels plus λ_fm·T²·KL to P_c.
    """
    labels = [y for y in model_labels if y in bank]
    assist_cols, assist_src = _assist_columns(assist, model_labels)
    if cfg.consolidate_steps <= 0 or not labels or len(assist_cols) < 2:
        return
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    sampler, cols = bank.sampler(labels), column_index(model_labels, labels)
    opt = adam(model.parameters(), cfg.lr, cfg.weight_decay)
    model.train()
    for _ in range(cfg.consolidate_steps):
        which = torch.randint(len(labels), (cfg.batch_size,), generator=gen)
        x, y = sampler.draw(which, gen).to(device), cols[which].to(device)
        logits = model(x)
        with torch.no_grad():
            fm_logits = assist.forward(x)[:, assist_src.to(device)]
        loss = F.cross_entropy(logits, y) + cfg.lambda_fm * kd_loss(
            fm_logits, logits[:, assist_cols.to(device)], cfg.temperature
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def _assist_columns(assist: AssistHead | None, model_labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of the labels both the small model and P_c know, in the model and in P_c."""
    if assist is None:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    assist_labels = set(assist.labels)
    shared = [y for y in model_labels if y in assist_labels]
    return column_index(model_labels, shared), column_index(assist.labels, shared)


def snapshot(model: SmallModel) -> SmallModel:
    """A frozen copy (S_prev for LwF)."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen
