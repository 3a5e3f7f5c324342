"""`make demo`: one fcl-server and three fcl-client processes on loopback, built-in data, heterogeneous heads.

Prints per-task accuracies (FM-global, FM-personal, small) and writes a report in the schema of
BENCHMARK.md (method `ours`). Exit 0 only if every process succeeded.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.cluster import ServerProcess, enroll, start_client, start_server
from common.datasets.checks import read_labelled
from common.fm import FoundationModel, cached_features
from common.metrics import Matrix, head_accuracy, mean_matrix, summarize
from common.package import decode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection

DEMO_SPECS = ["mlp:256", "linear", "mlp:512,128:gelu"]


@dataclass
class ClusterRun:
    """What a federated run over real processes produced."""

    client_records: dict[str, list[dict[str, Any]]]
    global_rows: Matrix
    global_final: float | None
    num_tasks: int
    wall_s: float
    exit_codes: dict[str, int] = field(default_factory=dict)
    metrics: str = ""  # the server's /metrics text, scraped before it stopped ("" when not served)


def split_builtin(out: Path, tasks: int, clients: int, seed: int) -> Path:
    data = out / "data"
    cmd = [
        sys.executable,
        "-m",
        "common.datasets.cli",
        "builtin",
        "--tasks",
        str(tasks),
        "--clients",
        str(clients),
        "--seed",
        str(seed),
        "--out",
        str(data),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return data


def split_file(out: Path, args: argparse.Namespace) -> Path:
    """`fcl-data split` of the user's labelled file(s), as a user would run it; its messages are shown."""
    data = out / "data"
    cmd = [sys.executable, "-m", "common.datasets.cli", "split", "--train", str(args.train)]
    cmd += ["--test", str(args.test)] if args.test else []
    cmd += ["--text-col", args.text_col, "--label-col", args.label_col, "--public", str(args.public)]
    cmd += ["--tasks", str(args.tasks), "--clients", str(args.clients), "--seed", str(args.seed)]
    cmd += ["--out", str(data)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print((done.stdout + done.stderr).rstrip())
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    return data


def run_cluster(
    data: Path,
    work: Path,
    specs: list[str],
    client_args: list[str] | None = None,
    server_args: list[str] | None = None,
    say: Callable[[str], None] = print,
) -> ClusterRun:
    """Run a server and one client process per `data/clients/*` stream; evaluate FM-global per task."""
    started = time.perf_counter()
    state = work / "server"
    client_ids = sorted(p.name for p in (data / "clients").iterdir() if p.is_dir())
    tokens = {c: enroll(state, c) for c in client_ids}
    admin = enroll(state, "demo-admin", admin=True)
    server = start_server(state, work / "logs" / "server.log", *(server_args or []))
    say(f"fcl-server on {server.target}; clients: {', '.join(client_ids)}")
    metrics_url = None
    if "--metrics-listen" in (server_args or []):
        port = server.metrics_port()
        metrics_url = f"http://127.0.0.1:{port}/metrics" if port else None
        say(f"Prometheus metrics while it runs: curl -s {metrics_url}")
    try:
        procs = {
            c: start_client(
                server.target,
                c,
                tokens[c],
                data / "clients" / c,
                specs[i % len(specs)],
                work / "clients" / c,
                work / "logs" / f"{c}.log",
                *(client_args or []),
            )
            for i, c in enumerate(client_ids)
        }
        codes = {c: p.wait() for c, p in procs.items()}
        for c in client_ids:
            say((work / "logs" / f"{c}.log").read_text(errors="replace").rstrip())
        global_rows, global_final, num_tasks = evaluate_global(server, admin, data, work / "cache")
        metrics = scrape(metrics_url) if metrics_url else ""
    finally:
        codes_server = server.stop()
    codes["server"] = codes_server
    records = {c: _read_records(work / "clients" / c / "metrics.json") for c in client_ids}
    wall = time.perf_counter() - started
    return ClusterRun(records, global_rows, global_final, num_tasks, wall, codes, metrics)


def scrape(url: str) -> str:
    """The server's Prometheus exposition text (what `curl URL` prints)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def nonzero_counters(text: str) -> list[str]:
    """The `fcl_` counter samples with a value above 0 (`_total` lines), as exposition lines."""
    lines = []
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if line.startswith("fcl_") and name.split("{")[0].endswith("_total") and float(value) > 0:
            lines.append(line)
    return lines


def evaluate_global(
    server: ServerProcess, admin_token: str, data: Path, cache: Path
) -> tuple[Matrix, float | None, int]:
    """R[t][j] of FM-global: the global head after every client's task-t job, on global test task j."""
    tasks = sorted(p.stem for p in (data / "global_test").glob("*.jsonl"))
    tests = [read_labelled(data / "global_test" / f"{t}.jsonl") for t in tasks]
    fm = FoundationModel(device="cpu")
    feats = [cached_features(fm, [ex.text for ex in test], cache) for test in tests]
    with Connection(server.target, admin_token) as conn:
        jobs = [j for j in conn.status(max_jobs=10_000).jobs if j.state == pb.JOB_STATE_DONE]
        rows: Matrix = []
        final = None
        for t in range(len(tasks)):
            versions = [j.global_version for j in jobs if j.task_index == t]
            if not versions:
                rows.append([None] * len(tasks))
                continue
            _, blob = conn.get_knowledge(pb.HEAD_SCOPE_GLOBAL, version=max(versions))
            head = decode_package(blob)
            model = head.build()
            rows.append(
                [
                    head_accuracy(model, head.labels, feats[j], [ex.label for ex in tests[j]])
                    if j <= t
                    else None
                    for j in range(len(tasks))
                ]
            )
            seen = list(range(t + 1))
            final = head_accuracy(
                model,
                head.labels,
                torch.cat([feats[j] for j in seen]),
                [ex.label for j in seen for ex in tests[j]],
            )
    return rows, final, len(tasks)


def _read_records(path: Path) -> list[dict[str, Any]]:
    return sorted(json.loads(path.read_text()), key=lambda r: int(r["task_index"])) if path.exists() else []


def client_part(run: ClusterRun, row_key: str, acc_key: str) -> dict[str, object]:
    """Mean over clients of their own R matrices and final pooled accuracy."""
    matrices, finals = [], []
    for records in run.client_records.values():
        matrix = [list(r[row_key]) for r in records]
        matrices.append(matrix)
        if records and records[-1].get(acc_key) is not None:
            finals.append(float(records[-1][acc_key]))
    return summarize(mean_matrix(matrices), sum(finals) / len(finals) if finals else None)


def result_entry(run: ClusterRun, method: str, seed: int) -> dict[str, object]:
    records = [r for rs in run.client_records.values() for r in rs]
    rounds = max(1, len(records))
    return {
        "method": method,
        "seed": seed,
        "fm_global": summarize(run.global_rows, run.global_final),
        "fm_personal": client_part(run, "personal_row", "personal_acc"),
        "small": client_part(run, "small_row", "small_acc"),
        "bytes_up_per_client_round": sum(float(r.get("bytes_up", 0)) for r in records) / rounds,
        "bytes_down_per_client_round": sum(float(r.get("bytes_down", 0)) for r in records) / rounds,
        "wall_s": run.wall_s,
        "peak_rss_mb": max(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        )
        / 1024,
    }


def print_table(entry: dict[str, object], num_tasks: int) -> None:
    parts = [("FM-global", "fm_global"), ("FM-personal", "fm_personal"), ("small", "small")]
    print("\naccuracy on task j after task t (rows t, columns j); mean over clients for personal/small")
    for title, key in parts:
        block = entry[key]
        assert isinstance(block, dict)
        print(f"\n{title}")
        print("  after  " + " ".join(f"task{j:>2}" for j in range(num_tasks)))
        for t, row in enumerate(block["matrix"]):
            print(f"  t={t:<4} " + " ".join("     -" if v is None else f"{v:6.3f}" for v in row))
    print("\n  part          acc_final  acc_avg  forgetting     bwt")
    for title, key in parts:
        block = entry[key]
        assert isinstance(block, dict)
        cells = [block[k] for k in ("acc_final", "acc_avg", "forgetting", "bwt")]
        print(f"  {title:<12} " + " ".join("      n/a" if v is None else f"{v:9.3f}" for v in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=Path, help="your labelled data (any `fcl-data split` format)")
    parser.add_argument("--test", type=Path, help="labelled test data for --train (default: held out)")
    parser.add_argument("--public", type=Path, help="unlabelled sentences for --train (needed with it)")
    parser.add_argument("--text-col", default="text", help="text column of --train (default: text)")
    parser.add_argument("--label-col", default="label", help="label column of --train (default: label)")
    parser.add_argument("--epochs", type=int, help="client training epochs (default: the client's)")
    parser.add_argument(
        "--metrics-listen",
        default="127.0.0.1:0",
        help="where the server serves Prometheus metrics (port 0: any free port; '' for none)",
    )
    args = parser.parse_args(argv)

    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    if args.train is not None:
        if args.public is None:
            parser.error("--train needs --public (unlabelled sentences, one per line)")
        data = split_file(work, args)
    else:
        data = split_builtin(work, args.tasks, args.clients, args.seed)
    source = args.train or "built-in dataset"
    print(f"{source} split into {args.tasks} tasks x {args.clients} clients under {data}")
    run = run_cluster(
        data,
        work,
        DEMO_SPECS,
        client_args=["--seed", str(args.seed)] + (["--epochs", str(args.epochs)] if args.epochs else []),
        server_args=["--public-corpus", str(data / "public.txt")]
        + (["--metrics-listen", args.metrics_listen] if args.metrics_listen else []),
    )
    entry = result_entry(run, "ours", args.seed)
    name = args.train.stem if args.train is not None else "builtin"
    report = {
        "scenario": f"{name}-{args.tasks}x{args.clients}",
        "fm": "all-MiniLM-L6-v2",
        "seeds": [args.seed],
        "results": [entry],
        "tasks": json.loads((data / "split.json").read_text(encoding="utf-8"))["tasks"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print_table(entry, run.num_tasks)
    if run.metrics:
        (args.out / "metrics.txt").write_text(run.metrics)
        counters = nonzero_counters(run.metrics)
        print(f"\nnon-zero fcl_ counters scraped from /metrics before shutdown ({args.out / 'metrics.txt'}):")
        print("\n".join(f"  {line}" for line in counters))
    print(
        f"\nprocess exit codes: {run.exit_codes}; wall {run.wall_s:.1f}s; report: {args.out / 'report.json'}"
    )
    return 0 if all(code == 0 for code in run.exit_codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
