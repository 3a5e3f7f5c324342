"""benchmarks.baselines on a synthetic scenario: Gaussian clusters as FM features, 2 tasks x 2 clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from benchmarks.baselines import METHODS, average_states, ensemble_target
from benchmarks.run import run_method
from benchmarks.scenario import Scenario
from common.algorithms.obod import Teacher
from common.algorithms.smcf import TaskData
from common.config import OBODConfig, SMCFConfig
from common.zoo import SmallModel, parse_spec

DIM, TASKS, LABELS_PER_TASK = 16, 2, 4
SMCF = SMCFConfig(epochs=5)
OBOD = OBODConfig(epochs=2, min_steps=30)
FEDERATED = ("fedavg-ft", "fedlwf", "fedavg-smcf", "feddf", "stats-closed-form")


def _scenario(skip_first: bool = False) -> Scenario:
    """Task k has labels t{k}_0..t{k}_3; client a holds labels 0-2, client b labels 1-3 of each task.

    `skip_first`: client b has no data in task 0 (joins late)."""
    gen = torch.Generator().manual_seed(1234)
    tasks = [f"task{k}" for k in range(TASKS)]
    labels = {task: [f"t{k}_{j}" for j in range(LABELS_PER_TASK)] for k, task in enumerate(tasks)}
    centers = {y: 4.0 * torch.randn(DIM, generator=gen) for task in tasks for y in labels[task]}

    def sample(names: list[str], per_label: int) -> TaskData:
        feats = [centers[y] + torch.randn(per_label, DIM, generator=gen) for y in names]
        return TaskData(torch.cat(feats), [y for y in names for _ in range(per_label)])

    holds = {"a": slice(0, 3), "b": slice(1, 4)}
    train: dict[str, dict[str, TaskData]] = {c: {} for c in holds}
    test: dict[str, dict[str, TaskData]] = {c: {} for c in holds}
    for k, task in enumerate(tasks):
        for client, part in holds.items():
            if skip_first and client == "b" and k == 0:
                continue
            train[client][task] = sample(labels[task][part], 30)
            test[client][task] = sample(labels[task][part], 10)
    return Scenario(
        name="synthetic",
        tasks=tasks,
        train=train,
        test=test,
        global_test={task: sample(labels[task], 15) for task in tasks},
        public=2.0 * torch.randn(200, DIM, generator=gen),
        label_embeddings={y: c / c.norm() for y, c in centers.items()},
        feature_dim=DIM,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is fastest, and immune to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return _scenario()


@pytest.fixture(scope="module")
def results(scenario: Scenario) -> dict[str, dict[str, Any]]:
    return {name: run_method(name, fn, scenario, 0, SMCF, OBOD) for name, fn in METHODS.items()}


def test_registry_keys() -> None:
    assert set(METHODS) == {
        "joint",
        "zeroshot",
        "local",
        "fedavg-ft",
        "fedlwf",
        "fedavg-smcf",
        "feddf",
        "stats-closed-form",
    }


def _parts(name: str) -> set[str]:
    if name in ("joint", "zeroshot"):
        return {"fm_global"}
    if name == "local":
        return {"small"}
    if name == "stats-closed-form":
        return {"fm_global", "fm_personal", "small"}
    return {"fm_global", "small"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_result_shape(results: dict[str, dict[str, Any]], name: str) -> None:
    entry = json.loads(json.dumps(results[name]))  # JSON-able
    for part in ("fm_global", "fm_personal", "small"):
        block = entry[part]
        if part not in _parts(name):
            assert block is None, f"{name} should not have {part}"
            continue
        assert block is not None, f"{name} lacks {part}"
        matrix = block["matrix"]
        assert len(matrix) == TASKS and all(len(row) == TASKS for row in matrix)
        for t, row in enumerate(matrix):
            for j, value in enumerate(row):
                if j > t:
                    assert value is None
                else:
                    assert value is not None and 0.0 <= value <= 1.0
        for key in ("acc_final", "acc_avg"):
            assert 0.0 <= block[key] <= 1.0
        assert block["forgetting"] is not None and block["bwt"] is not None
    federated = name in FEDERATED
    assert (entry["bytes_up_per_client_round"] > 0) == federated
    assert (entry["bytes_down_per_client_round"] > 0) == federated
    assert entry["wall_s"] >= 0


def test_joint_is_accurate(results: dict[str, dict[str, Any]]) -> None:
    assert results["joint"]["fm_global"]["acc_final"] > 0.9


def test_zeroshot_beats_chance(results: dict[str, dict[str, Any]]) -> None:
    assert results["zeroshot"]["fm_global"]["acc_final"] > 2.0 / (TASKS * LABELS_PER_TASK)


def test_smcf_forgets_less_than_fine_tuning(results: dict[str, dict[str, Any]]) -> None:
    ft, smcf = results["fedavg-ft"]["fm_global"], results["fedavg-smcf"]["fm_global"]
    assert smcf["forgetting"] < ft["forgetting"]
    assert smcf["acc_final"] > ft["acc_final"]


def test_fedavg_small_is_the_global_model(results: dict[str, dict[str, Any]]) -> None:
    # every client deploys the averaged model, so it is right on its own test data as often as G is
    for name in ("fedavg-ft", "fedlwf", "fedavg-smcf"):
        assert results[name]["small"]["acc_final"] > 0.0


@pytest.mark.parametrize("name", ["joint", "fedavg-smcf", "feddf", "local"])
def test_deterministic(scenario: Scenario, results: dict[str, dict[str, Any]], name: str) -> None:
    again = run_method(name, METHODS[name], scenario, 0, SMCF, OBOD)
    for part in ("fm_global", "small"):
        assert again[part] == results[name][part]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_late_joining_client(name: str) -> None:
    """A client without data in the first task: rows line up, nothing crashes."""
    entry = run_method(
        name,
        METHODS[name],
        _scenario(skip_first=True),
        1,
        SMCFConfig(epochs=1, min_steps=5),
        OBODConfig(epochs=1, min_steps=5),
    )
    for part in _parts(name):
        block = entry[part]
        assert isinstance(block, dict) and len(block["matrix"]) == TASKS


def test_average_states_weights() -> None:
    a = {"w": torch.zeros(2)}
    b = {"w": torch.ones(2)}
    assert torch.allclose(average_states([a, b], [1.0, 3.0])["w"], torch.full((2,), 0.75))


def test_ensemble_target_averages_over_teachers_that_know_a_label() -> None:
    torch.manual_seed(0)
    spec = parse_spec("linear")
    one = Teacher(SmallModel(spec, DIM, 2), ["x", "y"])
    two = Teacher(SmallModel(spec, DIM, 2), ["y", "z"])
    public = torch.randn(7, DIM)
    target = ensemble_target([one, two], ["x", "y", "z"], public, 2.0)
    assert torch.allclose(target.sum(dim=1), torch.ones(7))
    with torch.no_grad():
        p1 = torch.softmax(one.model(public) / 2.0, dim=1)
        p2 = torch.softmax(two.model(public) / 2.0, dim=1)
    raw = torch.stack([p1[:, 0], (p1[:, 1] + p2[:, 0]) / 2, p2[:, 1]], dim=1)
    assert torch.allclose(target, raw / raw.sum(dim=1, keepdim=True))


def test_fedavg_variants_differ_in_exactly_their_local_losses() -> None:
    from benchmarks.baselines import fedavg_config

    cfg = SMCFConfig()
    ft, lwf, smcf = (fedavg_config(mode, cfg) for mode in ("ft", "lwf", "smcf"))
    assert (ft.replay, ft.lambda_old, ft.lambda_fm) == (False, 0.0, 0.0)
    # LwF must stay on for fedlwf even though SMCF's own default LwF weight is 0
    assert (lwf.replay, lwf.lambda_fm) == (False, 0.0) and lwf.lambda_old > 0
    assert smcf.replay and smcf.lambda_fm == 0.0
