"""OBOD knobs: standardised KD ignores a teacher's logit scale; lambda_kd weighs the teacher term."""

from __future__ import annotations

import torch

from common.algorithms.obod import Teacher, distill_global
from common.algorithms.stats import StatsBank
from common.config import OBODConfig
from common.zoo import SmallModel, parse_spec

D = 16


class Scaled(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.factor


def _setup() -> tuple[SmallModel, torch.Tensor, StatsBank]:
    torch.manual_seed(0)
    teacher = SmallModel(parse_spec("mlp:32"), D, 4)
    public = torch.randn(256, D)
    return teacher, public, StatsBank(D)


def _distil(teacher: torch.nn.Module, public: torch.Tensor, bank: StatsBank, **cfg: object) -> torch.Tensor:
    torch.manual_seed(1)  # G's initial weights
    head = distill_global(
        None,
        Teacher(teacher, ["a", "b", "c", "d"]),
        public,
        bank,
        OBODConfig(min_steps=30, epochs=1, kd_public=1.0, **cfg),
        seed=3,
    )  # type: ignore[arg-type]
    with torch.no_grad():
        return head.model(public)


def test_standardised_kd_is_invariant_to_teacher_logit_scale() -> None:
    teacher, public, bank = _setup()
    plain = _distil(teacher, public, bank, kd_standardize=True)
    scaled = _distil(Scaled(teacher, 7.0), public, bank, kd_standardize=True)
    assert torch.allclose(plain, scaled, atol=1e-4)
    # without standardisation the scale changes what G learns
    assert not torch.allclose(
        _distil(teacher, public, bank), _distil(Scaled(teacher, 7.0), public, bank), atol=1e-3
    )


def test_lambda_kd_zero_ignores_the_teacher() -> None:
    teacher, public, bank = _setup()
    other = SmallModel(parse_spec("linear"), D, 4)
    assert torch.allclose(
        _distil(teacher, public, bank, lambda_kd=0.0), _distil(other, public, bank, lambda_kd=0.0)
    )
    assert not torch.allclose(_distil(teacher, public, bank), _distil(other, public, bank), atol=1e-3)
