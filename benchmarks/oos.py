"""Out-of-scope abstention on CLINC150 (docs/abstention.md): `python -m benchmarks.oos --data D --out F`.

Runs `ours` on a CLINC150 scenario exactly as benchmarks.run does (the same seeds, so the same accuracy),
with the clients calibrating their thresholds as fcl-client does and the server's G and P_c calibrated
on the statistics bank as fcl-server does. Then, for FM-global, FM-personal and the small models, reports
in-scope accuracy (an abstention counts as an error) and out-of-scope recall on test + oos_test at
  (a) the deployable thresholds, calibrated without any out-of-scope data, and
  (b) the threshold that maximises accuracy over val + oos_val (oos as a 151st class), as in the
      published oos-threshold baselines (Larson et al., EMNLP 2019).
It also compares the confidence scores (msp, energy) threshold-free, by AUROC on val + oos_val.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.evaluate import Recorder
from benchmarks.ours import ours_variant, run_ours
from benchmarks.scenario import Featurizer, Scenario, clinc150
from common.algorithms.abstention import (
    SCORES,
    Threshold,
    abstains,
    calibrate_on_stats,
    calibrate_threshold,
    confidence,
    stats_features,
)
from common.algorithms.obod import Head, JobOutcome, run_job
from common.algorithms.smcf import TaskData
from common.algorithms.stats import StatsBank
from common.config import AbstentionConfig, OBODConfig, SMCFConfig
from common.fm import DEFAULT_FM, FoundationModel
from fcl_client.learner import Learner


@dataclass
class Evaluated:
    """A model's logits on one in-scope set and on the out-of-scope set, with its label names."""

    logits_in: torch.Tensor
    labels_in: list[str]
    logits_oos: torch.Tensor
    names: list[str]

    def correct(self) -> torch.Tensor:
        pos = {y: i for i, y in enumerate(self.names)}
        truth = torch.tensor([pos.get(y, -1) for y in self.labels_in], dtype=torch.long)
        return self.logits_in.argmax(dim=1) == truth


@torch.no_grad()
def evaluated(model: torch.nn.Module, names: list[str], data: TaskData, oos: torch.Tensor) -> Evaluated:
    model.eval()
    return Evaluated(model(data.features), list(data.labels), model(oos), list(names))


def rates(ev: Evaluated, threshold: Threshold | None) -> dict[str, float]:
    """In-scope accuracy (abstaining = wrong), in-scope coverage and out-of-scope recall at a threshold."""
    kept = ~abstains(ev.logits_in, threshold)
    return {
        "in_scope_acc": float((ev.correct() & kept).float().mean()),
        "in_scope_coverage": float(kept.float().mean()),
        "oos_recall": float(abstains(ev.logits_oos, threshold).float().mean()),
    }


def auroc(ev: Evaluated, score: str) -> float:
    """P(an in-scope text scores above an out-of-scope one): the score's ranking quality, threshold-free."""
    s_in, s_oos = confidence(ev.logits_in, score), confidence(ev.logits_oos, score)
    above = (s_in[:, None] > s_oos[None, :]).float().mean()
    ties = (s_in[:, None] == s_oos[None, :]).float().mean()
    return float(above + 0.5 * ties)


def best_val_threshold(ev: Evaluated, score: str) -> Threshold:
    """The threshold maximising accuracy over val + oos_val, out_of_scope counted as a class."""
    s_in, s_oos = confidence(ev.logits_in, score), confidence(ev.logits_oos, score)
    good = s_in[ev.correct()].sort().values
    oos = s_oos.sort().values
    candidates = torch.cat([torch.tensor([float("-inf")]), s_in, s_oos]).unique()
    # at threshold t: correct in-scope kept = #good >= t; oos caught = #oos < t
    kept = len(good) - torch.searchsorted(good, candidates, side="left")
    caught = torch.searchsorted(oos, candidates, side="left")
    total = (kept + caught).float() / (len(s_in) + len(s_oos))
    best = int(total.argmax())
    value = float(candidates[best]) if best else float(s_in.min()) - 1.0
    coverage = max(1e-6, float((s_in >= value).float().mean()))
    return Threshold(value, score, min(1.0, coverage), "val+oos_val", len(s_in) + len(s_oos))


def calibrated_job(
    cfg: AbstentionConfig, pseudo_scores: dict[int, torch.Tensor]
) -> Callable[..., JobOutcome]:
    """OBOD's job, then G's and P_c's thresholds on the merged bank, as fcl_server.worker does; each
    head's scores on those pseudo-features go into `pseudo_scores` (by id of the head)."""

    def job(*args: object, **kwargs: object) -> JobOutcome:
        out = run_job(*args, **kwargs)  # type: ignore[arg-type]
        seed = int(kwargs.get("seed", 0))  # type: ignore[call-overload]
        for head, offset in ((out.global_head, 0), (out.personal_head, 1)):
            head.abstention = calibrate_on_stats(
                head.model, head.labels, out.bank, cfg.stats_coverage, cfg.score, seed=seed + offset
            )
            with torch.no_grad():
                feats = stats_features(out.bank, head.labels, seed=seed + offset)
                pseudo_scores[id(head)] = confidence(head.model(feats), cfg.score)
        return out

    return job


def stats_coverage_matching_val(pseudo: torch.Tensor, val: Evaluated, coverage: float, score: str) -> float:
    """The coverage to aim for on the pseudo-features so that `coverage` of real val texts is kept."""
    return float((pseudo >= calibrate_threshold(confidence(val.logits_in, score), coverage)).float().mean())


def client_data(sc: Scenario, client: str) -> TaskData:
    parts = [d for d in sc.test[client].values() if d.labels]
    return TaskData(torch.cat([p.features for p in parts]), [y for p in parts for y in p.labels])


def restrict(data: TaskData, labels: set[str]) -> TaskData:
    rows = [i for i, y in enumerate(data.labels) if y in labels]
    return TaskData(data.features[torch.tensor(rows, dtype=torch.long)], [data.labels[i] for i in rows])


def threshold_dict(t: Threshold | None) -> dict[str, object] | None:
    return None if t is None else json.loads(t.to_json())


def part_report(
    test: list[Evaluated], val: list[Evaluated], deployable: dict[str, list[Threshold | None]], score: str
) -> dict[str, object]:
    """One part's table: mean over its models (one for G, one per client otherwise)."""

    def mean_rates(thresholds: list[Threshold | None]) -> dict[str, float]:
        rows = [rates(ev, t) for ev, t in zip(test, thresholds, strict=True)]
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

    val_thresholds: list[Threshold | None] = [best_val_threshold(ev, score) for ev in val]
    return {
        "models": len(test),
        "no_abstention": mean_rates([None] * len(test)),
        **{f"deployable_{name}": mean_rates(ts) for name, ts in deployable.items()},
        "val_oos_val": mean_rates(val_thresholds),
        "thresholds": {
            **{f"deployable_{name}": [threshold_dict(t) for t in ts] for name, ts in deployable.items()},
            "val_oos_val": [threshold_dict(t) for t in val_thresholds],
        },
        "auroc_val": {s: sum(auroc(ev, s) for ev in val) / len(val) for s in SCORES},
        "auroc_test": {s: sum(auroc(ev, s) for ev in test) / len(test) for s in SCORES},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="CLINC150 dir (data_full.json)")
    parser.add_argument("--scenario", default="clinc150-5x5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"), help="FM feature cache")
    parser.add_argument("--coverage", type=float, default=AbstentionConfig().coverage)
    parser.add_argument("--score", choices=SCORES, default=AbstentionConfig().score)
    parser.add_argument("--stats-coverage", type=float, default=AbstentionConfig().stats_coverage)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    abstention = AbstentionConfig(
        coverage=args.coverage, score=args.score, stats_coverage=args.stats_coverage
    )
    featurizer = Featurizer(FoundationModel(DEFAULT_FM, device="cpu"), args.cache)
    sc = clinc150(args.data, args.scenario, args.seed, featurizer, "test")
    raw = json.loads((args.data / "data_full.json").read_text())
    val = TaskData(featurizer.texts([t for t, _ in raw["val"]]), [y for _, y in raw["val"]])
    oos_val = featurizer.texts([t for t, _ in raw["oos_val"]])
    oos_test = featurizer.texts([t for t, _ in raw["oos_test"]])

    smcf, obod, specs = ours_variant("ours", SMCFConfig(), OBODConfig())
    final: dict[str, object] = {}

    def keep(learners: dict[str, Learner], g: Head | None, bank: StatsBank) -> None:
        final.update(learners=learners, global_head=g, bank=bank)

    torch.manual_seed(args.seed)  # as benchmarks.run.run_method does
    rec = Recorder(sc)
    started = time.perf_counter()
    pseudo: dict[int, torch.Tensor] = {}
    run_ours(sc, args.seed, rec, smcf, obod, specs, calibrated_job(abstention, pseudo), abstention, keep)
    wall_s = time.perf_counter() - started
    learners: dict[str, Learner] = final["learners"]  # type: ignore[assignment]
    g: Head = final["global_head"]  # type: ignore[assignment]

    test_all = TaskData(
        torch.cat([sc.global_test[t].features for t in sc.tasks]),
        [y for t in sc.tasks for y in sc.global_test[t].labels],
    )
    clients = [c for c in sc.clients if learners[c].model is not None and learners[c].personal is not None]
    own = {c: client_data(sc, c) for c in clients}
    personal = {c: lr.personal for c, lr in learners.items() if lr.personal is not None}
    small = {c: Head(lr.model, lr.labels) for c, lr in learners.items() if lr.model is not None}
    seen = {c: set(learners[c].labels) for c in clients}
    parts: dict[str, object] = {
        "fm_global": part_report(
            [evaluated(g.model, g.labels, test_all, oos_test)],
            [evaluated(g.model, g.labels, val, oos_val)],
            {"stats": [g.abstention]},
            args.score,
        ),
        "fm_personal": part_report(
            [evaluated(personal[c].model, personal[c].labels, own[c], oos_test) for c in clients],
            [
                evaluated(personal[c].model, personal[c].labels, restrict(val, seen[c]), oos_val)
                for c in clients
            ],
            {
                "stats": [personal[c].abstention for c in clients],
                "holdout": [learners[c].personal_threshold for c in clients],
            },
            args.score,
        ),
        "small": part_report(
            [evaluated(small[c].model, small[c].labels, own[c], oos_test) for c in clients],
            [evaluated(small[c].model, small[c].labels, restrict(val, seen[c]), oos_val) for c in clients],
            {"holdout": [learners[c].small_threshold for c in clients]},
            args.score,
        ),
    }
    g_val = evaluated(g.model, g.labels, val, oos_val)
    matching = {
        "fm_global": stats_coverage_matching_val(pseudo[id(g)], g_val, abstention.coverage, args.score),
        "fm_personal": [
            stats_coverage_matching_val(
                pseudo[id(personal[c])],
                evaluated(personal[c].model, personal[c].labels, restrict(val, seen[c]), oos_val),
                abstention.coverage,
                args.score,
            )
            for c in clients
        ],
    }
    doc = {
        "scenario": args.scenario,
        "fm": DEFAULT_FM,
        "seed": args.seed,
        "command": "python -m benchmarks.oos " + " ".join(sys.argv[1:] if argv is None else argv),
        "abstention": abstention.model_dump(),
        "accuracy_without_abstention": {
            k: v.get("acc_final") for k, v in rec.parts().items() if isinstance(v, dict)
        },
        "calibration_copy_s": sum(lr.calibration_s for lr in learners.values()),
        "wall_s": wall_s,
        "sizes": {
            "test": len(test_all.labels),
            "oos_test": len(oos_test),
            "val": len(val.labels),
            "oos_val": len(oos_val),
        },
        "parts": parts,
        # val only: the stats coverage at which each server head would keep `coverage` of real val texts
        "stats_coverage_matching_val": matching,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print_table(doc)
    return 0


def print_table(doc: dict[str, object]) -> None:
    parts: dict[str, dict[str, object]] = doc["parts"]  # type: ignore[assignment]
    print(f"{'part':<12} {'threshold':<20} {'in-scope acc':>12} {'coverage':>9} {'oos recall':>10}")
    for part, report in parts.items():
        for key, row in report.items():
            if isinstance(row, dict) and "in_scope_acc" in row:
                print(
                    f"{part:<12} {key:<20} {row['in_scope_acc']:>12.4f} {row['in_scope_coverage']:>9.4f} "
                    f"{row['oos_recall']:>10.4f}"
                )
        print(f"{part:<12} AUROC val {report['auroc_val']}  test {report['auroc_test']}")


if __name__ == "__main__":
    raise SystemExit(main())
