"""Baselines of BENCHMARK.md (joint, zeroshot, local, fedavg-ft, fedlwf, fedavg-smcf, feddf), in-process.

Every method follows `benchmarks.ours.run_ours`: per task, the clients (in `sc.clients` order) that have
data for it train one round, then the server does its part, then ONE `rec.after_task` call records what
each part would deploy. Training reuses the project's algorithm code (`train_task`, `kd_loss`, `Learner`);
seeds follow `seed * 10_000 + t * 100 + client_index` (the server's work in a task uses index 99).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.evaluate import Predictor, Recorder, predictor
from benchmarks.ours import (
    DIGEST,
    HETERO_SPECS,
    HOMO_SPECS,
    Traffic,
    client_rounds,
    job_seed,
    make_learners,
    run_ours,
    task_data,
)
from benchmarks.scenario import Scenario
from common.algorithms.closed_form import lda_head
from common.algorithms.losses import adam, column_index, kd_loss
from common.algorithms.obod import Head, JobOutcome, Teacher, merged_bank
from common.algorithms.smcf import TaskData, snapshot, train_task
from common.algorithms.stats import StatsBank
from common.config import OBODConfig, SMCFConfig
from common.package import KnowledgePackage, decode_package, encode_package
from common.zoo import SmallModel, parse_spec

Method = Callable[[Scenario, int, Recorder, SMCFConfig, OBODConfig], Traffic]

JOINT_EPOCHS = 30  # centralised training from scratch on everything seen so far: train to convergence
SERVER_SLOT = 99  # seed slot of the server's work in a task (client slots are 0..98)


def _cat(parts: list[TaskData]) -> TaskData:
    return TaskData(torch.cat([p.features for p in parts]), [y for p in parts for y in p.labels])


def _package_bytes(model: SmallModel, labels: list[str], kind: str = "small") -> int:
    return len(encode_package(KnowledgePackage.from_model(model, labels, DIGEST, kind)))


# -- joint: centralised upper bound ----------------------------------------------------------------


def run_joint(sc: Scenario, seed: int, rec: Recorder, smcf: SMCFConfig, obod: OBODConfig) -> Traffic:
    """After each task, a fresh FM-global-sized head trained on every client's data of the tasks so far."""
    spec = parse_spec(obod.head_spec)
    cfg = smcf.model_copy(
        update={"epochs": JOINT_EPOCHS, "replay": False, "lambda_old": 0.0, "lambda_fm": 0.0}
    )
    pooled: list[TaskData] = []
    for t, task in enumerate(sc.tasks):
        pooled += [d for c in sc.clients if (d := task_data(sc, c, task)) is not None]
        if not pooled:
            continue
        data = _cat(pooled)
        labels = list(dict.fromkeys(data.labels))
        s = job_seed(seed, t, SERVER_SLOT)
        torch.manual_seed(s)
        model = SmallModel(spec, sc.feature_dim, len(labels))
        train_task(model, labels, data, StatsBank(sc.feature_dim), cfg, None, None, s)
        rec.after_task(t, global_head=predictor(model, labels))
    return Traffic()


# -- zeroshot: the FM alone ------------------------------------------------------------------------


def zeroshot_predictor(sc: Scenario, labels: list[str]) -> Predictor:
    """Cosine similarity of the features to the embedding of each label's name."""
    known = [y for y in labels if y in sc.label_embeddings]
    names = F.normalize(torch.stack([sc.label_embeddings[y] for y in known]).float(), dim=1)

    def forward(features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=1) @ names.T

    return Predictor(forward, known)


def run_zeroshot(sc: Scenario, seed: int, rec: Recorder, smcf: SMCFConfig, obod: OBODConfig) -> Traffic:
    labels: set[str] = set()
    for t, task in enumerate(sc.tasks):
        labels.update(sc.global_test[task].labels)
        rec.after_task(t, global_head=zeroshot_predictor(sc, sorted(labels)))
    return Traffic()


# -- local: each client alone with SMCF ------------------------------------------------------------


def run_local(sc: Scenario, seed: int, rec: Recorder, smcf: SMCFConfig, obod: OBODConfig) -> Traffic:
    cfg = smcf.model_copy(update={"lambda_fm": 0.0})  # no FM head to assist: there is no server
    learners = make_learners(sc, HETERO_SPECS)
    for t in range(len(sc.tasks)):
        for client, data, s in client_rounds(sc, seed, t):
            learners[client].train(data.features, data.labels, cfg, seed=s)
        rec.after_task(
            t, small={c: predictor(lr.model, lr.labels) for c, lr in learners.items() if lr.model is not None}
        )
    return Traffic()


# -- FedAvg of identical heads: plain fine-tuning, LwF, or SMCF ------------------------------------


LWF_WEIGHT = 1.0


def fedavg_config(mode: str, smcf: SMCFConfig) -> SMCFConfig:
    """The local training of each FedAvg variant (never FM assistance: FedAvg has no FM head)."""
    if mode == "ft":
        return smcf.model_copy(update={"replay": False, "lambda_old": 0.0, "lambda_fm": 0.0})
    if mode == "lwf":
        # LwF is the whole method here, so it keeps DESIGN's weight even where SMCF's default is 0
        lambda_old = smcf.lambda_old or LWF_WEIGHT
        return smcf.model_copy(update={"replay": False, "lambda_old": lambda_old, "lambda_fm": 0.0})
    if mode == "smcf":
        return smcf.model_copy(update={"lambda_fm": 0.0})
    raise ValueError(f"unknown FedAvg mode {mode!r}")


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg: the weighted mean of the clients' state dicts."""
    total = float(sum(weights))
    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in states[0].items()}
    for state, weight in zip(states, weights, strict=True):
        for k, v in state.items():
            out[k] += (weight / total) * v.float()
    return out


def run_fedavg(sc: Scenario, seed: int, rec: Recorder, cfg: SMCFConfig) -> Traffic:
    """One FedAvg round per task over identical heads whose columns are the global label list.

    The server's label list grows with every label a client of the round has (clients announce their
    label names), the global model is grown to it, every client of the round trains a copy on its task
    (LwF target, when cfg.lambda_old > 0: the global model at the start of the task; replay, when
    cfg.replay: the client's own statistics of the labels it has seen) and the server averages them,
    weighted by the number of training examples. Each client deploys the averaged model.
    """
    spec = parse_spec(HOMO_SPECS[0])
    use_prev = cfg.lambda_old > 0
    banks = {c: StatsBank(sc.feature_dim, cfg.stats_rank) for c in sc.clients}
    model: SmallModel | None = None
    labels: list[str] = []
    joined: list[str] = []
    traffic = Traffic()
    for t, task in enumerate(sc.tasks):
        round_data = {c: d for c in sc.clients if (d := task_data(sc, c, task)) is not None}
        if round_data:
            prev = snapshot(model) if model is not None and use_prev else None
            labels = list(dict.fromkeys([*labels, *(y for d in round_data.values() for y in d.labels)]))
            torch.manual_seed(job_seed(seed, t, SERVER_SLOT))
            if model is None:
                model = SmallModel(spec, sc.feature_dim, len(labels))
            else:
                model.grow(len(labels))
            states: list[dict[str, torch.Tensor]] = []
            weights: list[float] = []
            for i, client in enumerate(sc.clients):
                data = round_data.get(client)
                if data is None:
                    continue
                s = job_seed(seed, t, i)
                torch.manual_seed(s)
                local = copy.deepcopy(model)
                train_task(local, labels, data, banks[client], cfg, prev, None, s)
                banks[client].add_features(data.features, data.labels)
                traffic.up += _package_bytes(local, labels)
                states.append(local.state_dict())
                weights.append(float(len(data.labels)))
                if client not in joined:
                    joined.append(client)
            model.load_state_dict(average_states(states, weights))
            traffic.down += _package_bytes(model, labels) * len(states)
            traffic.rounds += len(states)
        if model is not None:
            deployed = predictor(model, labels)
            rec.after_task(t, global_head=deployed, small={c: deployed for c in joined})
    return traffic


def _fedavg(mode: str) -> Method:
    def run(sc: Scenario, seed: int, rec: Recorder, smcf: SMCFConfig, obod: OBODConfig) -> Traffic:
        return run_fedavg(sc, seed, rec, fedavg_config(mode, smcf))

    return run


# -- FedDF: heterogeneous heads, ensemble distillation on the public corpus -----------------------


@torch.no_grad()
def ensemble_target(
    teachers: list[Teacher], labels: list[str], public: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per label, the mean of softmax(teacher/T) over the teachers that know it; rows renormalised."""
    total = torch.zeros(len(public), len(labels))
    count = torch.zeros(len(labels))
    for teacher in teachers:
        cols = column_index(labels, teacher.labels)
        total[:, cols] += F.softmax(teacher.model.eval()(public) / temperature, dim=1)
        count[cols] += 1
    mean = total / count.clamp_min(1)
    return mean / mean.sum(dim=1, keepdim=True).clamp_min(1e-12)


def distill_ensemble(
    head: Head | None, teachers: list[Teacher], public: torch.Tensor, cfg: OBODConfig, seed: int = 0
) -> Head:
    """G ← KL(ensemble ‖ softmax(G/T))·T² on the public features; G continues from `head`, grown to the union
    of the teachers' labels. No statistics bank, no anchor."""
    labels = list(head.labels) if head is not None else []
    labels = list(dict.fromkeys([*labels, *(y for teacher in teachers for y in teacher.labels)]))
    torch.manual_seed(seed)
    if head is None:
        new = Head(SmallModel(parse_spec(cfg.head_spec), public.shape[1], len(labels)), labels)
    else:
        new = head.copy()
        new.labels = labels
        new.model.grow(len(labels))
    target = ensemble_target(teachers, labels, public, cfg.temperature)
    # kd_loss takes teacher logits: T·log p gives softmax(·/T) = p exactly
    target_logits = cfg.temperature * target.clamp_min(1e-12).log()
    gen = torch.Generator().manual_seed(seed)
    opt = adam(new.model.parameters(), cfg.lr)
    steps = max(cfg.min_steps, cfg.epochs * max(1, -(-len(public) // cfg.batch_size)))
    order = torch.empty(0, dtype=torch.long)
    new.model.train()
    for _ in range(steps):
        if len(order) < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(public), generator=gen)])
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        loss = kd_loss(target_logits[idx], new.model(public[idx]), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    new.model.eval()
    return new


# FedDF keeps its own server head and schedule: the wide MLP it scored best with on CLINC150 val
# (0.921 there); `ours`' tuned linear head would weaken this baseline (0.852 on test).
FEDDF_SERVER = OBODConfig(head_spec="mlp:768:gelu", lr=1e-3, epochs=8)


def run_feddf(sc: Scenario, seed: int, rec: Recorder, smcf: SMCFConfig, obod: OBODConfig) -> Traffic:
    """Clients: SMCF without FM assistance on heterogeneous heads, uploading weights (no statistics).
    Server, once per task after the round: distil the ensemble of every client's latest upload into G."""
    cfg = smcf.model_copy(update={"lambda_fm": 0.0, "share_stats": False})
    learners = make_learners(sc, HETERO_SPECS)
    latest: dict[str, Teacher] = {}
    head: Head | None = None
    traffic = Traffic()
    for t in range(len(sc.tasks)):
        uploads = 0
        for client, data, s in client_rounds(sc, seed, t):
            learner = learners[client]
            learner.train(data.features, data.labels, cfg, seed=s)
            wire = encode_package(learner.package(cfg, seed=s))  # exactly what would be uploaded
            pkg = decode_package(wire)
            latest[client] = Teacher.from_package(pkg)
            traffic.up += len(wire)
            uploads += 1
        if uploads:
            teachers = [latest[c] for c in sc.clients if c in latest]
            server_cfg = FEDDF_SERVER.model_copy(update={"min_steps": obod.min_steps})
            server_seed = job_seed(seed, t, SERVER_SLOT)
            head = distill_ensemble(head, teachers, sc.public, server_cfg, seed=server_seed)
            # the fused global head is broadcast to the clients of the round (as `ours` returns a head)
            traffic.down += _package_bytes(head.model, head.labels, "head") * uploads
            traffic.rounds += uploads
        rec.after_task(
            t,
            global_head=predictor(head.model, head.labels) if head is not None else None,
            small={c: predictor(lr.model, lr.labels) for c, lr in learners.items() if lr.model is not None},
        )
    return traffic


# -- stats-closed-form: LDA from the pooled statistics, no training on the server -------------------

# shrinkage of the pooled covariance towards a scaled identity. On CLINC150 val (clinc150-5x5, seed 0)
# accuracy is flat below 0.05 (0.933 at 0 and 0.02, 0.932 at 0.1, 0.928 at 0.5): a little shrinkage
# keeps Σ invertible while only a few labels are known, and costs nothing measurable.
CLOSED_FORM_SHRINKAGE = 0.02


def closed_form_job(
    global_head: Head | None,
    bank: StatsBank,
    teacher: Teacher,
    teacher_stats: StatsBank | None,
    *_: object,
    **__: object,
) -> JobOutcome:
    """The server's part of `stats-closed-form`: merge the upload's statistics, G = P_c = LDA of the bank.

    It takes run_job's arguments and ignores the rest (public corpus, config, seed): nothing is trained."""
    merged = merged_bank(bank, teacher_stats)
    head = lda_head(merged, CLOSED_FORM_SHRINKAGE)
    return JobOutcome(head, head.copy(), merged)


def run_stats_closed_form(
    sc: Scenario, seed: int, rec: Recorder, smcf: SMCFConfig, obod: OBODConfig
) -> Traffic:
    """Clients exactly as in `ours` (SMCF, statistics shared, P_c assisting); the server computes LDA."""
    return run_ours(sc, seed, rec, smcf, obod, HETERO_SPECS, job=closed_form_job)


METHODS: dict[str, Method] = {
    "joint": run_joint,
    "zeroshot": run_zeroshot,
    "local": run_local,
    "fedavg-ft": _fedavg("ft"),
    "fedlwf": _fedavg("lwf"),
    "fedavg-smcf": _fedavg("smcf"),
    "feddf": run_feddf,
    "stats-closed-form": run_stats_closed_form,
}
