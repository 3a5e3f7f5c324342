"""The stats-closed-form rival: LDA from class statistics (count, mean, std, low-rank covariance)."""

from __future__ import annotations

import torch

from common.algorithms.closed_form import lda_head, pooled_covariance
from common.algorithms.stats import StatsBank
from common.metrics import accuracy

D = 12


def _clusters(
    seed: int, per: int, cov_factor: torch.Tensor, noise_seed: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """Four Gaussian classes with means from `seed` and a shared covariance factorᵀ·factor."""
    means = 3.0 * torch.randn(4, D, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(1000 + noise_seed)
    rows = [means[k] + torch.randn(per, D, generator=gen) @ cov_factor for k in range(4)]
    return torch.cat(rows), [f"y{k}" for k in range(4) for _ in range(per)]


def test_pooled_covariance_matches_the_features_when_the_rank_is_full() -> None:
    x, y = _clusters(0, 400, torch.eye(D))
    bank = StatsBank(D, rank=D)
    bank.add_features(x, y)
    within = torch.zeros(D, D)
    for label in sorted(set(y)):
        rows = x[[i for i, v in enumerate(y) if v == label]]
        centred = rows - rows.mean(dim=0)
        within += centred.T @ centred
    within /= len(x)
    assert torch.allclose(pooled_covariance(bank), within, atol=1e-3)


def test_lda_separates_correlated_classes_that_nearest_mean_confuses() -> None:
    # a strongly stretched shared covariance: Σ⁻¹ must undo it
    stretch = torch.eye(D)
    stretch[0, 0] = 6.0
    stretch[1, 0] = 4.0
    x, y = _clusters(1, 300, stretch)
    test_x, test_y = _clusters(1, 300, stretch, noise_seed=1)  # same classes, fresh examples
    bank = StatsBank(D, rank=4)
    bank.add_features(x, y)
    head = lda_head(bank, shrinkage=0.0)
    target = torch.tensor([head.labels.index(v) for v in test_y])
    with torch.no_grad():
        lda_acc = accuracy(head.model(test_x), target)
        means = bank.to_tensors().means
        nearest_acc = accuracy(-torch.cdist(test_x, means), target)
    assert lda_acc > 0.95
    assert lda_acc > nearest_acc + 0.02, (lda_acc, nearest_acc)


def test_full_shrinkage_is_the_nearest_mean_classifier() -> None:
    x, y = _clusters(2, 100, torch.eye(D))
    bank = StatsBank(D, rank=2)
    bank.add_features(x, y)
    head = lda_head(bank, shrinkage=1.0)
    with torch.no_grad():
        lda = head.model(x).argmax(dim=1)
        nearest = (-torch.cdist(x, bank.to_tensors().means)).argmax(dim=1)
    assert torch.equal(lda, nearest)
