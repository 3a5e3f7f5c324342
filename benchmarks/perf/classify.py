"""Classify: texts/s and p50/p99 latency of the RPC per batch size, vs the bare FM encode + head (ceiling).

One `fcl-server` process on loopback (benchmarks.perf.serve_proc, with its worker and as many torch threads
as this process). A client uploads a package of `labels` labels and waits for its job, so the server holds
a real distilled global head. Then, per batch size, blocks of sequential Classify calls (admin token,
HEAD_SCOPE_GLOBAL) alternate with blocks of the ceiling: the same texts through FoundationModel.encode and
that head (downloaded with GetKnowledge) in this process, with no RPC. The alternation keeps the ratio fair
on a machine whose load drifts. Texts are the built-in test split's, cycled, so lengths vary as in use.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.harness import ServerProcess, package_of_size
from benchmarks.perf.util import median, percentile
from common.algorithms.obod import Head
from common.datasets import builtin
from common.fm import FoundationModel
from common.package import decode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection

TOP_K = 5
PACKAGE_BYTES = 200_000  # the uploaded small model; the head's size is the server's head spec's
WARMUP_CALLS = 2


def batches_of(texts: list[str], batch: int, calls: int, start: int = 0) -> list[list[str]]:
    """`calls` batches of `batch` texts, taken from `texts` in turn (cycled) from `start`."""
    out, n = [], len(texts)
    for c in range(calls):
        first = start + c * batch
        out.append([texts[(first + i) % n] for i in range(batch)])
    return out


def timed_calls(
    batches: list[list[str]], call: Callable[[list[str]], list[str]]
) -> tuple[list[float], list[str]]:
    """Seconds of each call, one after the other, and the top label of every text."""
    seconds, tops = [], []
    for texts in batches:
        started = time.perf_counter()
        tops += call(texts)
        seconds.append(time.perf_counter() - started)
    return seconds, tops


def summary(seconds: list[float], batch: int) -> dict[str, float]:
    return {
        "calls": len(seconds),
        "texts_per_s": batch * len(seconds) / sum(seconds),
        "p50_s": median(seconds),
        "p99_s": percentile(seconds, 99),
    }


def run(
    fm: FoundationModel, batches: list[int], calls: dict[str, int], blocks: int, labels: int
) -> dict[str, Any]:
    """Per batch size: Classify and the ceiling, each `calls[str(batch)]` calls in each of `blocks` blocks."""
    threads = torch.get_num_threads()
    texts = [ex.text for ex in builtin.load_test()]
    points = []
    with tempfile.TemporaryDirectory(prefix="fcl-perf-classify-") as tmp:
        server = ServerProcess(Path(tmp), "--worker", "--clients", "1", "--threads", str(threads))
        try:
            info = server.info
            if info["fm_digest"] != fm.digest:
                raise RuntimeError("the benchmark server runs another FM than this process")
            target = f"127.0.0.1:{info['port']}"
            with Connection(target, info["tokens"][0], timeout=300) as client:
                data = package_of_size(fm.digest, PACKAGE_BYTES, num_labels=labels)
                job = client.upload(data, "classify-bench", "task-00", 0, fm.digest).job_id
                event = client.watch_job(job, timeout=600)
                if event.state != pb.JOB_STATE_DONE:
                    raise RuntimeError(
                        f"the benchmark's distillation job ended {event.state}: {event.message}"
                    )
            with Connection(target, info["admin_token"], timeout=300, retries=0) as admin:
                header, blob = admin.get_knowledge(pb.HEAD_SCOPE_GLOBAL)
                pkg = decode_package(blob)
                head = Head(pkg.build(), list(pkg.labels))

                def over_rpc(batch_texts: list[str]) -> list[str]:
                    response = admin.classify(batch_texts, top_k=TOP_K, scope=pb.HEAD_SCOPE_GLOBAL)
                    if response.head_version != header.version:
                        raise RuntimeError(
                            f"Classify answered with v{response.head_version}, not v{header.version}"
                        )
                    return [r.labels[0].label for r in response.results]

                @torch.inference_mode()
                def bare(batch_texts: list[str]) -> list[str]:
                    probs = torch.softmax(head.model(fm.encode(batch_texts)), dim=1)
                    _, index = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
                    return [head.labels[int(row[0])] for row in index]

                for batch in batches:
                    n = calls[str(batch)]
                    for fn in (bare, over_rpc):
                        timed_calls(batches_of(texts, batch, WARMUP_CALLS), fn)
                    rpc_s: list[float] = []
                    bare_s: list[float] = []
                    agree = total = 0
                    for block in range(blocks):
                        work = batches_of(texts, batch, n, start=block * n * batch)
                        seconds, bare_tops = timed_calls(work, bare)
                        bare_s += seconds
                        seconds, rpc_tops = timed_calls(work, over_rpc)
                        rpc_s += seconds
                        agree += sum(a == b for a, b in zip(bare_tops, rpc_tops, strict=True))
                        total += len(rpc_tops)
                    rpc, ceiling = summary(rpc_s, batch), summary(bare_s, batch)
                    points.append(
                        {
                            "batch": batch,
                            "classify": rpc,
                            "ceiling": ceiling,
                            "texts_per_s_ratio": rpc["texts_per_s"] / ceiling["texts_per_s"],
                            "p50_ratio": rpc["p50_s"] / ceiling["p50_s"],
                            "p99_ratio": rpc["p99_s"] / ceiling["p99_s"],
                            "top1_agreement": agree / total,
                        }
                    )
        finally:
            server.close()
    by_batch = {p["batch"]: p for p in points}
    return {
        "what": (
            "sequential Classify calls (HEAD_SCOPE_GLOBAL, top_k 5) from one client to an fcl-server process "
            "on loopback, against the ceiling: FoundationModel.encode + the same head in the client process, "
            "on the same texts, blocks alternating; texts_per_s_ratio = Classify texts/s ÷ ceiling texts/s, "
            "p50_ratio and p99_ratio = Classify latency ÷ ceiling latency; top1_agreement = share of texts "
            "whose top label is the same both ways"
        ),
        "labels": labels,
        "head_labels": len(head.labels),
        "head_version": header.version,
        "torch_threads": threads,
        "texts": len(texts),
        "points": points,
        **{f"texts_per_s_ratio_batch_{b}": p["texts_per_s_ratio"] for b, p in by_batch.items()},
    }
