"""Benchmark runner (BENCHMARK.md): `python -m benchmarks.run --scenario S --data D --methods a,b --out F`."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.evaluate import Recorder
from benchmarks.ours import OURS, Traffic, ours_variant, run_ours
from benchmarks.scenario import SCENARIOS, Featurizer, Scenario, clinc150, custom
from common.config import OBODConfig, SMCFConfig
from common.fm import DEFAULT_FM, FoundationModel

MethodFn = Callable[[Scenario, int, Recorder, SMCFConfig, OBODConfig], Traffic]


def _ours(name: str) -> MethodFn:
    def run(sc: Scenario, seed: int, rec: Recorder, smcf: SMCFConfig, obod: OBODConfig) -> Traffic:
        client_cfg, server_cfg, specs = ours_variant(name, smcf, obod)
        return run_ours(sc, seed, rec, client_cfg, server_cfg, specs)

    return run


def registry() -> dict[str, MethodFn]:
    from benchmarks import baselines

    methods: dict[str, MethodFn] = dict(baselines.METHODS)
    methods.update({name: _ours(name) for name in ["stats-only", *OURS]})
    return methods


def run_method(
    name: str, fn: MethodFn, sc: Scenario, seed: int, smcf: SMCFConfig, obod: OBODConfig
) -> dict[str, object]:
    torch.manual_seed(seed)
    rec = Recorder(sc)
    started = time.perf_counter()
    traffic = fn(sc, seed, rec, smcf, obod)
    rounds = max(1, traffic.rounds)
    return {
        "method": name,
        "seed": seed,
        **rec.parts(),
        "bytes_up_per_client_round": traffic.up / rounds,
        "bytes_down_per_client_round": traffic.down / rounds,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def load_scenario(name: str, data: Path, seed: int, featurizer: Featurizer, eval_split: str) -> Scenario:
    if name in SCENARIOS:
        return clinc150(data, name, seed, featurizer, eval_split)
    if name == "custom":
        return custom(data, featurizer)
    raise SystemExit(f"unknown scenario {name!r}: use one of {[*SCENARIOS, 'custom']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True, help=f"{', '.join(SCENARIOS)} or custom")
    parser.add_argument(
        "--data", type=Path, required=True, help="CLINC150 dir, or an fcl-data split dir (custom)"
    )
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all'")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--eval-split",
        choices=["test", "val"],
        default="test",
        help="CLINC150 split to evaluate on: tune hyper-parameters on val, report test",
    )
    parser.add_argument(
        "--transport",
        choices=["inproc", "grpc"],
        default="inproc",
        help="grpc: run `ours` through real fcl-server/fcl-client processes",
    )
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench"), help="FM feature cache")
    parser.add_argument("--smcf", default="{}", help="JSON overrides of SMCFConfig")
    parser.add_argument("--obod", default="{}", help="JSON overrides of OBODConfig")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    smcf = SMCFConfig(**json.loads(args.smcf))
    obod = OBODConfig(**json.loads(args.obod))
    methods = registry()
    names = list(methods) if args.methods == "all" else args.methods.split(",")
    unknown = [n for n in names if n not in methods]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(methods)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    featurizer = Featurizer(FoundationModel(DEFAULT_FM, device="cpu"), args.cache)
    results = []
    for seed in seeds:
        sc = load_scenario(args.scenario, args.data, seed, featurizer, args.eval_split)
        for name in names:
            if args.transport == "grpc" and name == "ours":
                from benchmarks.grpc_transport import run_ours_grpc

                entry = run_ours_grpc(sc, args.scenario, args.data, seed, args.cache)
            else:
                entry = run_method(name, methods[name], sc, seed, smcf, obod)
            results.append(entry)
            _progress(entry)
            _write(args, seeds, results, smcf, obod)
    return 0


def _progress(entry: dict[str, object]) -> None:
    parts = []
    for key in ("fm_global", "fm_personal", "small"):
        block = entry.get(key)
        if isinstance(block, dict) and block.get("acc_final") is not None:
            parts.append(f"{key} {block['acc_final']:.4f} (fgt {block.get('forgetting') or 0:.4f})")
    print(
        f"{entry['method']:>14} seed {entry['seed']}: " + ", ".join(parts) + f"  [{entry['wall_s']:.0f}s]",
        flush=True,
    )


def _write(
    args: argparse.Namespace,
    seeds: list[int],
    results: list[dict[str, object]],
    smcf: SMCFConfig,
    obod: OBODConfig,
) -> None:
    doc = {
        "scenario": args.scenario,
        "fm": DEFAULT_FM,
        "seeds": seeds,
        "eval_split": args.eval_split,
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "config": {"smcf": smcf.model_dump(), "obod": obod.model_dump()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
