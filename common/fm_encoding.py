"""How an FM turns texts into features (pooling, normalisation, max length, prompt): files and overrides."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

PoolingMode = Literal["mean", "cls", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean"]
POOLING_MODES: tuple[str, ...] = get_args(PoolingMode)
FMDtype = Literal["float32", "bf16", "fp16"]
FM_DTYPES: tuple[str, ...] = get_args(FMDtype)
# the encoding a server serves, written into its FM archive; also read from any FM directory
ENCODING_FILE = "fcl_encoding.json"
MODULES_FILE = "modules.json"
# the max length of a plain transformers directory, which does not state one (this project's default)
PLAIN_MAX_LENGTH = 128
# sentence-transformers' legacy pooling flags, in the order it concatenates them
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")
_ENCODING_KEYS = ("pooling", "include_prompt", "normalize", "max_length", "prompt")


class EncodingError(ValueError):
    """A model directory's encoding files are malformed or ask for something not supported."""


@dataclass(frozen=True)
class FMEncoding:
    """Everything beyond the model's files that decides f(x); part of the FM digest."""

    pooling: tuple[str, ...]  # modes, concatenated in this order (almost always one)
    include_prompt: bool  # False: prompt tokens are left out of the pooling
    normalize: bool  # L2-normalise the features
    max_length: int  # tokens per text, prompt and special tokens included; longer texts are truncated
    prompt: str  # prepended to every text ("" for none)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling[0] if len(self.pooling) == 1 else list(self.pooling),
            "include_prompt": self.include_prompt,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "prompt": self.prompt,
        }

    def canonical_json(self) -> str:
        """Sorted keys, no spaces, ASCII escapes: the same bytes on every node and Python version."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> FMEncoding:
        """The encoding a server announced (FoundationModelInfo.encoding_json); every key required."""
        given = EncodingOverrides.parse(
            _json_object(text, "the server's FM encoding"), "the server's FM encoding"
        )
        missing = [k for k in _ENCODING_KEYS if getattr(given, k) is None]
        if missing:
            raise EncodingError(f"the server's FM encoding lacks {', '.join(missing)}")
        return given.over_encoding(FMEncoding(("mean",), True, True, 1, ""))

    def differences(self, other: FMEncoding) -> list[str]:
        """`key: mine vs theirs` for each setting that differs."""
        mine, theirs = self.as_dict(), other.as_dict()
        return [f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in _ENCODING_KEYS if mine[k] != theirs[k]]


@dataclass(frozen=True)
class EncodingOverrides:
    """Settings given explicitly (flags, config, an fcl_encoding.json): each None = as the files say."""

    pooling: tuple[str, ...] | None = None
    include_prompt: bool | None = None
    normalize: bool | None = None
    max_length: int | None = None
    prompt: str | None = None

    @classmethod
    def of(
        cls, pooling: str | None = None, max_length: int | None = None, prompt: str | None = None
    ) -> EncodingOverrides:
        """The overrides the command-line options can give (--fm-pooling, --fm-max-length, --fm-prompt)."""
        return cls.parse({"pooling": pooling, "max_length": max_length, "prompt": prompt}, "the FM options")

    @classmethod
    def from_encoding(cls, encoding: FMEncoding) -> EncodingOverrides:
        return cls(
            encoding.pooling,
            encoding.include_prompt,
            encoding.normalize,
            encoding.max_length,
            encoding.prompt,
        )

    @classmethod
    def parse(cls, data: Mapping[str, Any], where: str) -> EncodingOverrides:
        """Check values of an fcl_encoding.json (or the options); None or absent keys are not given."""
        unknown = sorted(set(data) - set(_ENCODING_KEYS))
        if unknown:
            raise EncodingError(
                f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_ENCODING_KEYS)}"
            )
        pooling = data.get("pooling")
        modes = None if pooling is None else _pooling_modes(pooling, where)
        max_length = data.get("max_length")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise EncodingError(f"{where}: max_length must be a whole number of tokens, got {max_length!r}")
        if max_length is not None and max_length < 2:
            raise EncodingError(f"{where}: max_length {max_length} is too small; give at least 2 tokens")
        for key in ("include_prompt", "normalize"):
            if data.get(key) is not None and not isinstance(data[key], bool):
                raise EncodingError(f"{where}: {key} must be true or false, got {data[key]!r}")
        prompt = data.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise EncodingError(f"{where}: prompt must be a string, got {prompt!r}")
        return cls(modes, data.get("include_prompt"), data.get("normalize"), max_length, prompt)

    def given(self) -> dict[str, Any]:
        """The settings given, as FMEncoding.as_dict() spells them."""
        out: dict[str, Any] = {}
        for key in _ENCODING_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = (value[0] if len(value) == 1 else list(value)) if key == "pooling" else value
        return out

    def over(self, base: EncodingOverrides) -> EncodingOverrides:
        """These overrides, falling back to `base` where not given."""
        return EncodingOverrides(
            **{k: getattr(base, k) if getattr(self, k) is None else getattr(self, k) for k in _ENCODING_KEYS}
        )

    def over_encoding(self, base: FMEncoding) -> FMEncoding:
        return replace(base, **{k: getattr(self, k) for k in _ENCODING_KEYS if getattr(self, k) is not None})


@dataclass(frozen=True)
class DenseSpec:
    """A sentence-transformers Dense module: a linear layer and an activation after the pooling."""

    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a name in common.fm_pooling.ACTIVATIONS
    use_residual: bool


@dataclass(frozen=True)
class ModelLayout:
    """What a model directory's files say about encoding (all None/empty for a plain directory)."""

    kind: Literal["sentence-transformers", "transformers"]
    transformer_dir: Path
    pooling: tuple[str, ...] | None = None
    include_prompt: bool = True
    normalize: bool = True
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    dense: tuple[DenseSpec, ...] = ()
    pooling_dim: int | None = None  # the embedding dimension 1_Pooling/config.json states

    def prompt(self) -> str:
        """The prompt used for the texts we encode, when no --fm-prompt is given.

        The prompt named "query" when the files define a non-empty one (what sentence-transformers'
        `encode_query` uses, and what E5 asks for when its embeddings are features for a classifier);
        else the prompt `default_prompt_name` names (what its `encode` uses); else none.
        """
        if self.prompts.get("query"):
            return self.prompts["query"]
        if self.default_prompt_name:
            return self.prompts.get(self.default_prompt_name, "")
        return ""


def read_layout(path: Path) -> ModelLayout:
    """The encoding files of an FM directory: modules.json and what it points to, or a plain directory."""
    modules_file = path / MODULES_FILE
    if not modules_file.is_file():
        return ModelLayout(kind="transformers", transformer_dir=path)
    modules = _json_list(modules_file)
    kinds = [_module_kind(m, modules_file) for m in modules]
    if not kinds or kinds[0] != "Transformer" or kinds.count("Transformer") != 1:
        raise EncodingError(f"{modules_file}: the first module, and only that one, must be a Transformer")
    if kinds.count("Pooling") != 1 or kinds[1] != "Pooling":
        raise EncodingError(f"{modules_file}: a Pooling module must follow the Transformer, once")
    if "Normalize" in kinds and kinds.index("Normalize") != len(kinds) - 1:
        raise EncodingError(f"{modules_file}: Normalize must be the last module")
    dirs = [_module_dir(path, m, modules_file) for m in modules]
    transformer_dir, pooling_dir = dirs[0], dirs[1]
    bert_config = _json_object_file(transformer_dir / "sentence_bert_config.json", optional=True)
    pool = _json_object_file(pooling_dir / "config.json")
    st_config = _json_object_file(path / "config_sentence_transformers.json", optional=True)
    prompts = st_config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise EncodingError(
            f"{path / 'config_sentence_transformers.json'}: prompts must map names to strings"
        )
    default_name = st_config.get("default_prompt_name")
    if default_name is not None and default_name not in prompts:
        raise EncodingError(
            f"{path / 'config_sentence_transformers.json'}: default_prompt_name {default_name!r} is not "
            f"among the prompts ({', '.join(prompts) or 'none'})"
        )
    task = bert_config.get("transformer_task", "feature-extraction")
    output = ((bert_config.get("modality_config") or {}).get("text") or {}).get("method_output_name")
    if task != "feature-extraction" or output not in (None, "last_hidden_state"):
        raise EncodingError(
            f"{transformer_dir / 'sentence_bert_config.json'}: transformer_task {task!r} with output "
            f"{output!r} is not supported; an FM pools the last hidden state of a feature-extraction model"
        )
    max_seq = bert_config.get("max_seq_length")
    if max_seq is not None and (not isinstance(max_seq, int) or max_seq < 2):
        raise EncodingError(
            f"{transformer_dir / 'sentence_bert_config.json'}: bad max_seq_length {max_seq!r}"
        )
    dim = pool.get("embedding_dimension", pool.get("word_embedding_dimension"))
    return ModelLayout(
        kind="sentence-transformers",
        transformer_dir=transformer_dir,
        pooling=_pooling_of(pool, pooling_dir / "config.json"),
        include_prompt=bool(pool.get("include_prompt", True)),
        normalize="Normalize" in kinds,
        max_seq_length=max_seq,
        do_lower_case=bool(bert_config.get("do_lower_case", False)),
        prompts=dict(prompts),
        default_prompt_name=default_name,
        dense=tuple(_dense(d) for d, k in zip(dirs, kinds, strict=True) if k == "Dense"),
        pooling_dim=dim if isinstance(dim, int) else None,
    )


def read_encoding_file(path: Path) -> EncodingOverrides:
    """An FM directory's fcl_encoding.json (the settings a server served it with), if it has one."""
    file = path / ENCODING_FILE
    if not file.is_file():
        return EncodingOverrides()
    return EncodingOverrides.parse(_json_object(file.read_text(encoding="utf-8"), str(file)), str(file))


def resolve_encoding(layout: ModelLayout, given: EncodingOverrides, position_limit: int | None) -> FMEncoding:
    """The encoding used: `given` over what the files say over the plain default (mean, L2, 128 tokens)."""
    if layout.max_seq_length is not None:
        files_max = layout.max_seq_length
    elif layout.kind == "sentence-transformers" and position_limit is not None:
        files_max = position_limit  # sentence-transformers' own fallback: the model's limit
    else:
        files_max = min(PLAIN_MAX_LENGTH, position_limit or PLAIN_MAX_LENGTH)
    files = FMEncoding(
        pooling=layout.pooling or ("mean",),
        include_prompt=layout.include_prompt,
        normalize=layout.normalize,
        max_length=files_max,
        prompt=layout.prompt(),
    )
    encoding = given.over_encoding(files)
    if position_limit is not None and encoding.max_length > position_limit:
        source = "--fm-max-length" if given.max_length is not None else "max_seq_length"
        raise EncodingError(
            f"{source} {encoding.max_length} is more tokens than the model has positions for "
            f"({position_limit}); give at most {position_limit}"
        )
    return encoding


def _pooling_modes(value: Any, where: str) -> tuple[str, ...]:
    modes = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list | tuple) else ()
    if not modes or not all(isinstance(m, str) and m in POOLING_MODES for m in modes):
        raise EncodingError(
            f"{where}: pooling {value!r} is not one of {', '.join(POOLING_MODES)} (or a list)"
        )
    return modes


def _pooling_of(config: dict[str, Any], where: Path) -> tuple[str, ...]:
    """The modes of a 1_Pooling/config.json: `pooling_mode` (current) or the pooling_mode_* flags (legacy)."""
    if "pooling_mode" in config:
        return _pooling_modes(config["pooling_mode"], str(where))
    flagged = tuple(mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key))
    return flagged or ("mean",)  # no flag set: sentence-transformers falls back to mean


def _module_kind(module: Any, where: Path) -> str:
    if not isinstance(module, dict) or not isinstance(module.get("type"), str) or "path" not in module:
        raise EncodingError(f"{where}: every entry needs a type and a path, got {module!r}")
    type_name: str = module["type"]
    kind = type_name.rpartition(".")[2]
    if not type_name.startswith("sentence_transformers.") or kind not in _MODULE_KINDS:
        raise EncodingError(
            f"{where}: module type {type_name!r} is not supported; an FM may consist of the "
            f"sentence-transformers modules {', '.join(_MODULE_KINDS)} (no custom code is run)"
        )
    return kind


def _module_dir(root: Path, module: dict[str, Any], where: Path) -> Path:
    rel = str(module["path"])
    target = (root / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(root.resolve()):
        raise EncodingError(f"{where}: module path {rel!r} leaves the model directory")
    return target


_ACTIVATIONS_BY_TYPE = {
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}


def _dense(directory: Path) -> DenseSpec:
    config = _json_object_file(directory / "config.json")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in _ACTIVATIONS_BY_TYPE:
        raise EncodingError(
            f"{directory / 'config.json'}: activation {activation!r} is not supported "
            f"(supported: {', '.join(_ACTIVATIONS_BY_TYPE)})"
        )
    try:
        return DenseSpec(
            path=directory,
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            bias=bool(config.get("bias", True)),
            activation=_ACTIVATIONS_BY_TYPE[activation],
            use_residual=bool(config.get("use_residual", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EncodingError(
            f"{directory / 'config.json'}: needs in_features and out_features ({exc})"
        ) from exc


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EncodingError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EncodingError(f"{where} must hold a JSON object")
    return data


def _json_object_file(path: Path, optional: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if optional:
            return {}
        raise EncodingError(f"{path} is missing")
    return _json_object(path.read_text(encoding="utf-8"), str(path))


def _json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EncodingError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise EncodingError(f"{path} must hold a JSON list of modules")
    return data
