"""Per-label feature statistics (count, mean, std): merged by count, sampled as pseudo-features."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_STD = 1e-4


@dataclass
class LabelStats:
    count: int
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)


@dataclass
class StatsBank:
    """Statistics of the features of every label seen, keyed by label name."""

    dim: int
    stats: dict[str, LabelStats] = field(default_factory=dict)

    def labels(self) -> list[str]:
        return sorted(self.stats)

    def __contains__(self, label: str) -> bool:
        return label in self.stats

    def add_features(self, features: torch.Tensor, labels: list[str]) -> None:
        """Compute per-label stats of the given features and merge them in."""
        for label in sorted(set(labels)):
            rows = features[[i for i, y in enumerate(labels) if y == label]]
            std = rows.std(dim=0, unbiased=False) if len(rows) > 1 else torch.zeros(self.dim)
            self.merge(label, LabelStats(len(rows), rows.mean(dim=0), std))

    def merge(self, label: str, new: LabelStats) -> None:
        """Merge by count (parallel-variance formula), so a label that comes back is pooled exactly."""
        old = self.stats.get(label)
        if old is None:
            self.stats[label] = LabelStats(new.count, new.mean.clone().float(), new.std.clone().float())
            return
        n = old.count + new.count
        mean = (old.count * old.mean + new.count * new.mean) / n
        var = (
            old.count * (old.std**2 + (old.mean - mean) ** 2)
            + new.count * (new.std**2 + (new.mean - mean) ** 2)
        ) / n
        self.stats[label] = LabelStats(n, mean, var.clamp_min(0).sqrt())

    def merge_bank(self, other: StatsBank) -> None:
        for label, st in other.stats.items():
            self.merge(label, st)

    def sample(
        self, labels: list[str], per_label: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Pseudo-features drawn from each label's Gaussian, `per_label` rows each."""
        feats, names = [], []
        for label in labels:
            st = self.stats[label]
            noise = torch.randn(per_label, self.dim, generator=generator)
            feats.append(st.mean + noise * st.std.clamp_min(MIN_STD))
            names.extend([label] * per_label)
        if not feats:
            return torch.empty(0, self.dim), []
        return torch.cat(feats), names

    def sampler(self, labels: list[str]) -> GaussianSampler:
        """A vectorised sampler over `labels` (one draw per requested row, labels given by index)."""
        means = torch.stack([self.stats[y].mean for y in labels]).float()
        stds = torch.stack([self.stats[y].std for y in labels]).float().clamp_min(MIN_STD)
        return GaussianSampler(means, stds)

    def to_tensors(self) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = self.labels()
        if not labels:
            empty = torch.empty(0, self.dim)
            return [], torch.empty(0), empty, empty
        counts = torch.tensor([self.stats[y].count for y in labels], dtype=torch.float32)
        means = torch.stack([self.stats[y].mean for y in labels]).float()
        stds = torch.stack([self.stats[y].std for y in labels]).float()
        return labels, counts, means, stds

    @classmethod
    def from_tensors(
        cls, labels: list[str], counts: torch.Tensor, means: torch.Tensor, stds: torch.Tensor
    ) -> StatsBank:
        bank = cls(dim=int(means.shape[1]) if means.ndim == 2 else 0)
        for i, label in enumerate(labels):
            bank.stats[label] = LabelStats(int(counts[i].item()), means[i].clone(), stds[i].clone())
        return bank

    def noised(self, sigma: float, generator: torch.Generator | None = None) -> StatsBank:
        """A copy with Gaussian noise of scale `sigma` added to means and stds (privacy option)."""
        out = StatsBank(self.dim)
        for label, st in self.stats.items():
            mean = st.mean + sigma * torch.randn(self.dim, generator=generator)
            std = (st.std + sigma * torch.randn(self.dim, generator=generator)).abs()
            out.stats[label] = LabelStats(st.count, mean, std)
        return out


@dataclass
class GaussianSampler:
    means: torch.Tensor  # (L, D)
    stds: torch.Tensor  # (L, D)

    def draw(self, label_index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(len(label_index), self.means.shape[1], generator=generator)
        return self.means[label_index] + noise * self.stds[label_index]
