"""Continual-learning metrics over an accuracy matrix R[t][j] (BENCHMARK.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Matrix = list[list[float | None]]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    if len(targets) == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == targets).float().mean().item())


@torch.no_grad()
def head_accuracy(
    model: torch.nn.Module, names: list[str], features: torch.Tensor, labels: list[str]
) -> float:
    """Class-incremental accuracy of a head whose output columns are `names` (argmax over all of them)."""
    pos = {y: i for i, y in enumerate(names)}
    # a test label the head has never heard of can only be wrong: map it to an impossible column
    targets = torch.tensor([pos.get(y, -1) for y in labels], dtype=torch.long)
    return accuracy(model.eval()(features), targets)


def acc_avg(matrix: Matrix) -> float | None:
    """mean_j R[T][j] over the tasks measured after the last task."""
    last = [v for v in matrix[-1] if v is not None] if matrix else []
    return sum(last) / len(last) if last else None


def forgetting(matrix: Matrix) -> float | None:
    """mean over j<T of (max_{t<T} R[t][j] − R[T][j]) (Chaudhry et al.)."""
    if len(matrix) < 2:
        return None
    final = len(matrix) - 1
    drops = []
    for j in range(final):
        history = [v for t in range(final) if (v := matrix[t][j]) is not None]
        last = matrix[final][j]
        if history and last is not None:
            drops.append(max(history) - last)
    return sum(drops) / len(drops) if drops else None


def backward_transfer(matrix: Matrix) -> float | None:
    """mean over j<T of (R[T][j] − R[j][j])."""
    if len(matrix) < 2:
        return None
    final = len(matrix) - 1
    diffs = [
        last - first
        for j in range(final)
        if (last := matrix[final][j]) is not None and (first := matrix[j][j]) is not None
    ]
    return sum(diffs) / len(diffs) if diffs else None


def summarize(matrix: Matrix, acc_final: float | None) -> dict[str, object]:
    """The per-part metrics block of the report schema."""
    return {
        "acc_final": acc_final,
        "acc_avg": acc_avg(matrix),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "matrix": matrix,
    }


def mean_matrix(matrices: Sequence[Matrix]) -> Matrix:
    """Element-wise mean of several matrices of the same shape, ignoring missing entries."""
    if not matrices:
        return []
    rows, cols = len(matrices[0]), len(matrices[0][0]) if matrices[0] else 0
    out: Matrix = []
    for t in range(rows):
        row: list[float | None] = []
        for j in range(cols):
            vals = [v for m in matrices if t < len(m) and j < len(m[t]) and (v := m[t][j]) is not None]
            row.append(sum(vals) / len(vals) if vals else None)
        out.append(row)
    return out
