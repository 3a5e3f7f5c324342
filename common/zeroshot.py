"""FM zero-shot baseline: predict the label whose name embeds closest (cosine) to the text."""

from __future__ import annotations

import torch

from common.fm import FoundationModel


def label_prompt(label: str) -> str:
    """A label id as words: `card_arrival` → `card arrival`."""
    return label.replace("_", " ").replace("-", " ").strip()


def zeroshot_accuracy(
    fm: FoundationModel, features: torch.Tensor, labels: list[str], candidates: list[str]
) -> float:
    """Accuracy of argmax cosine(f(x), f(label name)) over `candidates` (features are L2-normalised)."""
    if not labels:
        return float("nan")
    names = fm.encode([label_prompt(c) for c in candidates])
    predicted = (features @ names.T).argmax(dim=1)
    pos = {c: i for i, c in enumerate(candidates)}
    targets = torch.tensor([pos.get(y, -1) for y in labels])
    return float((predicted == targets).float().mean().item())
