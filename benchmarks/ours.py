"""`ours` and its ablations, in-process: the client Learner (SMCF) and the server's OBOD job."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks.evaluate import Recorder, predictor
from benchmarks.scenario import Scenario
from common.algorithms.obod import Head, JobOutcome, Teacher, run_job
from common.algorithms.smcf import TaskData
from common.algorithms.stats import StatsBank
from common.config import AbstentionConfig, OBODConfig, SMCFConfig
from common.package import KnowledgePackage, decode_package, encode_package
from common.zoo import parse_spec
from fcl_client.learner import Learner

# five different zoo specs for five clients (heterogeneous small models); cycled for more clients
HETERO_SPECS = ["mlp:256", "linear", "mlp:512,128:gelu", "mlp:384:tanh", "mlp:1024:relu:ln"]
HOMO_SPECS = ["mlp:256"]


DIGEST = "bench"  # in-process runs have no server FM to name; packages carry this placeholder


def job_seed(seed: int, t: int, slot: int) -> int:
    """Seed of one client's (slot 0..98) or the server's (slot 99) work in task t."""
    return seed * 10_000 + t * 100 + slot


def task_data(sc: Scenario, client: str, task: str) -> TaskData | None:
    data = sc.train[client].get(task)
    return data if data is not None and data.labels else None


def client_rounds(sc: Scenario, seed: int, t: int) -> Iterator[tuple[str, TaskData, int]]:
    """The clients with data in task t, in arrival (client) order, with their job seed (torch seeded)."""
    index = {c: i for i, c in enumerate(sc.clients)}  # seeds follow the client, not its arrival slot
    for client in sc.arrival_order(sc.tasks[t]):
        i = index[client]
        data = task_data(sc, client, sc.tasks[t])
        if data is None:
            continue
        s = job_seed(seed, t, i)
        torch.manual_seed(s)
        yield client, data, s


def make_learners(
    sc: Scenario, specs: list[str], abstention: AbstentionConfig | None = None
) -> dict[str, Learner]:
    """One Learner per client, specs cycled by client index; abstention off unless asked for (its
    calibration copy doubles a client's training, and accuracy does not depend on it)."""
    cfg = abstention or AbstentionConfig(enabled=False)
    return {
        c: Learner(parse_spec(specs[i % len(specs)]), sc.feature_dim, DIGEST, abstention=cfg)
        for i, c in enumerate(sc.clients)
    }


@dataclass
class Traffic:
    up: int = 0
    down: int = 0
    rounds: int = 0


ServerJob = Callable[..., JobOutcome]
Finished = Callable[[dict[str, Learner], Head | None, StatsBank], None]


def run_ours(
    sc: Scenario,
    seed: int,
    rec: Recorder,
    smcf: SMCFConfig,
    obod: OBODConfig,
    specs: list[str],
    job: ServerJob = run_job,
    abstention: AbstentionConfig | None = None,
    finished: Finished | None = None,
) -> Traffic:
    """Every task: each client (in client order) trains with SMCF, uploads; the server `job` (OBOD unless
    a rival replaces it) runs on each upload, in arrival order. With `abstention` the clients calibrate
    thresholds as fcl-client does; `finished` is handed the learners, G and the bank at the end."""
    learners = make_learners(sc, specs, abstention)
    global_head: Head | None = None
    bank = StatsBank(sc.feature_dim)
    traffic = Traffic()
    for t in range(len(sc.tasks)):
        for client, data, s in client_rounds(sc, seed, t):
            learner = learners[client]
            learner.train(data.features, data.labels, smcf, seed=s)
            wire = encode_package(learner.package(smcf, seed=s))  # exactly what would be uploaded
            pkg = decode_package(wire)
            out = job(global_head, bank, Teacher.from_package(pkg), pkg.stats, sc.public, obod, seed=s)
            global_head, bank = out.global_head, out.bank
            learner.absorb_personal(out.personal_head, t + 1, smcf, seed=s)
            head_wire = encode_package(
                KnowledgePackage.from_model(out.personal_head.model, out.personal_head.labels, DIGEST, "head")
            )
            traffic.up += len(wire)
            traffic.down += len(head_wire)
            traffic.rounds += 1
        active = {c: lr for c, lr in learners.items() if lr.model is not None}
        rec.after_task(
            t,
            global_head=predictor(global_head.model, global_head.labels) if global_head else None,
            personal={
                c: predictor(lr.personal.model, lr.personal.labels) for c, lr in active.items() if lr.personal
            },
            small={c: predictor(lr.model, lr.labels) for c, lr in active.items() if lr.model is not None},
        )
    if finished is not None:
        finished(learners, global_head, bank)
    return traffic


def ours_variant(name: str, smcf: SMCFConfig, obod: OBODConfig) -> tuple[SMCFConfig, OBODConfig, list[str]]:
    """The SMCF and OBOD configs and the specs of `ours`, one of its ablations, or `stats-only`."""
    specs = HETERO_SPECS
    if name in ("ours-noproto", "ours-noproto-noinv"):
        smcf = smcf.model_copy(update={"share_stats": False})
    if name == "ours-noproto-noinv":
        # OBOD before teacher inversion: the teachers reach G only through KD on the public corpus
        obod = obod.model_copy(update={"synth_per_label": 0, "kd_public": 1.0})
    if name == "ours-noassist":
        smcf = smcf.model_copy(update={"lambda_fm": 0.0, "consolidate_steps": 0})
    elif name == "ours-nosmcf":
        smcf = smcf.model_copy(update={"replay": False, "lambda_old": 0.0, "consolidate_steps": 0})
    elif name == "ours-homo":
        specs = HOMO_SPECS
    elif name == "stats-only":
        # FedPFT-style: G and P_c learn from the pooled statistics alone; the uploaded teachers are ignored
        obod = obod.model_copy(update={"lambda_kd": 0.0, "synth_per_label": 0})
    elif name not in OURS:
        raise ValueError(f"unknown variant {name}")
    return smcf, obod, specs


OURS = ["ours", "ours-noproto", "ours-noproto-noinv", "ours-noassist", "ours-nosmcf", "ours-homo"]
