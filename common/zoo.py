"""Small-model zoo: validated specs of heads over FM features, and the heads themselves."""

from __future__ import annotations

import functools
import json
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

MAX_HIDDEN_WIDTH = 8192
MAX_DEPTH = 8

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class SpecError(ValueError):
    """A model spec is not one the zoo can build; the message says what to change."""


class ModelSpec(BaseModel):
    """Architecture of a head over FM features: an MLP of any depth/width, or a linear layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["linear", "mlp"] = "mlp"
    hidden: tuple[int, ...] = Field(default=(), max_length=MAX_DEPTH)
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    layer_norm: bool = False

    def model_post_init(self, _context: object) -> None:
        if self.kind == "linear" and self.hidden:
            raise SpecError("a 'linear' spec has no hidden layers; use kind 'mlp' for hidden layers")
        if self.kind == "mlp" and not self.hidden:
            raise SpecError("an 'mlp' spec needs at least one hidden width, e.g. mlp:512")
        for width in self.hidden:
            if not 1 <= width <= MAX_HIDDEN_WIDTH:
                raise SpecError(f"hidden width {width} is outside 1..{MAX_HIDDEN_WIDTH}")

    def to_json(self) -> str:
        return self.model_dump_json()

    def short_name(self) -> str:
        if self.kind == "linear":
            return "linear"
        widths = ",".join(str(w) for w in self.hidden)
        extra = ":ln" if self.layer_norm else ""
        return f"mlp:{widths}:{self.activation}{extra}"


def parse_spec(text: str) -> ModelSpec:
    """Parse JSON (`{"kind": "mlp", ...}`) or the short form `linear` / `mlp:512,256:gelu[:ln]`."""
    text = text.strip()
    try:
        if text.startswith("{"):
            return ModelSpec.model_validate(json.loads(text))
        parts = text.split(":")
        if parts[0] == "linear" and len(parts) == 1:
            return ModelSpec(kind="linear")
        if parts[0] == "mlp" and len(parts) >= 2:
            hidden = tuple(int(w) for w in parts[1].split(","))
            activation = parts[2] if len(parts) >= 3 and parts[2] else "relu"
            layer_norm = len(parts) >= 4 and parts[3] == "ln"
            return ModelSpec.model_validate(
                {"kind": "mlp", "hidden": hidden, "activation": activation, "layer_norm": layer_norm}
            )
    except (ValueError, ValidationError, json.JSONDecodeError) as exc:
        raise SpecError(f"invalid model spec {text!r}: {exc}") from exc
    raise SpecError(
        f"invalid model spec {text!r}: use 'linear', "
        "'mlp:WIDTH[,WIDTH...][:relu|gelu|tanh|silu][:ln]' or JSON"
    )


class SmallModel(nn.Module):
    """A head over FM features; its output layer grows as labels arrive."""

    def __init__(self, spec: ModelSpec, in_dim: int, num_labels: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise SpecError("a model needs at least one label")
        self.spec = spec
        self.in_dim = in_dim
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in spec.hidden:
            layers.append(nn.Linear(width, hidden))
            if spec.layer_norm:
                layers.append(nn.LayerNorm(hidden))
            layers.append(_ACTIVATIONS[spec.activation]())
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_labels)

    @property
    def num_labels(self) -> int:
        return self.out.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features))

    def grow(self, num_labels: int) -> None:
        """Append output rows for new labels, keeping the rows of known labels."""
        old = self.out
        if num_labels < old.out_features:
            raise SpecError("a model's label set can only grow")
        if num_labels == old.out_features:
            return
        new = nn.Linear(old.in_features, num_labels)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
            # new labels start neutral so they don't steal predictions before they are trained
            new.bias[old.out_features :] = old.bias.mean() if old.out_features else 0.0
        self.out = new.to(old.weight.device)


def build_model(spec: ModelSpec, in_dim: int, num_labels: int) -> SmallModel:
    return SmallModel(spec, in_dim, num_labels)


def expected_shapes(spec: ModelSpec, in_dim: int, num_labels: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes a model of this spec has (used to validate uploaded weights)."""
    return dict(_shapes(spec.to_json(), in_dim, num_labels))


@functools.lru_cache(maxsize=1024)
def _shapes(spec_json: str, in_dim: int, num_labels: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # building even a meta-device model costs milliseconds; uploads of one client repeat its spec
    with torch.device("meta"):
        model = SmallModel(parse_spec(spec_json), in_dim, num_labels)
    return tuple((name, tuple(t.shape)) for name, t in model.state_dict().items())
