"""Pooling token states into one vector per text, as sentence-transformers' Pooling module does."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.fm_encoding import DenseSpec, EncodingError

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "tanh": torch.nn.Tanh,
    "identity": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "gelu": torch.nn.GELU,
    "sigmoid": torch.nn.Sigmoid,
}


def pool(
    hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str], padding: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T, D) states and a (B, T) 0/1 mask → (B, D · len(modes)), the modes concatenated in order.

    `padding` is the tokenizer's own mask where `mask` leaves a prompt out (weightedmean counts positions
    from it). Computed in float32 whatever the states' dtype (half-precision sums lose digits).
    """
    hidden = hidden.float()
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    count = weights.sum(1).clamp_min(1e-9)
    out = []
    for mode in modes:
        if mode == "cls":  # the first token the mask keeps (after a left padding or an excluded prompt)
            first = mask.to(torch.int32).argmax(1)
            out.append(hidden[torch.arange(hidden.size(0)), first])
        elif mode == "max":
            out.append(hidden.masked_fill(weights == 0, float("-inf")).max(1).values)
        elif mode == "mean":
            out.append((hidden * weights).sum(1) / count)
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * weights).sum(1) / count.sqrt())
        elif mode == "weightedmean":  # position weights 1, 2, ... counted from the first real token
            positions = torch.arange(1, hidden.size(1) + 1, dtype=hidden.dtype, device=hidden.device)
            start = (mask if padding is None else padding).to(torch.int32).argmax(1)
            positions = positions.view(1, -1, 1) - start.view(-1, 1, 1)
            w = weights * positions
            out.append((hidden * w).sum(1) / w.sum(1).clamp_min(1e-9))
        elif mode == "lasttoken":  # the last token the mask keeps
            seq_len = hidden.size(1)
            kept, from_end = mask.flip(1).max(1)
            from_end = torch.where(kept == 0, seq_len - 1, from_end)
            out.append((hidden * weights)[torch.arange(hidden.size(0)), seq_len - 1 - from_end])
        else:
            raise EncodingError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)


def exclude_prompt(mask: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """The mask without the first `prompt_tokens` real tokens of each row (include_prompt = false)."""
    first = mask.to(torch.int32).argmax(1, keepdim=True)  # >0 only where the tokenizer pads on the left
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
    return mask.masked_fill(positions < first + prompt_tokens, 0)


class Dense(torch.nn.Module):
    """A sentence-transformers Dense module (linear, activation, optional residual), weights from its dir."""

    def __init__(self, spec: DenseSpec) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        self.activation = ACTIVATIONS[spec.activation]()
        self.residual: torch.nn.Linear | None = None
        if spec.use_residual and spec.in_features != spec.out_features:
            self.residual = torch.nn.Linear(spec.in_features, spec.out_features, bias=False)
        self.use_residual = spec.use_residual
        state = _dense_weights(spec)
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EncodingError(f"the Dense weights in {spec.path} do not fit its config: {exc}") from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


def _dense_weights(spec: DenseSpec) -> dict[str, torch.Tensor]:
    safetensors, pickle = spec.path / "model.safetensors", spec.path / "pytorch_model.bin"
    if safetensors.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors))
    if pickle.is_file():
        return torch.load(pickle, map_location="cpu", weights_only=True)  # tensors only: no code runs
    raise EncodingError(f"the Dense module in {spec.path} has no model.safetensors or pytorch_model.bin")
