"""Behavioural tests of SMCF (client), OBOD (server) and the continual-learning metrics on synthetic features.

The data are Gaussian clusters in a 16-dimensional feature space: task A has labels a0..a3, task B has
labels b0..b3. Everything is seeded, tiny and single-threaded, so the whole module runs in seconds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from common.algorithms.losses import column_index
from common.algorithms.obod import Head, Teacher, distill_global, personalise
from common.algorithms.smcf import AssistHead, TaskData, consolidate, snapshot, train_task
from common.algorithms.stats import StatsBank
from common.config import OBODConfig, SMCFConfig
from common.metrics import Matrix, acc_avg, accuracy, backward_transfer, forgetting, mean_matrix, summarize
from common.zoo import SmallModel, parse_spec

D = 16
A = [f"a{i}" for i in range(4)]
B = [f"b{i}" for i in range(4)]
CLUSTER_STD = 0.6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Split:
    x: torch.Tensor
    y: list[str]


@dataclass
class World:
    train_a: Split
    test_a: Split
    train_b: Split
    test_b: Split
    means: torch.Tensor  # (8, D): a0..a3, b0..b3


def make_world(seed: int) -> World:
    """Eight Gaussian clusters whose means are ~3 apart with std 0.6 per dimension (close-ish, separable)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(8, D, generator=gen) * 3.0 / D**0.5

    def draw(idx: range, labels: list[str], per: int) -> Split:
        xs = [means[i] + CLUSTER_STD * torch.randn(per, D, generator=gen) for i in idx]
        return Split(torch.cat(xs), [y for y in labels for _ in range(per)])

    train_a, test_a = draw(range(4), A, 60), draw(range(4), A, 50)
    train_b, test_b = draw(range(4, 8), B, 60), draw(range(4, 8), B, 50)
    return World(train_a, test_a, train_b, test_b, means)


def acc_on(model: SmallModel, columns: list[str], split: Split) -> float:
    """Class-incremental accuracy: argmax over all of the model's columns."""
    pos = {y: i for i, y in enumerate(columns)}
    with torch.no_grad():
        return accuracy(model(split.x), torch.tensor([pos[y] for y in split.y]))


def agreement(
    teacher: SmallModel, t_labels: list[str], student: SmallModel, s_labels: list[str], x: torch.Tensor
) -> float:
    """How often the student's argmax over the teacher's labels equals the teacher's argmax."""
    with torch.no_grad():
        t = teacher(x)
        s = student(x)[:, column_index(s_labels, t_labels)]
    return float((t.argmax(1) == s.argmax(1)).float().mean())


def kl_to(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 2.0) -> float:
    """KL(softmax(teacher/T) ‖ softmax(student/T)), mean over rows."""
    target = F.softmax(teacher / temperature, 1)
    return float(F.kl_div(F.log_softmax(student / temperature, 1), target, reduction="batchmean"))


def fresh_model(spec: str, num_labels: int, seed: int) -> SmallModel:
    torch.manual_seed(seed)
    return SmallModel(parse_spec(spec), D, num_labels)


# -- SMCF -----------------------------------------------------------------------------------------
@dataclass
class SMCFRun:
    acc_a_after_task1: float
    smcf_a: float
    smcf_b: float
    plain_a: float
    plain_b: float


@pytest.fixture(scope="module")
def smcf_run() -> SMCFRun:
    world = make_world(seed=1)
    cfg = SMCFConfig(epochs=15)
    model = fresh_model("mlp:32", len(A), seed=1)
    bank = StatsBank(D)
    train_task(model, A, TaskData(world.train_a.x, world.train_a.y), bank, cfg, seed=0)
    acc1 = acc_on(model, A, world.test_a)
    bank.add_features(world.train_a.x, world.train_a.y)  # the client's bank after task 1
    prev = snapshot(model)

    plain = copy.deepcopy(model)
    model.grow(len(A + B))
    plain.grow(len(A + B))
    task_b = TaskData(world.train_b.x, world.train_b.y)
    train_task(model, A + B, task_b, bank, cfg, prev_model=prev, seed=1)
    naive = SMCFConfig(epochs=15, replay=False, lambda_old=0, lambda_fm=0)
    train_task(plain, A + B, task_b, bank, naive, prev_model=prev, seed=1)
    return SMCFRun(
        acc1,
        acc_on(model, A + B, world.test_a),
        acc_on(model, A + B, world.test_b),
        acc_on(plain, A + B, world.test_a),
        acc_on(plain, A + B, world.test_b),
    )


def test_smcf_keeps_old_classes_where_plain_fine_tuning_forgets(smcf_run: SMCFRun) -> None:
    r = smcf_run
    assert r.acc_a_after_task1 > 0.9, r
    # plain fine-tuning really forgets (class-incremental argmax favours the new labels) ...
    assert r.plain_a < 0.5, r
    assert r.plain_b > 0.8, r
    # ... while SMCF keeps task A and still learns task B
    assert r.smcf_a > 0.8, r
    assert r.smcf_a > r.plain_a + 0.2, r
    assert r.smcf_b > 0.8, r


def test_snapshot_is_frozen_copy() -> None:
    model = fresh_model("mlp:8", 3, seed=0)
    frozen = snapshot(model)
    assert not frozen.training
    assert all(not p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        model.out.weight.add_(1.0)
    assert not torch.equal(frozen.out.weight, model.out.weight)


def test_train_task_is_deterministic() -> None:
    world = make_world(seed=2)
    bank = StatsBank(D)
    bank.add_features(world.train_a.x, world.train_a.y)
    models = []
    for _ in range(2):
        model = fresh_model("mlp:16", 8, seed=3)
        task = TaskData(world.train_b.x, world.train_b.y)
        train_task(model, A + B, task, bank, SMCFConfig(epochs=3), seed=5)
        models.append(model)
    for (name, p), q in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# -- FM assistance --------------------------------------------------------------------------------
def test_fm_assistance_moves_small_model_towards_assist() -> None:
    world = make_world(seed=3)
    labels = A  # the small model's columns
    assist_labels = ["a3", "other", "a1", "a0"]  # P_c's columns: other order, an extra label, no a2
    assist_means = world.means[[3, 4, 1, 0]]

    def oracle(x: torch.Tensor) -> torch.Tensor:
        # knows the right answer: nearest class mean
        return -((x[:, None, :] - assist_means[None]) ** 2).sum(-1) / 4

    assist = AssistHead(oracle, assist_labels)
    shared = ["a0", "a1", "a3"]
    task = TaskData(world.train_a.x, world.train_a.y)
    kls = {}
    for lam in (0.0, 1.0):
        model = fresh_model("mlp:32", len(labels), seed=4)
        cfg = SMCFConfig(epochs=15, lambda_fm=lam)
        train_task(model, labels, task, StatsBank(D), cfg, assist=assist, seed=0)
        with torch.no_grad():
            x = world.test_a.x
            target = oracle(x)[:, column_index(assist_labels, shared)]
            kls[lam] = kl_to(target, model(x)[:, column_index(labels, shared)])
    # a wrong column mapping (by position instead of by name) only gets to about 0.65x
    assert kls[1.0] < 0.5 * kls[0.0], kls


def test_fm_assistance_off_when_lambda_zero() -> None:
    world = make_world(seed=4)
    task = TaskData(world.train_a.x, world.train_a.y)
    assist = AssistHead(lambda x: torch.randn(len(x), 4), list(A))
    with_assist = fresh_model("mlp:8", 4, seed=5)
    without = fresh_model("mlp:8", 4, seed=5)
    train_task(with_assist, A, task, StatsBank(D), SMCFConfig(epochs=2, lambda_fm=0.0), assist=assist, seed=1)
    train_task(without, A, task, StatsBank(D), SMCFConfig(epochs=2, lambda_fm=0.0), seed=1)
    assert torch.equal(with_assist.out.weight, without.out.weight)


def test_consolidate_pulls_a_weak_small_model_up_to_the_received_head() -> None:
    world = make_world(seed=6)
    labels = A + B
    bank = StatsBank(D, rank=4)
    bank.add_features(torch.cat([world.train_a.x, world.train_b.x]), world.train_a.y + world.train_b.y)
    test = Split(torch.cat([world.test_a.x, world.test_b.x]), world.test_a.y + world.test_b.y)

    def oracle(x: torch.Tensor) -> torch.Tensor:  # P_c that knows every label: nearest class mean
        return -((x[:, None, :] - world.means[None]) ** 2).sum(-1)

    assist = AssistHead(oracle, list(labels))
    weak = fresh_model("mlp:32", len(labels), seed=7)  # untrained: chance level
    untouched = copy.deepcopy(weak)
    consolidate(weak, labels, bank, assist, SMCFConfig(consolidate_steps=0), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(weak.parameters(), untouched.parameters(), strict=True))
    before = acc_on(weak, labels, test)
    consolidate(weak, labels, bank, assist, SMCFConfig(consolidate_steps=200), seed=0)
    after = acc_on(weak, labels, test)
    oracle_acc = accuracy(oracle(test.x), torch.tensor([labels.index(y) for y in test.y]))
    assert before < 0.4 and after > 0.9 * oracle_acc, (before, after, oracle_acc)


# -- OBOD -----------------------------------------------------------------------------------------
# these tests distil through the public features: KD there is what they check (off by default)
OBOD_CFG = OBODConfig(head_spec="mlp:32:gelu", epochs=20, batch_size=128, personal_epochs=4, kd_public=1.0)
NO_ANCHOR_CFG = OBOD_CFG.model_copy(update={"lambda_anchor": 0.0, "lambda_proto": 0.0})


@dataclass
class OBODRun:
    world: World
    public: torch.Tensor
    teacher_a: Teacher
    teacher_b: Teacher
    bank_ab: StatsBank
    g_a: Head  # G after teacher A (defaults)
    g_ab: Head  # G after teacher A then teacher B (defaults)
    g_a_plain: Head  # G after A without anchor / class statistics
    g_ab_plain: Head


@pytest.fixture(scope="module")
def obod_run() -> OBODRun:
    world = make_world(seed=2)
    gen = torch.Generator().manual_seed(11)
    # heterogeneous teachers: a linear one for A, a tanh MLP for B
    ta = fresh_model("linear", len(A), seed=2)
    task_a, task_b = TaskData(world.train_a.x, world.train_a.y), TaskData(world.train_b.x, world.train_b.y)
    train_task(ta, A, task_a, StatsBank(D), SMCFConfig(epochs=30, lr=3e-3))
    tb = fresh_model("mlp:24:tanh", len(B), seed=3)
    train_task(tb, B, task_b, StatsBank(D), SMCFConfig(epochs=20))
    public = torch.randn(1000, D, generator=gen)  # unlabeled, spans the whole feature space
    bank_a = StatsBank(D)
    bank_a.add_features(world.train_a.x, world.train_a.y)
    bank_ab = copy.deepcopy(bank_a)
    bank_ab.add_features(world.train_b.x, world.train_b.y)
    teacher_a, teacher_b = Teacher(ta, A), Teacher(tb, B)

    heads = []
    for cfg in (OBOD_CFG, NO_ANCHOR_CFG):
        torch.manual_seed(5)
        g_a = distill_global(None, teacher_a, public, bank_a, cfg, seed=0)
        g_ab = distill_global(g_a, teacher_b, public, bank_ab, cfg, seed=1)
        heads += [g_a, g_ab]
    return OBODRun(world, public, teacher_a, teacher_b, bank_ab, *heads)


def test_teachers_are_good(obod_run: OBODRun) -> None:
    r = obod_run
    assert acc_on(r.teacher_a.model, A, r.world.test_a) > 0.95
    assert acc_on(r.teacher_b.model, B, r.world.test_b) > 0.95


def test_obod_distils_teacher_through_public_features_alone(obod_run: OBODRun) -> None:
    r = obod_run
    # no class statistics: everything G knows about A comes from the teacher's logits on public features
    torch.manual_seed(6)
    g = distill_global(None, r.teacher_a, r.public, StatsBank(D), OBOD_CFG, seed=0)
    assert g.labels == A
    assert acc_on(g.model, g.labels, r.world.test_a) > 0.9
    assert agreement(r.teacher_a.model, A, g.model, g.labels, r.world.test_a.x) > 0.95


def test_obod_first_teacher_into_global_head(obod_run: OBODRun) -> None:
    r = obod_run
    assert r.g_a.labels == A
    assert acc_on(r.g_a.model, r.g_a.labels, r.world.test_a) > 0.9


def test_obod_second_teacher_adds_labels_without_erasing_first(obod_run: OBODRun) -> None:
    r = obod_run
    g = r.g_ab
    assert g.labels == A + B  # old columns keep their place, new ones are appended
    assert acc_on(g.model, g.labels, r.world.test_a) > 0.9
    assert acc_on(g.model, g.labels, r.world.test_b) > 0.85
    both = Split(torch.cat([r.world.test_a.x, r.world.test_b.x]), r.world.test_a.y + r.world.test_b.y)
    assert acc_on(g.model, g.labels, both) > 0.9
    # the head it started from is not modified (the server still needs G_before)
    assert r.g_a.labels == A
    assert r.g_a.model.num_labels == len(A)


def test_obod_anchor_and_class_statistics_matter(obod_run: OBODRun) -> None:
    r = obod_run
    acc_default = acc_on(r.g_ab.model, r.g_ab.labels, r.world.test_a)
    acc_plain = acc_on(r.g_ab_plain.model, r.g_ab_plain.labels, r.world.test_a)
    assert acc_default > acc_plain + 0.08, (acc_default, acc_plain)

    both = Split(torch.cat([r.world.test_a.x, r.world.test_b.x]), r.world.test_a.y + r.world.test_b.y)
    both_default = acc_on(r.g_ab.model, r.g_ab.labels, both)
    both_plain = acc_on(r.g_ab_plain.model, r.g_ab_plain.labels, both)
    assert both_default > both_plain + 0.05, (both_default, both_plain)

    # the anchor keeps A's logits where teacher A left them, on the public features
    def drift(before: Head, after: Head) -> float:
        with torch.no_grad():
            old = before.model(r.public)
            new = after.model(r.public)[:, column_index(after.labels, before.labels)]
        return float(F.mse_loss(new, old))

    assert drift(r.g_a, r.g_ab) < 0.5 * drift(r.g_a_plain, r.g_ab_plain)


def test_personalise_fits_client_teacher_at_least_as_well_as_global(obod_run: OBODRun) -> None:
    r = obod_run
    g = r.g_ab
    g_weights = {k: v.clone() for k, v in g.model.state_dict().items()}
    p = personalise(g, r.teacher_a, r.public, r.bank_ab, OBOD_CFG, seed=2)
    assert p.labels == g.labels
    assert p.model is not g.model
    for k, v in g.model.state_dict().items():
        assert torch.equal(v, g_weights[k]), k  # G is untouched

    x = r.world.test_a.x
    agree_p = agreement(r.teacher_a.model, A, p.model, p.labels, x)
    assert agree_p >= agreement(r.teacher_a.model, A, g.model, g.labels, x)
    # closer to the teacher on the public features it is fitted on ...
    with torch.no_grad():
        t = r.teacher_a.model(r.public)
        cols = column_index(g.labels, A)
        kl_g = kl_to(t, g.model(r.public)[:, cols])
        kl_p = kl_to(t, p.model(r.public)[:, cols])
    assert kl_p < kl_g, (kl_p, kl_g)
    # ... and on the client's own class points
    with torch.no_grad():
        t = r.teacher_a.model(x)
        kl_g_own, kl_p_own = kl_to(t, g.model(x)[:, cols]), kl_to(t, p.model(x)[:, cols])
    assert kl_p_own <= kl_g_own, (kl_p_own, kl_g_own)
    # still a good head for every label
    assert acc_on(p.model, p.labels, r.world.test_b) > 0.8


def test_personalise_without_epochs_is_a_copy_of_global(obod_run: OBODRun) -> None:
    r = obod_run
    cfg = OBOD_CFG.model_copy(update={"personal_epochs": 0})
    p = personalise(r.g_ab, r.teacher_b, r.public, r.bank_ab, cfg)
    assert p.labels == r.g_ab.labels and p.labels is not r.g_ab.labels
    for (k, v), w in zip(p.model.state_dict().items(), r.g_ab.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


# -- metrics ---------------------------------------------------------------------------------------
def test_accuracy() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(3 / 4)
    assert math.isnan(accuracy(torch.empty(0, 2), torch.empty(0, dtype=torch.long)))


def test_metrics_on_two_task_matrix() -> None:
    r: Matrix = [[0.9, None], [0.7, 0.8]]
    assert acc_avg(r) == pytest.approx((0.7 + 0.8) / 2)
    assert forgetting(r) == pytest.approx(0.9 - 0.7)
    assert backward_transfer(r) == pytest.approx(0.7 - 0.9)


def test_metrics_on_three_task_matrix_follow_formulas() -> None:
    r: Matrix = [
        [0.95, None, None],
        [0.80, 0.90, None],
        [0.60, 0.85, 0.70],
    ]
    final = len(r) - 1
    expected_acc = (0.60 + 0.85 + 0.70) / 3
    # forgetting: best earlier accuracy minus final, per old task
    expected_forgetting = ((max(0.95, 0.80) - 0.60) + (0.90 - 0.85)) / 2
    # bwt: final minus just-learnt accuracy, per old task
    expected_bwt = ((0.60 - 0.95) + (0.85 - 0.90)) / 2
    assert acc_avg(r) == pytest.approx(expected_acc)
    assert forgetting(r) == pytest.approx(expected_forgetting)
    assert backward_transfer(r) == pytest.approx(expected_bwt)
    assert final == 2

    # forgetting uses the max over history, bwt the diagonal: they differ when accuracy rose then fell
    rising: Matrix = [
        [0.5, None, None],
        [0.9, 0.7, None],
        [0.6, 0.8, 0.75],
    ]
    assert forgetting(rising) == pytest.approx(((0.9 - 0.6) + (0.7 - 0.8)) / 2)
    assert backward_transfer(rising) == pytest.approx(((0.6 - 0.5) + (0.8 - 0.7)) / 2)


def test_metrics_edge_cases() -> None:
    assert acc_avg([]) is None
    assert acc_avg([[None, None]]) is None
    assert forgetting([[0.9]]) is None
    assert backward_transfer([[0.9]]) is None
    # missing entries are skipped, not counted as zero
    assert acc_avg([[0.9, None], [None, 0.6]]) == pytest.approx(0.6)
    assert forgetting([[0.9, None], [None, 0.6]]) is None
    block = summarize([[0.9, None], [0.7, 0.8]], 0.75)
    assert block["acc_final"] == 0.75
    assert block["forgetting"] == pytest.approx(0.2)
    assert block["bwt"] == pytest.approx(-0.2)
    assert block["acc_avg"] == pytest.approx(0.75)


def test_mean_matrix_ignores_missing_entries() -> None:
    m1: Matrix = [[0.8, None], [0.6, 0.9]]
    m2: Matrix = [[0.6, None], [None, 0.7]]
    m3: Matrix = [[1.0, None], [0.4, 0.5]]
    out = mean_matrix([m1, m2, m3])
    assert out[0][0] == pytest.approx((0.8 + 0.6 + 1.0) / 3)
    assert out[0][1] is None
    assert out[1][0] == pytest.approx((0.6 + 0.4) / 2)
    assert out[1][1] == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert mean_matrix([]) == []
