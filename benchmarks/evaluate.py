"""Accuracy matrices R[t][j] for FM-global, FM-personal and small models, as a method runs (BENCHMARK.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks.scenario import Scenario
from common.algorithms.smcf import TaskData
from common.metrics import Matrix, head_accuracy, mean_matrix, summarize


@dataclass
class Predictor:
    """Anything that maps features to logits over `labels` (a head, a small model, zero-shot)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    labels: list[str]


def predictor(model: torch.nn.Module, labels: list[str]) -> Predictor:
    return Predictor(model.eval(), list(labels))


class _Module(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _accuracy(p: Predictor, data: TaskData) -> float:
    with torch.no_grad():
        return head_accuracy(_Module(p.forward), p.labels, data.features, data.labels)


def _cat(parts: list[TaskData]) -> TaskData:
    return TaskData(torch.cat([p.features for p in parts]), [y for p in parts for y in p.labels])


@dataclass
class Recorder:
    scenario: Scenario
    global_rows: Matrix = field(default_factory=list)
    global_final: float | None = None
    personal_rows: dict[str, Matrix] = field(default_factory=dict)
    small_rows: dict[str, Matrix] = field(default_factory=dict)
    personal_final: dict[str, float] = field(default_factory=dict)
    small_final: dict[str, float] = field(default_factory=dict)
    has_global: bool = False
    has_personal: bool = False
    has_small: bool = False

    def after_task(
        self,
        t: int,
        global_head: Predictor | None = None,
        personal: dict[str, Predictor] | None = None,
        small: dict[str, Predictor] | None = None,
    ) -> None:
        """Record row t of each part's R (call once per task, after every client's round)."""
        tasks = self.scenario.tasks
        if global_head is not None:
            self.has_global = True
            seen = [self.scenario.global_test[tasks[j]] for j in range(t + 1)]
            self.global_rows.append(
                [_accuracy(global_head, seen[j]) if j <= t else None for j in range(len(tasks))]
            )
            self.global_final = _accuracy(global_head, _cat(seen))
        if personal:
            self.has_personal = True
            self._client_rows(t, personal, self.personal_rows, self.personal_final)
        if small:
            self.has_small = True
            self._client_rows(t, small, self.small_rows, self.small_final)

    def _client_rows(
        self, t: int, preds: dict[str, Predictor], rows: dict[str, Matrix], finals: dict[str, float]
    ) -> None:
        tasks = self.scenario.tasks
        for client, pred in preds.items():
            tests = self.scenario.test[client]
            row: list[float | None] = [None] * len(tasks)
            seen = []
            for j in range(t + 1):
                data = tests.get(tasks[j])
                if data is not None and data.labels:
                    row[j] = _accuracy(pred, data)
                    seen.append(data)
            rows.setdefault(client, []).append(row)
            if seen:
                finals[client] = _accuracy(pred, _cat(seen))

    def parts(self) -> dict[str, object]:
        def client_part(rows: dict[str, Matrix], finals: dict[str, float]) -> dict[str, object]:
            final = sum(finals.values()) / len(finals) if finals else None
            return summarize(mean_matrix(_pad(list(rows.values()), len(self.scenario.tasks))), final)

        return {
            "fm_global": summarize(self.global_rows, self.global_final) if self.has_global else None,
            "fm_personal": client_part(self.personal_rows, self.personal_final)
            if self.has_personal
            else None,
            "small": client_part(self.small_rows, self.small_final) if self.has_small else None,
        }


def _pad(matrices: list[Matrix], rows: int) -> list[Matrix]:
    """A client that joined late has fewer rows: pad the top with empty rows so R[t] lines up."""
    padded = []
    for m in matrices:
        pad: Matrix = [[None] * rows for _ in range(rows - len(m))]
        padded.append(pad + m)
    return padded
