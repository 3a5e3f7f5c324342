"""Tests for the per-label statistics bank: count-weighted merging, sampling, noising and serde."""

from __future__ import annotations

import copy

import pytest
import torch

from common.algorithms.stats import MIN_STD, LabelStats, StatsBank, StatsTensors, residual_std
from common.package import decode_stats, encode_stats

DIM = 16


def clusters(
    labels: list[str], per_label: list[int], seed: int, dim: int = DIM
) -> tuple[torch.Tensor, list[str]]:
    """Gaussian clusters with label-specific means and per-dimension scales, rows interleaved."""
    gen = torch.Generator().manual_seed(seed)
    rows, names = [], []
    for label, n in zip(labels, per_label, strict=True):
        mean = torch.randn(dim, generator=gen) * 3
        scale = torch.rand(dim, generator=gen) + 0.2
        rows.append(mean + scale * torch.randn(n, dim, generator=gen))
        names += [label] * n
    feats = torch.cat(rows)
    perm = torch.randperm(len(names), generator=gen)
    return feats[perm], [names[i] for i in perm.tolist()]


def rows_of(feats: torch.Tensor, names: list[str], label: str) -> torch.Tensor:
    return feats[[i for i, y in enumerate(names) if y == label]]


def assert_matches_data(bank: StatsBank, feats: torch.Tensor, names: list[str]) -> None:
    """The bank holds exactly the count, mean and population std of the rows of each label."""
    assert bank.labels() == sorted(set(names))
    for label in bank.labels():
        rows = rows_of(feats.double(), names, label)
        st = bank.stats[label]
        assert st.count == len(rows)
        torch.testing.assert_close(st.mean.double(), rows.mean(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(st.std.double(), rows.std(0, unbiased=False), rtol=0, atol=1e-5)


def test_add_features_computes_count_mean_std() -> None:
    feats, names = clusters(["a", "b", "c"], [40, 25, 60], seed=0)
    bank = StatsBank(DIM)
    bank.add_features(feats, names)
    assert_matches_data(bank, feats, names)
    assert "a" in bank and "z" not in bank


def test_merging_banks_by_count_equals_pooled_stats() -> None:
    # client 1 sees a, b; client 2 sees b (again, with a different count), c
    x1, y1 = clusters(["a", "b"], [30, 70], seed=1)
    x2, y2 = clusters(["b", "c"], [20, 45], seed=2)
    bank1, bank2 = StatsBank(DIM), StatsBank(DIM)
    bank1.add_features(x1, y1)
    bank2.add_features(x2, y2)
    bank1.merge_bank(bank2)
    assert_matches_data(bank1, torch.cat([x1, x2]), y1 + y2)


def test_label_coming_back_is_pooled_exactly_and_order_does_not_matter() -> None:
    x1, y1 = clusters(["a"], [13], seed=3)
    x2, y2 = clusters(["a"], [50], seed=4)  # different mean: the between-group term matters
    x3, y3 = clusters(["a"], [1], seed=5)  # a single row has std 0
    forward, backward = StatsBank(DIM), StatsBank(DIM)
    for x, y in ((x1, y1), (x2, y2), (x3, y3)):
        forward.add_features(x, y)
    for x, y in ((x3, y3), (x2, y2), (x1, y1)):
        backward.add_features(x, y)
    pooled_x, pooled_y = torch.cat([x1, x2, x3]), y1 + y2 + y3
    assert_matches_data(forward, pooled_x, pooled_y)
    assert_matches_data(backward, pooled_x, pooled_y)


def test_single_row_has_zero_std() -> None:
    bank = StatsBank(4)
    bank.add_features(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), ["solo"])
    st = bank.stats["solo"]
    assert st.count == 1
    assert torch.equal(st.mean, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(st.std, torch.zeros(4))


def test_merge_into_empty_bank_copies() -> None:
    source = LabelStats(3, torch.ones(DIM), torch.ones(DIM))
    bank = StatsBank(DIM)
    bank.merge("a", source)
    source.mean += 5  # mutating the caller's tensors must not change the bank
    assert torch.equal(bank.stats["a"].mean, torch.ones(DIM))


def test_sample_draws_from_each_label_gaussian() -> None:
    feats, names = clusters(["a", "b"], [200, 200], seed=6)
    bank = StatsBank(DIM)
    bank.add_features(feats, names)
    per_label = 20_000
    out, out_names = bank.sample(["b", "a"], per_label, torch.Generator().manual_seed(0))
    assert out.shape == (2 * per_label, DIM)
    assert out_names == ["b"] * per_label + ["a"] * per_label
    for label in ("a", "b"):
        drawn = out[[i for i, y in enumerate(out_names) if y == label]]
        st = bank.stats[label]
        # standard error of the mean is std/sqrt(20000) < 0.01; of the std about std/200
        torch.testing.assert_close(drawn.mean(0), st.mean, rtol=0, atol=0.05)
        torch.testing.assert_close(drawn.std(0), st.std, rtol=0.05, atol=0.01)
    # the two labels are really different distributions
    assert (bank.stats["a"].mean - bank.stats["b"].mean).abs().max() > 0.5


def test_sample_is_deterministic_with_a_generator_and_floors_zero_std() -> None:
    bank = StatsBank(4)
    bank.add_features(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), ["solo"])
    a, _ = bank.sample(["solo"], 500, torch.Generator().manual_seed(7))
    b, _ = bank.sample(["solo"], 500, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    spread = a.std(0)
    assert (spread > 0).all()
    assert (spread < 2 * MIN_STD).all()
    empty, names = bank.sample([], 10)
    assert empty.shape == (0, 4) and names == []


def test_noised_shifts_means_by_about_sigma() -> None:
    gen = torch.Generator().manual_seed(8)
    bank = StatsBank(DIM)
    for i in range(64):
        mean, std = torch.randn(DIM, generator=gen), torch.rand(DIM, generator=gen)
        bank.merge(f"l{i}", LabelStats(i + 1, mean, std))
    original = copy.deepcopy(bank)
    sigma = 0.5
    noisy = bank.noised(sigma, torch.Generator().manual_seed(9))

    assert noisy.labels() == bank.labels()
    shifts = torch.stack([noisy.stats[y].mean - bank.stats[y].mean for y in bank.labels()])
    # 64 labels x 16 dims = 1024 Gaussian draws: their RMS is sigma within a few percent
    rms = shifts.pow(2).mean().sqrt().item()
    assert rms == pytest.approx(sigma, rel=0.1)
    assert abs(shifts.mean().item()) < 0.1
    for y in bank.labels():
        assert noisy.stats[y].count == bank.stats[y].count
        assert (noisy.stats[y].std >= 0).all()
        assert not torch.equal(noisy.stats[y].std, bank.stats[y].std)
        # the source bank is untouched
        assert torch.equal(bank.stats[y].mean, original.stats[y].mean)
        assert torch.equal(bank.stats[y].std, original.stats[y].std)

    same = bank.noised(0.0)
    for y in bank.labels():
        assert torch.equal(same.stats[y].mean, bank.stats[y].mean)


def test_noised_scales_with_sigma() -> None:
    bank = StatsBank(DIM)
    for i in range(32):
        bank.merge(f"l{i}", LabelStats(5, torch.zeros(DIM), torch.ones(DIM)))

    def rms(sigma: float) -> float:
        noisy = bank.noised(sigma, torch.Generator().manual_seed(10))
        return torch.stack([noisy.stats[y].mean for y in bank.labels()]).pow(2).mean().sqrt().item()

    assert rms(0.1) == pytest.approx(0.1, rel=0.15)
    assert rms(2.0) == pytest.approx(2.0, rel=0.15)


def test_to_from_tensors_round_trip_sorted() -> None:
    feats, names = clusters(["zeta", "alpha", "mid"], [5, 9, 7], seed=11)
    bank = StatsBank(DIM, rank=3)
    bank.add_features(feats, names)
    t = bank.to_tensors()
    assert t.labels == ["alpha", "mid", "zeta"]
    assert t.counts.tolist() == [9.0, 7.0, 5.0]
    assert t.means.shape == t.stds.shape == (3, DIM)
    assert t.bases.shape == (3, 3, DIM)
    back = StatsBank.from_tensors(t)
    assert back.dim == DIM
    for tensor in (t.counts, t.means, t.stds, t.bases):
        tensor.fill_(float("nan"))  # the bank holds copies: what its tensors came from may change
    for y in t.labels:
        assert back.stats[y].count == bank.stats[y].count
        assert torch.equal(back.stats[y].mean, bank.stats[y].mean)
        assert torch.equal(back.stats[y].std, bank.stats[y].std)
        assert torch.equal(back.stats[y].basis_or_empty(), bank.stats[y].basis_or_empty())


@pytest.mark.parametrize("rank", [0, 4])
def test_encode_decode_stats_round_trip(rank: int) -> None:
    feats, names = clusters(["card_arrival", "pin.reset", "balance"], [12, 30, 4], seed=12)
    bank = StatsBank(DIM, rank)
    bank.add_features(feats, names)
    out = decode_stats(encode_stats(bank))
    assert out.dim == DIM
    assert out.labels() == bank.labels()
    for y in bank.labels():
        assert out.stats[y].count == bank.stats[y].count
        assert isinstance(out.stats[y].count, int)
        assert torch.equal(out.stats[y].mean, bank.stats[y].mean)
        assert torch.equal(out.stats[y].std, bank.stats[y].std)
        assert torch.equal(out.stats[y].basis_or_empty(), bank.stats[y].basis_or_empty())
    # a second round trip changes nothing (bytes may differ: safetensors orders metadata keys freely)
    again = decode_stats(encode_stats(out))
    assert again.labels() == bank.labels()
    assert all(torch.equal(again.stats[y].std, bank.stats[y].std) for y in bank.labels())


def test_encode_decode_empty_stats_keeps_dimension() -> None:
    out = decode_stats(encode_stats(StatsBank(DIM)))
    assert out.dim == DIM
    assert out.labels() == []


def test_vectorised_sampler_matches_label_gaussians() -> None:
    feats, names = clusters(["a", "b", "c"], [100, 100, 1], seed=13)
    bank = StatsBank(DIM)
    bank.add_features(feats, names)
    labels = ["c", "a", "b"]
    sampler = bank.sampler(labels)
    which = torch.tensor([1, 2] * 10_000 + [0] * 500)
    out = sampler.draw(which, torch.Generator().manual_seed(14))
    assert out.shape == (len(which), DIM)
    for index, label in enumerate(labels):
        drawn = out[which == index]
        st = bank.stats[label]
        torch.testing.assert_close(drawn.mean(0), st.mean, rtol=0, atol=0.05)
        expected_std = st.std.clamp_min(MIN_STD)
        torch.testing.assert_close(drawn.std(0), expected_std, rtol=0.1, atol=1e-5)
    again = sampler.draw(which, torch.Generator().manual_seed(14))
    assert torch.equal(out, again)


def correlated(n: int, seed: int, dim: int = DIM, rank: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a Gaussian whose covariance is mostly `rank` strong directions, and that covariance."""
    gen = torch.Generator().manual_seed(seed)
    factors = torch.randn(rank, dim, generator=gen) * 2
    noise = 0.1
    rows = torch.randn(n, rank, generator=gen) @ factors + noise * torch.randn(n, dim, generator=gen) + 5
    cov = factors.T @ factors + noise**2 * torch.eye(dim)
    return rows, cov


def test_low_rank_basis_captures_the_covariance_the_diagonal_misses() -> None:
    rows, cov = correlated(4000, seed=20)
    bank = StatsBank(DIM, rank=2)
    bank.add_features(rows, ["x"] * len(rows))
    st = bank.stats["x"]
    assert st.basis is not None and st.basis.shape == (2, DIM)
    model = st.basis.T @ st.basis + torch.diag(residual_std(st.std[None], st.basis[None])[0] ** 2)
    assert (model - cov).abs().max() < 0.15 * cov.abs().max()
    drawn = bank.sampler(["x"]).draw(torch.zeros(20_000, dtype=torch.long), torch.Generator().manual_seed(1))
    assert (torch.cov(drawn.T) - cov).abs().max() < 0.15 * cov.abs().max()
    # the diagonal model alone loses the off-diagonal structure entirely
    diag = StatsBank(DIM)
    diag.add_features(rows, ["x"] * len(rows))
    flat = diag.sampler(["x"]).draw(torch.zeros(20_000, dtype=torch.long), torch.Generator().manual_seed(1))
    off = ~torch.eye(DIM, dtype=torch.bool)
    assert (torch.cov(flat.T) - cov)[off].abs().max() > 0.5 * cov[off].abs().max()


def test_merged_low_rank_stats_match_stats_of_the_pooled_rows() -> None:
    rows, _ = correlated(3000, seed=21)
    shifted, _ = correlated(1000, seed=21)
    shifted = shifted + 0.5  # the same label seen again, a little elsewhere
    merged = StatsBank(DIM, rank=3)
    merged.add_features(rows, ["x"] * len(rows))
    merged.add_features(shifted, ["x"] * len(shifted))
    pooled = StatsBank(DIM, rank=3)
    pooled.add_features(torch.cat([rows, shifted]), ["x"] * 4000)
    a, b = merged.stats["x"], pooled.stats["x"]
    assert a.count == b.count == 4000
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.std, b.std, rtol=0, atol=1e-4)
    assert a.basis is not None and b.basis is not None
    torch.testing.assert_close(a.basis.T @ a.basis, b.basis.T @ b.basis, rtol=0, atol=0.05)


def test_stats_tensors_pad_bases_of_different_ranks() -> None:
    bank = StatsBank(DIM)
    bank.merge("full", LabelStats(5, torch.zeros(DIM), torch.ones(DIM), torch.ones(3, DIM) * 0.1))
    bank.merge("flat", LabelStats(5, torch.zeros(DIM), torch.ones(DIM)))
    t = bank.to_tensors()
    assert t.labels == ["flat", "full"] and t.bases.shape == (2, 3, DIM)
    assert torch.equal(t.bases[0], torch.zeros(3, DIM))
    assert isinstance(StatsBank.from_tensors(t), StatsBank)
    assert StatsTensors is type(t)
