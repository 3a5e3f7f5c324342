"""A classifier computed in closed form from class statistics: LDA with a shrunk pooled covariance.

This is the `stats-closed-form` rival (as in FeCAM / STSA-style prototype classifiers): it needs exactly
what an upload's statistics already carry (count, mean, std and low-rank covariance factor per label),
so it adds nothing to the wire. Each label's covariance is `basisᵀ·basis + diag(residual²)`; the pooled
within-class covariance is their count-weighted mean, shrunk towards a scaled identity.
"""

from __future__ import annotations

import torch

from common.algorithms.obod import Head
from common.algorithms.stats import StatsBank, residual_std
from common.zoo import SmallModel, parse_spec


def pooled_covariance(bank: StatsBank) -> torch.Tensor:
    """Count-weighted mean of every label's covariance (D, D)."""
    t = bank.to_tensors()
    weights = t.counts / t.counts.sum()
    resid = residual_std(t.stds, t.bases)
    cov = torch.diag((weights[:, None] * resid**2).sum(dim=0))
    if t.bases.shape[1]:
        scaled = t.bases * weights.sqrt()[:, None, None]  # (L, K, D)
        flat = scaled.reshape(-1, t.bases.shape[2])
        cov = cov + flat.T @ flat
    return cov


def lda_head(bank: StatsBank, shrinkage: float) -> Head:
    """Linear head W·x + b, W = μ Σ⁻¹ and b = -½ μ Σ⁻¹ μᵀ (equal priors); Σ shrunk by `shrinkage` ∈ [0, 1]."""
    labels = bank.labels()
    if not labels:
        raise ValueError("no statistics: a closed-form head needs at least one label's statistics")
    t = bank.to_tensors()
    cov = pooled_covariance(bank).double()
    dim = cov.shape[0]
    target = torch.eye(dim, dtype=cov.dtype) * (torch.trace(cov) / dim).clamp_min(1e-12)
    shrunk = (1 - shrinkage) * cov + shrinkage * target
    means = t.means.double()
    weight = torch.linalg.solve(shrunk, means.T).T  # (L, D) = μ Σ⁻¹
    bias = -0.5 * (weight * means).sum(dim=1)
    model = SmallModel(parse_spec("linear"), dim, len(labels))
    with torch.no_grad():
        model.out.weight.copy_(weight.float())
        model.out.bias.copy_(bias.float())
    return Head(model.eval(), labels)
