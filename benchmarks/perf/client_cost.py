"""Client cost: SMCF seconds and peak RSS per task on a CLINC150 scenario, in a process of its own.

`python -m benchmarks.perf.client_cost --data DIR --out FILE` loads the FM (as a client does), then
runs every client's task stream with the client's own Learner: SMCF training, the upload package, and
consolidation towards the P_c the server's OBOD job (run here, not timed) sends back. A process of its
own, so its peak RSS is a client's and not the perf benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.ours import HETERO_SPECS, client_rounds, make_learners
from benchmarks.perf.util import MB, RssSampler, median, rss_bytes
from benchmarks.scenario import Featurizer, clinc150
from common.algorithms.obod import Head, Teacher, run_job
from common.algorithms.stats import StatsBank
from common.config import OBODConfig, SMCFConfig
from common.fm import DEFAULT_FM, FoundationModel
from common.package import decode_package, encode_package


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # ru_maxrss is in KiB


def measure(data: Path, scenario: str, seed: int, cache: Path, max_tasks: int) -> dict[str, Any]:
    fm = FoundationModel(DEFAULT_FM, device="cpu")  # a client holds its FM for its whole life
    rss_with_fm = rss_bytes() / MB
    sc = clinc150(data, scenario, seed, Featurizer(fm, cache))
    smcf, obod = SMCFConfig(), OBODConfig()
    learners = make_learners(sc, HETERO_SPECS)
    global_head: Head | None = None
    bank = StatsBank(sc.feature_dim)
    tasks: list[dict[str, Any]] = []
    for t in range(min(max_tasks, len(sc.tasks))):
        rows: list[dict[str, Any]] = []
        for client, task, s in client_rounds(sc, seed, t):
            learner = learners[client]
            with RssSampler(every_s=0.005) as sampler:
                started = time.perf_counter()
                learner.train(task.features, task.labels, smcf, seed=s)
                train_s = time.perf_counter() - started
                wire = encode_package(learner.package(smcf, seed=s))
                package_s = time.perf_counter() - started - train_s
            pkg = decode_package(wire)
            out = run_job(global_head, bank, Teacher.from_package(pkg), pkg.stats, sc.public, obod, seed=s)
            global_head, bank = out.global_head, out.bank
            consolidate_s = time.perf_counter()
            learner.absorb_personal(out.personal_head, t + 1, smcf, seed=s)
            consolidate_s = time.perf_counter() - consolidate_s
            rows.append(
                {
                    "client": client,
                    "spec": learner.spec.model_dump(),
                    "examples": len(task.labels),
                    "labels_seen": len(learner.labels),
                    "smcf_s": train_s,
                    "package_s": package_s,
                    "consolidate_s": consolidate_s,
                    "package_bytes": len(wire),
                    "rss_growth_mb": sampler.peak_growth() / MB,
                }
            )
        tasks.append(
            {
                "task": t,
                "clients": rows,
                "smcf_s_mean": sum(r["smcf_s"] for r in rows) / len(rows),
                "smcf_s_max": max(r["smcf_s"] for r in rows),
                "client_s_mean": sum(r["smcf_s"] + r["package_s"] + r["consolidate_s"] for r in rows)
                / len(rows),
                "peak_rss_mb_so_far": peak_rss_mb(),
            }
        )
    every = [r for task in tasks for r in task["clients"]]
    return {
        "what": (
            f"{scenario} seed {seed}, five clients with {', '.join(HETERO_SPECS)}; per task and client: "
            "Learner.train (SMCF, default SMCFConfig), the upload package (encode), Learner.absorb_personal "
            "(consolidation towards the P_c from the real OBOD job, which is run but not timed); FM features "
            "from the benchmark cache; peak RSS of this process, which holds the FM as a client does"
        ),
        "torch_threads": torch.get_num_threads(),
        "rss_after_fm_load_mb": rss_with_fm,
        "tasks": tasks,
        "smcf_s_per_task_median": median([r["smcf_s"] for r in every]),
        "smcf_s_per_task_max": max(r["smcf_s"] for r in every),
        "client_s_per_task_median": median(
            [r["smcf_s"] + r["package_s"] + r["consolidate_s"] for r in every]
        ),
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="CLINC150 directory")
    parser.add_argument("--scenario", default="clinc150-5x5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--max-tasks", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.data, args.scenario, args.seed, args.cache, args.max_tasks)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
