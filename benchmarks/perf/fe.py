"""Feature extraction: FM sentences/second against the compute limit of this machine's matmul throughput."""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.perf.util import median
from common.fm import FoundationModel

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "we",
    "will",
    "go",
    "to",
    "see",
    "it",
    "when",
    "you",
    "can",
    "find",
    "time",
    "for",
    "my",
    "new",
    "book",
    "about",
    "music",
    "art",
    "food",
    "water",
    "house",
    "city",
    "road",
    "car",
    "train",
    "plane",
    "ship",
    "river",
    "tree",
    "park",
    "game",
    "play",
    "work",
    "day",
]


def matmul_gflops(n: int = 2048, seconds: float = 1.0) -> float:
    """Best float32 GFLOP/s of an n×n×n torch.mm with the current torch threads (2·n³ per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def flops_per_token(fm: FoundationModel, seq_len: int) -> dict[str, float]:
    """2·(weights of the encoder's Linear layers) + per layer 4·L·d (QKᵀ and attention·V), for L tokens."""
    layers = fm.model.encoder.layer
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    d, n_layers = int(fm.model.config.hidden_size), len(layers)
    attention = 4 * seq_len * d * n_layers
    return {"linear_params": linear, "flops": 2 * linear + attention, "attention_flops": attention}


def texts_of_tokens(fm: FoundationModel, tokens: int, count: int) -> list[str]:
    """`count` different sentences of exactly `tokens` tokens each ([CLS] and [SEP] included)."""
    out = []
    for i in range(count):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(tokens - 2)]
        out.append(" ".join(words))
    lengths = {len(ids) for ids in fm.tokenizer(out[:8])["input_ids"]}
    if lengths != {tokens}:
        raise RuntimeError(f"synthetic sentences tokenize to {lengths}, not {tokens} tokens")
    return out


def sentences_per_s(fm: FoundationModel, texts: list[str], batch: int, repeat: int) -> float:
    fm.encode(texts[: min(len(texts), batch)], batch_size=batch)  # warm-up
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fm.encode(texts, batch_size=batch)
        runs.append(time.perf_counter() - started)
    return len(texts) / median(runs)


def run(
    fm: FoundationModel, batches: list[int], seq_lens: list[int], budget_tokens: int, repeat: int
) -> dict[str, Any]:
    """Every (batch, length): sentences/s and its ratio to GFLOP/s ÷ FLOPs per sentence."""
    gflops = matmul_gflops()
    points = []
    for seq_len in seq_lens:
        cost = flops_per_token(fm, seq_len)
        limit = gflops * 1e9 / (cost["flops"] * seq_len)
        for batch in batches:
            count = max(batch, (budget_tokens // seq_len) // batch * batch)
            rate = sentences_per_s(fm, texts_of_tokens(fm, seq_len, count), batch, repeat)
            points.append(
                {
                    "batch": batch,
                    "seq_len": seq_len,
                    "sentences": count,
                    "sentences_per_s": rate,
                    "limit_sentences_per_s": limit,
                    "ratio": rate / limit,
                    "achieved_gflops": rate * seq_len * cost["flops"] / 1e9,
                }
            )
    big = [p["ratio"] for p in points if p["batch"] >= 64]
    cost = flops_per_token(fm, 1)
    return {
        "what": (
            "FoundationModel.encode (tokenise, sort by length, pad per batch, inference mode, mean-pool, "
            "normalise) on sentences of exactly seq_len tokens; limit = matmul GFLOP/s ÷ (FLOPs per token × "
            "seq_len); FLOPs per token = 2·P + 4·L·d·layers with P the weights of the encoder's Linear "
            "layers (embeddings, layer norms, GELU, softmax and the per-sentence pooler not counted)"
        ),
        "matmul_gflops": gflops,
        "matmul_shape": "2048x2048x2048 float32 torch.mm, best of 1 s",
        "linear_params": cost["linear_params"],
        "flops_per_token_formula": f"2*P + 4*L*d*n_layers (P={cost['linear_params']:.0f}, d=384, n_layers=6)",
        "torch_threads": torch.get_num_threads(),
        "points": points,
        "ratio_min_batch_ge_64": min(big) if big else None,
    }
