"""`python -m benchmarks.perf [--quick] --out FILE`: every performance figure beside its reference, one run.

Parts: transfer (vs a plain grpcio echo), Flower (vs one Flower round), feature extraction (vs the
matmul compute limit), OBOD job time (cost model), concurrency (many clients at once), client cost
(SMCF per task on CLINC150), hostile (honest calls while idle streams are held open) and scale (queue
drain by 1 and 2 workers on PostgreSQL, upload bursts against one SQLite process, the cost curve over
labels and workers; --scale-steps picks some) and classify (the Classify RPC at batch 1, 32 and 256
vs the bare FM encode + head). Each part's
reference is measured in the same run, so ratios hold on a noisy machine. Writes one JSON document
whose top-level keys are the headline numbers and `goals`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.perf import classify, concurrency, fe, flower, hostile, jobs, scale, transfer
from benchmarks.perf.util import load_average, machine_info, torch_threads
from common.fm import FoundationModel

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("transfer", "flower", "fe", "jobs", "concurrency", "client", "hostile", "scale", "classify")


def plan(quick: bool) -> dict[str, Any]:
    """What each part measures; --quick keeps every headline key but measures fewer points."""
    if quick:
        return {
            "transfer": {"sizes_mb": [1, 16], "repeat": 1},
            "flower": {"sizes_mb": [1, 16], "rounds": 2},
            "fe": {"batches": [64], "seq_lens": [32], "budget_tokens": 32 * 512, "repeat": 1},
            "jobs": {"corpus_sizes": [1_000, 15_000], "label_counts": [30, 150], "repeat": 1},
            "concurrency": {"counts": [10, 200], "settle_s": 5.0, "repeat": 1},
            "client": {"max_tasks": 1},
            "hostile": {"calls": 30, "give_up_after": 2},
            "scale": {
                "drain": {"uploads": 12, "labels": 150, "workers": [1, 2]},
                "bursts": {"sizes": [{"clients": 200, "repeat": 1}], "package_bytes": 200_000},
                "curve": {"uploads": 6, "labels": [30, 150], "workers": [1, 2]},
            },
            "classify": {
                "batches": [1, 32, 256],
                "calls": {"1": 20, "32": 5, "256": 2},
                "blocks": 2,
                "labels": 150,
            },
        }
    return {
        "transfer": {"sizes_mb": [1, 16, 256], "repeat": 3},
        "flower": {"sizes_mb": [1, 16, 256], "rounds": 3},
        "fe": {
            "batches": [1, 16, 64, 128],
            "seq_lens": [16, 32, 64],
            "budget_tokens": 64 * 1024,
            "repeat": 3,
        },
        "jobs": {"corpus_sizes": [1_000, 4_000, 15_000], "label_counts": [30, 150, 600], "repeat": 2},
        "concurrency": {"counts": [10, 50, 200], "settle_s": 20.0, "repeat": 3},
        "client": {"max_tasks": 1_000},
        "hostile": {"calls": 100, "give_up_after": 5},
        "scale": {
            "drain": {"uploads": 200, "labels": 150, "workers": [1, 2]},
            "bursts": {
                "sizes": [{"clients": 200, "repeat": 3}, {"clients": 1000, "repeat": 1}],
                "package_bytes": 200_000,
            },
            "curve": {"uploads": 20, "labels": [30, 150, 300, 600], "workers": [1, 2]},
        },
        "classify": {
            "batches": [1, 32, 256],
            "calls": {"1": 100, "32": 20, "256": 5},
            "blocks": 5,
            "labels": 150,
        },
    }


def run_client_cost(data: Path, max_tasks: int, threads: int) -> dict[str, Any]:
    """benchmarks.perf.client_cost in a child process (its peak RSS is a client's, not ours)."""
    if not (data / "data_full.json").exists():
        return {"skipped": f"no CLINC150 data at {data}"}
    with tempfile.TemporaryDirectory(prefix="fcl-perf-client-") as tmp:
        out = Path(tmp) / "client.json"
        cmd = [sys.executable, "-m", "benchmarks.perf.client_cost", "--data", str(data), "--out", str(out)]
        cmd += ["--max-tasks", str(max_tasks), "--threads", str(threads)]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        result: dict[str, Any] = json.loads(out.read_text())
        return result


HOSTILE_KEYS = (
    "hostile_check_p99_s",
    "hostile_register_p99_ratio",
    "hostile_upload_p99_ratio",
    "hostile_errors",
    "hostile_max_growth_per_call_bytes",
)


SCALE_KEYS = {
    "drain": ("scale_drain_ratio_2_vs_1", "scale_global_step_share"),
    "bursts": ("scale_burst_200_p99_ratio", "scale_burst_1000_errors", "scale_burst_1000_errors_sqlite"),
}

CLASSIFY_KEYS = tuple(f"texts_per_s_ratio_batch_{b}" for b in (1, 32, 256))


def headline(parts: dict[str, Any]) -> dict[str, Any]:
    """The top-level numbers the issue asks for (None where a part was skipped)."""
    bursts = {b["clients"]: b for b in parts.get("concurrency", {}).get("bursts", [])}
    c200 = bursts.get(200, {})
    scale = parts.get("scale", {})
    return {
        "transfer_ratio_vs_raw": parts.get("transfer", {}).get("ratio_min"),
        "transfer_ratio_vs_flower": parts.get("flower", {}).get("ratio_min"),
        "fe_ratio_vs_limit": parts.get("fe", {}).get("ratio_min_batch_ge_64"),
        "obod_job_s_15k_150": parts.get("jobs", {}).get("job_s_15k_150"),
        "obod_job_s_15k_150_no_stats": parts.get("jobs", {}).get("job_s_15k_150_no_stats"),
        "concurrency_200_p99_s": c200.get("p99_s"),
        "concurrency_200_errors": c200.get("errors"),
        "client_smcf_s_per_task": parts.get("client", {}).get("smcf_s_per_task_median"),
        "client_peak_rss_mb": parts.get("client", {}).get("peak_rss_mb"),
        **{key: parts.get("hostile", {}).get(key) for key in HOSTILE_KEYS},
        **{key: scale.get("drain", {}).get(key) for key in SCALE_KEYS["drain"]},
        **{key: scale.get("bursts", {}).get(key) for key in SCALE_KEYS["bursts"]},
        **{key: parts.get("classify", {}).get(key) for key in CLASSIFY_KEYS},
    }


GOALS = {
    "transfer_ratio_vs_raw": (">=", 0.9),
    "transfer_ratio_vs_flower": (">=", 1.0),
    "fe_ratio_vs_limit": (">=", 0.5),
    "obod_job_s_15k_150": ("<=", 5.0),
    "obod_job_s_15k_150_no_stats": ("<=", 5.0),
    "concurrency_200_p99_s": ("<=", 2.0),
    "concurrency_200_errors": ("<=", 0),
    "hostile_check_p99_s": ("<=", 0.1),
    "hostile_register_p99_ratio": ("<=", 2.0),
    "hostile_upload_p99_ratio": ("<=", 2.0),
    "hostile_errors": ("<=", 0),
    "scale_drain_ratio_2_vs_1": (">=", 1.6),
    "scale_burst_200_p99_ratio": ("<=", 1.2),
    "scale_burst_1000_errors": ("<=", 0),
}


def goals(numbers: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, (op, bound) in GOALS.items():
        value = numbers.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"goal": f"{op} {bound}", "value": value, "met": met}
    return out


def kept_parts(path: Path, rerun: list[str], doc: dict[str, Any]) -> dict[str, Any]:
    """The parts of an earlier result that are not run again, each labelled with the command it came from."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    kept = {p: old[p] for p in PARTS if p in old and p not in rerun}
    for name, part in kept.items():
        part.setdefault("command", old.get("command"))
        doc["plan"][name] = old.get("plan", {}).get(name)
    return kept


def kept_steps(path: Path, rerun: list[str], doc: dict[str, Any]) -> dict[str, Any]:
    """The scale steps of an earlier result that are not run again (each records its own command)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    part, plan = old.get("scale", {}), old.get("plan", {}).get("scale") or {}
    if "runs" in part:  # written before the steps: the whole part was the drain
        part, plan = {"drain": part}, {"drain": plan}
    kept = {step: part[step] for step in scale.STEPS if step in part and step not in rerun}
    for step, result in kept.items():
        result.setdefault("command", part.get("command", old.get("command")))
        doc["plan"]["scale"][step] = plan.get(step)
    return kept


def git_commit() -> str:
    """HEAD of the checkout the numbers come from, "+dirty" when it has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/perf.json")
    parser.add_argument("--quick", action="store_true", help="fewer points, same keys (a few minutes)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/clinc150", help="CLINC150")
    parser.add_argument("--flower-python", help="an interpreter with flwr installed (own virtualenv)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--scale-steps",
        default=",".join(scale.STEPS),
        help=f"the steps of part scale to run, comma-separated, of {scale.STEPS}",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other parts already in --out (each part records the command and commit it came from)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wanted = [p for p in args.parts.split(",") if p]
    if unknown := sorted(set(wanted) - set(PARTS)):
        parser.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    steps = [s for s in args.scale_steps.split(",") if s]
    if unknown := sorted(set(steps) - set(scale.STEPS)):
        parser.error(f"unknown scale steps {unknown}; known: {', '.join(scale.STEPS)}")
    settings = plan(args.quick)
    settings["scale"] = {step: settings["scale"][step] for step in steps}
    doc: dict[str, Any] = {
        "command": "python -m benchmarks.perf " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "machine": machine_info(args.threads),
        "plan": {p: settings[p] for p in wanted},
    }
    parts: dict[str, Any] = kept_parts(args.out, wanted, doc) if args.update else {}
    old_steps = kept_steps(args.out, steps, doc) if args.update and "scale" in wanted else {}
    source = {"command": doc["command"], "commit": git_commit()}

    def save() -> None:
        numbers = headline(parts)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**numbers, "goals": goals(numbers), **doc, **parts}, indent=1))

    fm: FoundationModel | None = None

    def the_fm() -> FoundationModel:  # loaded once, only by the parts that need it
        nonlocal fm
        fm = fm or FoundationModel(device="cpu")
        return fm

    with torch_threads(args.threads):
        for part in wanted:
            started = time.perf_counter()
            print(f"[perf] {part} ...", flush=True)
            s = settings[part]
            if part == "transfer":
                parts[part] = transfer.run(the_fm(), s["sizes_mb"], s["repeat"])
            elif part == "flower":
                parts[part] = flower.run(s["sizes_mb"], s["rounds"], args.threads, args.flower_python)
            elif part == "fe":
                parts[part] = fe.run(the_fm(), s["batches"], s["seq_lens"], s["budget_tokens"], s["repeat"])
            elif part == "jobs":
                parts[part] = jobs.run(s["corpus_sizes"], s["label_counts"], s["repeat"])
            elif part == "concurrency":
                parts[part] = concurrency.run(s["counts"], s["settle_s"], s["repeat"])
            elif part == "client":
                parts[part] = run_client_cost(args.data, s["max_tasks"], args.threads)
            elif part == "scale":
                new_steps = scale.run(s, steps)
                for result in new_steps.values():
                    result.update(source)
                parts[part] = {**old_steps, **new_steps}
            elif part == "classify":
                parts[part] = classify.run(the_fm(), s["batches"], s["calls"], s["blocks"], s["labels"])
            elif part == "hostile":
                parts[part] = hostile.run(s["calls"], give_up_after=s["give_up_after"])
            parts[part].update(source)
            parts[part]["part_wall_s"] = time.perf_counter() - started
            parts[part]["load_average_after"] = load_average()
            save()
            print(f"[perf] {part} done in {parts[part]['part_wall_s']:.0f}s", flush=True)
    for key, verdict in goals(headline(parts)).items():
        print(f"{key:>26} = {verdict['value']!s:>24}  goal {verdict['goal']:<7} met={verdict['met']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
