"""The harder benchmark scenarios (BENCHMARK.md): arrival order, a client dropping out, a recurring label."""

from __future__ import annotations

import torch

from benchmarks.ours import client_rounds
from benchmarks.scenario import RECUR_TASK, RECURRING_LABELS, SCENARIOS, Scenario, apply_variant
from common.algorithms.smcf import TaskData

DIM = 4
CLIENTS = ["client-00", "client-01", "client-02", "client-03"]
TASKS = ["task-0", "task-1", "task-2"]


def _scenario() -> Scenario:
    """Every client holds every label of every task (4 labels a task, 6 examples each)."""
    gen = torch.Generator().manual_seed(0)

    def data(task: str, per: int) -> TaskData:
        labels = [f"{task}/y{k}" for k in range(4) for _ in range(per)]
        return TaskData(torch.randn(len(labels), DIM, generator=gen), labels)

    return Scenario(
        name="tiny",
        tasks=list(TASKS),
        train={c: {t: data(t, 6) for t in TASKS} for c in CLIENTS},
        test={c: {t: data(t, 2) for t in TASKS} for c in CLIENTS},
        global_test={t: data(t, 3) for t in TASKS},
        public=torch.randn(10, DIM, generator=gen),
        label_embeddings={},
        feature_dim=DIM,
    )


def test_named_scenarios_differ_from_the_plain_one_in_one_thing_each() -> None:
    plain = SCENARIOS["clinc150-5x5"]
    assert SCENARIOS["clinc150-5x5-a01"].alpha == 0.1
    assert SCENARIOS["clinc150-5x5-20c"].clients == 20
    for name, variant in (("recur", "recur"), ("order", "order"), ("drop", "drop")):
        spec = SCENARIOS[f"clinc150-5x5-{name}"]
        assert (spec.tasks, spec.clients, spec.alpha, spec.variant) == (
            plain.tasks,
            plain.clients,
            0.5,
            variant,
        )


def test_arrival_order_is_a_seeded_permutation_and_seeds_follow_the_client() -> None:
    orders = {}
    for seed in (0, 1, 2):
        sc = apply_variant(_scenario(), "order", seed)
        assert sc.arrival is not None and all(sorted(sc.arrival[t]) == CLIENTS for t in TASKS)
        orders[seed] = [sc.arrival[t] for t in TASKS]
        arrived = [(client, s) for client, _, s in client_rounds(sc, seed, 1)]
        assert [c for c, _ in arrived] == sc.arrival[TASKS[1]]
        # a client's training seed does not depend on when it arrives
        plain = dict((client, s) for client, _, s in client_rounds(_scenario(), seed, 1))
        assert dict(arrived) == plain
    assert orders[0] != orders[1] or orders[1] != orders[2]
    assert apply_variant(_scenario(), "order", 1).arrival == apply_variant(_scenario(), "order", 1).arrival


def test_dropped_client_has_only_its_first_task() -> None:
    sc = apply_variant(_scenario(), "drop", 0)
    assert list(sc.train[CLIENTS[0]]) == [TASKS[0]] and list(sc.test[CLIENTS[0]]) == [TASKS[0]]
    assert all(list(sc.train[c]) == TASKS for c in CLIENTS[1:])
    assert [c for c, _, _ in client_rounds(sc, 0, 1)] == CLIENTS[1:]


def test_recurring_labels_come_back_at_the_client_that_held_the_fewest() -> None:
    sc = _scenario()
    # every client holds every label; client-01 holds only 2 examples of task-0/y0
    data = sc.train[CLIENTS[1]][TASKS[0]]
    keep = [i for i, y in enumerate(data.labels) if y != "task-0/y0"] + [0, 1]
    sc.train[CLIENTS[1]][TASKS[0]] = TaskData(
        data.features[sorted(keep)], [data.labels[i] for i in sorted(keep)]
    )
    total = sum(sc.train[c][TASKS[0]].labels.count("task-0/y0") for c in CLIENTS)
    apply_variant(sc, "recur", 0)
    later = sc.train[CLIENTS[1]][TASKS[RECUR_TASK]]
    assert "task-0/y0" not in sc.train[CLIENTS[1]][TASKS[0]].labels  # it has not seen the label before
    assert "task-0/y0" not in sc.test[CLIENTS[1]][TASKS[0]].labels
    stayed = sum(sc.train[c][TASKS[0]].labels.count("task-0/y0") for c in CLIENTS)
    assert stayed == 3 * 3  # half of each other client's 6 examples
    assert later.labels.count("task-0/y0") == total - stayed
    assert "task-0/y0" in sc.test[CLIENTS[1]][TASKS[RECUR_TASK]].labels
    assert len(later.features) == len(later.labels)
    recurring = {y for c in CLIENTS for y in sc.train[c][TASKS[RECUR_TASK]].labels if y.startswith("task-0/")}
    assert recurring == {f"task-0/y{k}" for k in range(RECURRING_LABELS)}
