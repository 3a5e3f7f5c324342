"""Half vs float32 FM features on the built-in data: feature differences and a linear probe's agreement."""

from __future__ import annotations

import argparse
import json

import torch

from common.datasets import builtin
from common.fm import DEFAULT_FM, FoundationModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fm", default=DEFAULT_FM)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args()
    train, test = builtin.load_train(), builtin.load_test()
    public = builtin.load_public()
    long_texts = [" ".join(public[i : i + 12]) for i in range(0, 12 * 64, 12)]  # 120-180 tokens each
    exact = FoundationModel(args.fm, device=args.device)
    half = FoundationModel(args.fm, device=args.device, dtype=args.dtype)
    texts = [ex.text for ex in test] + long_texts
    a, b = exact.encode(texts).clone(), half.encode(texts).clone()
    # a linear probe trained on float32 features, asked about the same test texts in both precisions
    labels = sorted({ex.label for ex in train})
    index = {y: i for i, y in enumerate(labels)}
    x, y = exact.encode([ex.text for ex in train]).clone(), torch.tensor([index[ex.label] for ex in train])
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], len(labels), requires_grad=True)
    bias = torch.zeros(len(labels), requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(x @ w * 10 + bias, y).backward()
        opt.step()
    n = len(test)
    y_test = torch.tensor([index[ex.label] for ex in test])
    with torch.no_grad():
        p_exact, p_half = (a[:n] @ w * 10 + bias).argmax(1), (b[:n] @ w * 10 + bias).argmax(1)
    print(
        json.dumps(
            {
                "device": args.device,
                "dtype": args.dtype,
                "texts": len(texts),
                "max_abs_diff": round((a - b).abs().max().item(), 6),
                "min_cosine": round((a * b).sum(1).min().item(), 7),
                "probe_accuracy_float32": round((p_exact == y_test).float().mean().item(), 4),
                "probe_accuracy_half": round((p_half == y_test).float().mean().item(), 4),
                "probe_agreement": round((p_exact == p_half).float().mean().item(), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
