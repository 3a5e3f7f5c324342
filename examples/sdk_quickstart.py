"""FclClient quickstart: register, learn two tasks of the built-in dataset, then predict.

Before it, enroll a client and start a server (two commands; any state dir and port will do):

    fcl-server enroll --state-dir /tmp/fcl-sdk client-0 > /tmp/fcl-sdk-client-0.token
    fcl-server serve --state-dir /tmp/fcl-sdk --listen 127.0.0.1:50051

Then, in another shell:

    python examples/sdk_quickstart.py --server 127.0.0.1:50051 --client-id client-0 \\
        --token-file /tmp/fcl-sdk-client-0.token --work-dir /tmp/fcl-sdk-work

Running it again learns nothing twice: both tasks are reported as already done (from the checkpoint).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from common.datasets import builtin
from common.datasets.records import Example
from fcl_client import FclClient, TaskResult
from fcl_client.settings import resolve_token

# two tasks of two domains each: new intents arrive with the second task
TASKS = {"task-1": ["banking", "travel"], "task-2": ["weather", "cooking"]}
SAMPLES_PER_TASK = 2  # held-out test utterances per task to show predictions for
HEADS: tuple[Literal["small", "personal"], ...] = ("small", "personal")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of fcl-server")
    parser.add_argument("--client-id", default="client-0")
    parser.add_argument("--token-file", type=Path, help="token from `fcl-server enroll` (or $FCL_TOKEN)")
    parser.add_argument("--work-dir", type=Path, default=Path("fcl-sdk-work"))
    parser.add_argument("--model", default="mlp:256", help="small-model spec")
    parser.add_argument("--epochs", type=int, default=5, help="SMCF epochs per task")
    parser.add_argument("--tls-ca", type=Path, help="CA of the server certificate (enables TLS)")
    return parser.parse_args(argv)


def task_data(domains: list[str]) -> tuple[list[Example], list[Example]]:
    """Train and test examples of the built-in dataset whose labels belong to `domains`."""
    groups = builtin.load_groups()
    labels = {label for domain in domains for label in groups[domain]}
    train = [ex for ex in builtin.load_train() if ex.label in labels]
    test = [ex for ex in builtin.load_test() if ex.label in labels]
    return train, test


def describe(result: TaskResult, total: int) -> str:
    def acc(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    if result.already_done:
        return f"task {result.index + 1}/{total} {result.name}: already learned (from the checkpoint)"
    return (
        f"task {result.index + 1}/{total} {result.name}: small model {acc(result.small_acc)}, "
        f"FM-personal {acc(result.personal_acc)} on all tasks seen | job {result.job_id} {result.job_state}, "
        f"global head v{result.global_version}, personal head v{result.personal_version} | "
        f"{result.bytes_up / 1e3:.1f} kB up, {result.bytes_down / 1e3:.1f} kB down"
    )


def quickstart(client: FclClient, say: Callable[[str], None] = print) -> None:
    """Register, learn the two tasks, predict some held-out utterances with both heads."""
    reg = client.register()
    say(
        f"registered {reg.client_id} with fcl-server {reg.server_version}: FM {reg.fm_name} "
        f"({'local copy' if reg.fm_matches else 'downloaded'}), personal head v{reg.personal_head_version}, "
        f"{reg.tasks_done} tasks done"
    )
    samples: list[Example] = []
    for name, domains in TASKS.items():
        train, test = task_data(domains)
        result = client.run_task(
            name,
            [ex.text for ex in train],
            [ex.label for ex in train],
            test_texts=[ex.text for ex in test],
            test_labels=[ex.label for ex in test],
        )
        say(describe(result, len(TASKS)))
        samples += test[:: len(test) // SAMPLES_PER_TASK][:SAMPLES_PER_TASK]
    for head in HEADS:
        ranked = client.predict([ex.text for ex in samples], top=3, head=head)
        for example, top in zip(samples, ranked, strict=True):
            best = ", ".join(f"{p.label} {p.p:.2f}" for p in top)
            say(f"predict[{head}] {example.text!r} -> {best} (true: {example.label})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = resolve_token(None, args.token_file, os.environ.get("FCL_TOKEN"))
    with FclClient(
        args.server,
        args.client_id,
        token,
        args.work_dir,
        model=args.model,
        epochs=args.epochs,
        tls_ca=args.tls_ca,
        on_message=lambda line: print(f"  {line}", flush=True),
    ) as client:
        quickstart(client)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
