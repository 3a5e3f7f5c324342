"""Loss terms and the optimiser shared by SMCF and OBOD."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over rows."""
    if teacher_logits.numel() == 0 or teacher_logits.shape[1] < 2:
        return student_logits.sum() * 0.0
    t = temperature
    target = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), target, reduction="batchmean") * t * t


def column_index(names: list[str], wanted: list[str]) -> torch.Tensor:
    """Positions of `wanted` names inside `names` (all must be present)."""
    pos = {name: i for i, name in enumerate(names)}
    return torch.tensor([pos[w] for w in wanted], dtype=torch.long)


def adam(params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with its fused kernel: the models here are small, so per-tensor Python work dominates a step.

    Fused Adam takes one kernel per step instead of several per parameter (1.25 vs 2.30 ms a step for
    an mlp:512,128 on 2 CPU cores); the update is the same algorithm.
    """
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
