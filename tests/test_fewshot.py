"""Few-shot labels and heavy imbalance through the real statistics, SMCF and OBOD code: every tensor they
produce (statistics, pseudo-features, small-model weights, head weights, inverted features) is finite.

One test per case: a label with a single example, labels with two (identical) examples, and a task of
one label with 500 examples beside one with a single example.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from common.algorithms.obod import Head, Teacher, run_job, synthesise, undescribed_labels
from common.algorithms.smcf import AssistHead, TaskData, consolidate, snapshot, train_task
from common.algorithms.stats import StatsBank
from common.algorithms.transfer import synthetic_stats
from common.config import OBODConfig, SMCFConfig
from common.package import KnowledgePackage, decode_package, encode_package
from common.zoo import SmallModel, parse_spec

DIM = 32
SMCF = SMCFConfig(epochs=2, min_steps=30, consolidate_steps=20, batch_size=16, stats_rank=24)
OBOD = OBODConfig(epochs=1, min_steps=30, batch_size=32, proto_batch=32, synth_per_label=8, synth_steps=20)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> Iterator[None]:
    yield


def features(counts: dict[str, int], seed: int, duplicate: bool = False) -> TaskData:
    """Unit-norm features (as the FM's are) around one centre per label; `duplicate`: every example of a
    label is the same point (duplicate rows), so its variance is exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for label, n in counts.items():
        centre = torch.randn(DIM, generator=gen)
        noise = torch.zeros(n, DIM) if duplicate else 0.3 * torch.randn(n, DIM, generator=gen)
        rows.append(F.normalize(centre + noise, dim=1))
        labels += [label] * n
    return TaskData(torch.cat(rows), labels)


def finite(found: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors with a NaN or an infinity (an empty list when all are finite)."""
    return [name for name, t in found.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def bank_tensors(prefix: str, bank: StatsBank) -> dict[str, torch.Tensor]:
    t = bank.to_tensors()
    return {
        f"{prefix}.counts": t.counts,
        f"{prefix}.means": t.means,
        f"{prefix}.stds": t.stds,
        f"{prefix}.bases": t.bases,
    }


def weights(prefix: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in model.state_dict().items()}


def run_everything(first: dict[str, int], duplicate: bool = False) -> dict[str, torch.Tensor]:
    """A client learns two tasks (the first is the case under test), uploads each; the server runs OBOD
    on both uploads, with and without standardised KD; every tensor made on the way is returned."""
    out: dict[str, torch.Tensor] = {}
    tasks = [features(first, seed=1, duplicate=duplicate), features({"later-a": 6, "later-b": 6}, seed=2)]
    public = F.normalize(torch.randn(64, DIM, generator=torch.Generator().manual_seed(3)), dim=1)

    # the client: statistics, SMCF with replay of the first task's labels, consolidation towards a head
    labels: list[str] = []
    model: SmallModel | None = None
    bank = StatsBank(DIM, rank=SMCF.stats_rank)
    uploads: list[KnowledgePackage] = []
    for i, task in enumerate(tasks):
        labels += [y for y in dict.fromkeys(task.labels) if y not in labels]
        prev = snapshot(model) if model is not None else None
        if model is None:
            model = SmallModel(parse_spec("mlp:16"), DIM, len(labels))
        model.grow(len(labels))
        train_task(model, labels, task, bank, SMCF, prev, seed=i)
        out |= weights(f"small{i}", model)
        task_bank = StatsBank(DIM, rank=SMCF.stats_rank)
        task_bank.add_features(task.features, task.labels)
        out |= bank_tensors(f"task{i}.stats", task_bank) | bank_tensors(
            f"task{i}.noised", task_bank.noised(0.05)
        )
        bank.merge_bank(task_bank)
        out |= bank_tensors(f"client.bank{i}", bank)
        out[f"client.pseudo{i}"] = bank.sample(bank.labels(), 64, torch.Generator().manual_seed(i))[0]
        counts = [sum(y == label for y in task.labels) for label in labels]
        package = KnowledgePackage.from_model(model, labels, "f" * 64, "small", counts, task_bank)
        uploads.append(decode_package(encode_package(package)))  # as the server receives it
    assert model is not None
    head = Head(SmallModel(parse_spec("linear"), DIM, len(labels)), list(labels))
    consolidate(model, labels, bank, AssistHead(head.model, head.labels), SMCF, seed=5)
    out |= weights("small.consolidated", model)

    # the server: one OBOD job per upload, in order, plain and with z-scored KD
    for standardize in (False, True):
        cfg = OBOD.model_copy(update={"kd_standardize": standardize})
        global_head: Head | None = None
        server_bank = StatsBank(DIM)
        for i, pkg in enumerate(uploads):
            teacher = Teacher.from_package(pkg)
            synth = synthesise(teacher, undescribed_labels(teacher, None), public, cfg, seed=i)
            out[f"synth{i}.features"] = synth.features
            out |= bank_tensors(
                f"synth{i}.stats", synthetic_stats(synth, teacher.counts, set(synth.labels), 8)
            )
            outcome = run_job(global_head, server_bank, teacher, pkg.stats, public, cfg, seed=i)
            global_head, server_bank = outcome.global_head, outcome.bank
            tag = f"z{int(standardize)}.job{i}"
            out |= weights(f"{tag}.global", outcome.global_head.model)
            out |= weights(f"{tag}.personal", outcome.personal_head.model)
            out |= bank_tensors(f"{tag}.bank", outcome.bank)
            out[f"{tag}.pseudo"] = outcome.bank.sample(outcome.bank.labels(), 64)[0]
            # privacy mode: no statistics uploaded, only the small model (inverted features stand in)
            blind = run_job(global_head, StatsBank(DIM), teacher, None, public, cfg, seed=i)
            out |= weights(f"{tag}.blind.global", blind.global_head.model)
            out |= bank_tensors(f"{tag}.blind.bank", blind.bank)
    return out


def test_a_label_with_a_single_example_stays_finite() -> None:
    found = run_everything({"solo": 1})
    assert not finite(found), finite(found)
    assert found["task0.stats.stds"].abs().sum() == 0  # one example: no spread, and no NaN for it


def test_labels_with_two_identical_examples_stay_finite() -> None:
    found = run_everything({"pair-a": 2, "pair-b": 2}, duplicate=True)
    assert not finite(found), finite(found)


def test_a_heavily_imbalanced_task_stays_finite() -> None:
    found = run_everything({"big": 500, "tiny": 1})
    assert not finite(found), finite(found)
    assert found["task0.stats.counts"].tolist() == [500.0, 1.0]
