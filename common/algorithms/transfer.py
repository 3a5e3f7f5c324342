"""Transfer inputs for OBOD that a teacher can label: features synthesised from the teacher itself.

FM features live on the unit sphere. Model inversion starts from public features and follows the
teacher's cross-entropy towards each of its labels, projected back onto the sphere after every step,
so the result is a set of in-domain points for every label the teacher knows, even where no class
statistics were shared. Nothing of the client's data is used: only the uploaded weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.algorithms.losses import adam
from common.algorithms.stats import StatsBank
from common.zoo import SmallModel


@dataclass
class Synthesised:
    features: torch.Tensor  # (N, D), unit norm
    labels: list[str]  # label of each row (the class it was pushed towards)


def invert_teacher(
    model: SmallModel,
    columns: list[str],
    labels: list[str],
    public: torch.Tensor,
    per_label: int,
    steps: int,
    lr: float,
    generator: torch.Generator,
    confidence: float = 1.0,
) -> Synthesised:
    """`per_label` points for each of `labels`: random public features moved up the teacher's CE.

    Every step is projected back onto the unit sphere, where FM features live.

    `columns` names the teacher's output columns; `labels` may be any subset of them.

    A point stops moving once the teacher gives its label probability `confidence` or more: pushing on
    to the teacher's most confident region would bunch every point of a label together, far tighter
    than real examples are.
    """
    if per_label <= 0 or not labels or len(public) == 0:
        return Synthesised(torch.empty(0, public.shape[1]), [])
    device = public.device
    n = per_label * len(labels)
    position = {y: i for i, y in enumerate(columns)}
    target = torch.tensor([position[y] for y in labels]).repeat_interleave(per_label).to(device)
    start = torch.randint(len(public), (n,), generator=generator).to(device)
    x = F.normalize(public[start.to(device)].float(), dim=1).clone().requires_grad_(True)
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # only the inputs move
    try:
        opt = adam([x], lr)
        for _ in range(steps):
            logits = model(x)
            with torch.no_grad():
                moving = logits.softmax(dim=1).gather(1, target[:, None]).squeeze(1) < confidence
            if not bool(moving.any()):
                break
            loss = F.cross_entropy(logits[moving], target[moving], reduction="sum") / len(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                frozen = x.detach().clone()
                opt.step()
                x.copy_(torch.where(moving[:, None], F.normalize(x, dim=1), frozen))
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    names = [y for y in labels for _ in range(per_label)]
    return Synthesised(x.detach(), names)


def synthetic_stats(synth: Synthesised, counts: dict[str, int], wanted: set[str], rank: int) -> StatsBank:
    """Statistics of the synthesised points of the `wanted` labels, weighted by the upload's class counts.

    A label's count says how much data its teacher saw, so merging these with other clients' by count
    weighs each teacher by its evidence, as real statistics are weighed.
    """
    bank = StatsBank(synth.features.shape[1], rank)
    keep = [i for i, y in enumerate(synth.labels) if y in wanted]
    if keep:
        bank.add_features(synth.features[keep], [synth.labels[i] for i in keep], counts)
    return bank
