"""In-scope coverage of every deployable threshold on any `fcl-data split` (no out-of-scope data needed):
`python -m benchmarks.oos_coverage --data SPLIT_DIR [--stats-coverage 0.995]`.

A check, on data other than CLINC150, of how close each head's threshold comes to its coverage target
on real test text (docs/abstention.md). Runs `ours` as benchmarks.run does (seed 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.evaluate import Recorder
from benchmarks.oos import calibrated_job, client_data, evaluated, rates
from benchmarks.ours import ours_variant, run_ours
from benchmarks.scenario import Featurizer, custom
from common.algorithms.obod import Head
from common.algorithms.smcf import TaskData
from common.config import AbstentionConfig, OBODConfig, SMCFConfig
from common.fm import DEFAULT_FM, FoundationModel
from fcl_client.learner import Learner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="an fcl-data split directory")
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"), help="FM feature cache")
    parser.add_argument("--stats-coverage", type=float, default=AbstentionConfig().stats_coverage)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sc = custom(args.data, Featurizer(FoundationModel(DEFAULT_FM, device="cpu"), args.cache))
    cfg = AbstentionConfig(stats_coverage=args.stats_coverage)
    smcf, obod, specs = ours_variant("ours", SMCFConfig(), OBODConfig())
    final: dict[str, object] = {}

    def keep(learners: dict[str, Learner], g: Head | None, _bank: object) -> None:
        final.update(learners=learners, g=g)

    torch.manual_seed(0)
    run_ours(sc, 0, Recorder(sc), smcf, obod, specs, calibrated_job(cfg, {}), cfg, keep)
    g: Head = final["g"]  # type: ignore[assignment]
    learners: dict[str, Learner] = final["learners"]  # type: ignore[assignment]
    none = torch.zeros(1, sc.feature_dim)  # no out-of-scope set: coverage and accuracy only
    test = TaskData(
        torch.cat([sc.global_test[t].features for t in sc.tasks]),
        [y for t in sc.tasks for y in sc.global_test[t].labels],
    )
    print(f"target coverage {cfg.coverage}, server stats_coverage {cfg.stats_coverage}")
    global_rates = rates(evaluated(g.model, g.labels, test, none), g.abstention)
    print(f"FM-global (stats): coverage {global_rates['in_scope_coverage']:.3f}")
    for c, lr in learners.items():
        if lr.personal is None or lr.model is None:
            continue
        own = client_data(sc, c)
        personal = evaluated(lr.personal.model, lr.personal.labels, own, none)
        small = evaluated(lr.model, lr.labels, own, none)
        print(
            f"{c}: FM-personal stats {rates(personal, lr.personal.abstention)['in_scope_coverage']:.3f}, "
            f"holdout {rates(personal, lr.personal_threshold)['in_scope_coverage']:.3f}; "
            f"small holdout {rates(small, lr.small_threshold)['in_scope_coverage']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
