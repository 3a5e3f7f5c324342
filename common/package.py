"""Knowledge packages: a model spec, its weights, label names and class statistics in one safetensors file.

The file holds tensors `model.*` (weights) and optionally `stats.count/mean/std[/basis]`, and string metadata
(`format`, `kind`, `spec`, `labels`, `counts`, `fm_digest`, `feature_dim`; a head's `abstention` threshold
where it has one). Never pickle: a package is data, and `decode_package` validates every field against the
model zoo before anything uses it.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common import wire_limits as wire
from common.algorithms.abstention import AbstentionError, Threshold
from common.algorithms.stats import MAX_RANK, StatsBank, StatsTensors
from common.labels import RULE, label_problem
from common.zoo import ModelSpec, SmallModel, SpecError, expected_shapes

FORMAT = "fcl-knowledge/1"
KINDS = ("small", "head")
MAX_STATS_COUNT = 10**9  # more examples than any client has: one upload must not outweigh the whole bank
STATS_TENSORS = ("stats.count", "stats.mean", "stats.std", "stats.basis")


class PackageError(ValueError):
    """A knowledge package is malformed or unsafe; the message says what is wrong."""


@dataclass(frozen=True)
class PackageLimits:
    max_bytes: int = wire.PACKAGE_MAX_BYTES
    max_labels: int = wire.MAX_LABELS
    max_feature_dim: int = wire.MAX_FEATURE_DIM
    max_metadata_bytes: int = wire.METADATA_MAX_BYTES  # all metadata keys and values, UTF-8


@dataclass
class KnowledgePackage:
    """A small model (kind 'small') or an FM head (kind 'head') with its label names."""

    spec: ModelSpec
    labels: list[str]
    weights: dict[str, torch.Tensor]
    feature_dim: int
    fm_digest: str
    kind: str = "small"
    counts: list[int] = field(default_factory=list)
    stats: StatsBank | None = None
    abstention: Threshold | None = None  # a head's calibrated out-of-scope threshold (docs/abstention.md)

    def build(self) -> SmallModel:
        model = SmallModel(self.spec, self.feature_dim, len(self.labels))
        model.load_state_dict(self.weights)
        return model.eval()

    @classmethod
    def from_model(
        cls,
        model: SmallModel,
        labels: list[str],
        fm_digest: str,
        kind: str = "small",
        counts: list[int] | None = None,
        stats: StatsBank | None = None,
        abstention: Threshold | None = None,
    ) -> KnowledgePackage:
        weights = {k: v.detach().cpu().contiguous().float() for k, v in model.state_dict().items()}
        return cls(
            model.spec,
            list(labels),
            weights,
            model.in_dim,
            fm_digest,
            kind,
            list(counts or []),
            stats,
            abstention,
        )


def encode_package(pkg: KnowledgePackage) -> bytes:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in pkg.weights.items()}
    if pkg.stats is not None and pkg.stats.stats:
        stacked = pkg.stats.to_tensors()
        tensors.update(_stats_tensors(stacked))
        stats_labels = stacked.labels
    else:
        stats_labels = []
    metadata = {
        "format": FORMAT,
        "kind": pkg.kind,
        "spec": pkg.spec.to_json(),
        # labels as UTF-8, not ASCII escapes: at most 4 bytes a character (wire.METADATA_MAX_BYTES)
        "labels": json.dumps(pkg.labels, ensure_ascii=False),
        "counts": json.dumps(pkg.counts),
        "stats_labels": json.dumps(stats_labels, ensure_ascii=False),
        "fm_digest": pkg.fm_digest,
        "feature_dim": str(pkg.feature_dim),
    }
    if pkg.abstention is not None:  # only then: a package without one stays byte-for-byte as before
        metadata["abstention"] = pkg.abstention.to_json()
    return st_save(tensors, metadata=metadata)


def decode_package(data: bytes, limits: PackageLimits | None = None) -> KnowledgePackage:
    """Parse and validate a package; raises PackageError naming the first problem found."""
    limits = limits or PackageLimits()
    if len(data) > limits.max_bytes:
        raise PackageError(f"package is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        tensors = st_load(data)
        metadata = _read_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise _not_safetensors(data[:2], exc) from exc
    return _decode(tensors, metadata, limits, build=True)


def validate_package_file(path: Path, limits: PackageLimits | None = None) -> KnowledgePackage:
    """Validate a package on disk exactly as `decode_package` does, reading one tensor at a time.

    Memory stays at about the largest statistics tensor whatever the package's size (the server checks
    uploads this way). The result holds neither weights nor a statistics bank (`weights == {}`,
    `stats is None`: both were checked, not built); everything else is filled in.
    """
    limits = limits or PackageLimits()
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise PackageError(f"package is {size} bytes, over the limit of {limits.max_bytes}")
    try:
        with safe_open(str(path), framework="pt") as handle, path.open("rb") as raw:
            metadata = {str(k): str(v) for k, v in (handle.metadata() or {}).items()}
            tensors = _FileTensors(handle, raw)
            try:
                return _decode(tensors, metadata, limits, build=False)
            finally:
                tensors.close()
    except PackageError:  # a ValueError too, but already says what is wrong
        raise
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        with path.open("rb") as fh:
            raise _not_safetensors(fh.read(2), exc) from exc


class _FileTensors(Mapping[str, torch.Tensor]):
    """The tensors of an open safetensors file, each read from disk when asked for (none kept).

    `safe_open` has checked the header (dtypes, shapes and offsets that tile the file). Finiteness is
    checked on the mapped file (big weights, no copy); a tensor asked for (the small statistics) is
    read with one pread, several times cheaper than the library's get_tensor on a new file.
    """

    def __init__(self, handle: Any, raw: BinaryIO) -> None:
        self._handle, self._names, self._raw = handle, list(handle.keys()), raw
        self._offsets: dict[str, tuple[int, int]] | None = None
        self._mapped: mmap.mmap | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        shape, dtype = self.describe(name)
        if not isinstance(dtype, torch.dtype):
            return self._handle.get_tensor(name)  # a dtype this module does not name: the library reads it
        data = bytearray(self._read(*self._data_range(name)))  # writable: torch shares it, no warning
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def __contains__(self, name: object) -> bool:
        return name in self._names  # Mapping's default would read the tensor to find out

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def describe(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        """Shape and dtype from the header, without reading the data."""
        view = self._handle.get_slice(name)
        code = view.get_dtype()
        return tuple(view.get_shape()), _ST_DTYPES.get(code, code)

    def all_finite(self, name: str, dtype: torch.dtype | str) -> bool:
        """No NaN/Inf in a float tensor: its bytes, mapped from the file, checked FINITE_BLOCK at a time.

        A value is NaN or Inf exactly when all its exponent bits are set, so one mask test per element
        covers float32, float16 and bfloat16 alike; memory stays flat and nothing is copied.
        """
        unsigned, exponent = _EXPONENT_MASKS[dtype]
        begin, end = self._data_range(name)
        step = FINITE_BLOCK - FINITE_BLOCK % unsigned.itemsize
        mapped = self._map()
        for start in range(begin, end, step):
            words = np.frombuffer(
                mapped, unsigned, (min(end, start + step) - start) // unsigned.itemsize, start
            )
            if np.any(np.bitwise_and(words, exponent) == exponent):
                return False
        return True

    def close(self) -> None:
        # BufferError: a view is still held by a traceback; the mapping is freed with it
        if self._mapped is not None:
            with contextlib.suppress(BufferError):
                self._mapped.close()

    def _map(self) -> mmap.mmap:
        if self._mapped is None:
            self._mapped = mmap.mmap(self._raw.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mapped

    def _read(self, begin: int, end: int) -> bytes:
        data = os.pread(self._raw.fileno(), end - begin, begin)
        if len(data) != end - begin:  # safe_open saw the whole file: it changed while being read
            raise PackageError("package file changed while it was being validated; upload again")
        return data

    def _data_range(self, name: str) -> tuple[int, int]:
        """Absolute byte range of a tensor's data; safe_open has already checked the header's offsets."""
        if self._offsets is None:
            header_len = int.from_bytes(self._read(0, 8), "little")
            header = json.loads(self._read(8, 8 + header_len))
            base = 8 + header_len
            self._offsets = {
                key: (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
                for key, entry in header.items()
                if key != "__metadata__"
            }
        return self._offsets[name]


FINITE_BLOCK = 4 * 1024 * 1024
# float dtype -> (unsigned integer of its width, the mask of its exponent bits)
_EXPONENT_MASKS: dict[torch.dtype | str, tuple[np.dtype[Any], Any]] = {
    torch.float32: (np.dtype("<u4"), np.uint32(0x7F800000)),
    torch.float16: (np.dtype("<u2"), np.uint16(0x7C00)),
    torch.bfloat16: (np.dtype("<u2"), np.uint16(0x7F80)),
}
# safetensors dtype codes as torch names them (an error message must read the same from bytes or a file)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _not_safetensors(first_bytes: bytes, exc: Exception) -> PackageError:
    # only now may the first bytes explain it: a safetensors header length can start with any byte
    if first_bytes[:2] == b"PK" or first_bytes[:1] == b"\x80":
        return PackageError("package is a zip/pickle (torch.save) payload; use safetensors")
    return PackageError(f"package is not a valid safetensors file: {exc}")


def _decode(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], limits: PackageLimits, build: bool
) -> KnowledgePackage:
    """Check every field; with `build`, also the float32 weights and the statistics bank it holds."""
    size = metadata_bytes(metadata)
    if size > limits.max_metadata_bytes:
        raise PackageError(f"package metadata is {size} bytes, over the limit of {limits.max_metadata_bytes}")
    if metadata.get("format") != FORMAT:
        raise PackageError(f"package format is {metadata.get('format')!r}, expected {FORMAT!r}")
    kind = metadata.get("kind", "")
    if kind not in KINDS:
        raise PackageError(f"package kind {kind!r} is not one of {KINDS}")
    spec = _parse_spec(metadata.get("spec", ""))
    labels = _parse_labels(metadata.get("labels", ""), limits)
    feature_dim = _parse_int(metadata.get("feature_dim", ""), "feature_dim", 1, limits.max_feature_dim)
    counts = _parse_counts(metadata.get("counts", "[]"), len(labels))
    unknown = [k for k in tensors if not k.startswith("model.") and k not in STATS_TENSORS]
    if unknown:
        raise PackageError(f"package has tensors outside the format: {sorted(unknown)[:5]}")
    weights = _check_weights(tensors, spec, feature_dim, len(labels), build)
    stats = _parse_stats(
        {k: tensors[k] for k in STATS_TENSORS if k in tensors},
        metadata.get("stats_labels", "[]"),
        labels,
        feature_dim,
        build,
    )
    abstention = _parse_abstention(metadata.get("abstention"))
    return KnowledgePackage(
        spec, labels, weights, feature_dim, metadata.get("fm_digest", ""), kind, counts, stats, abstention
    )


def _parse_abstention(text: str | None) -> Threshold | None:
    """The optional `abstention` metadata (a head's threshold); absent in older packages: never abstain."""
    if text is None:
        return None
    try:
        return Threshold.from_json(text)
    except AbstentionError as exc:
        raise PackageError(f"package abstention threshold is malformed: {exc}") from exc


def metadata_bytes(metadata: Mapping[str, str]) -> int:
    """Bytes of all keys and values in UTF-8 (a lone surrogate from a JSON escape counts 3, never raises)."""
    return sum(_utf8_len(k) + _utf8_len(v) for k, v in metadata.items())


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _read_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a string map")
    return {str(k): str(v) for k, v in meta.items()}


def _parse_spec(text: str) -> ModelSpec:
    try:
        return ModelSpec.model_validate_json(text)
    except (ValidationError, SpecError) as exc:
        raise PackageError(f"package spec is not a valid zoo spec: {exc}") from exc


def _parse_labels(text: str, limits: PackageLimits) -> list[str]:
    try:
        labels = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PackageError("package labels are not a JSON list") from exc
    if not isinstance(labels, list) or not labels:
        raise PackageError("package labels must be a non-empty JSON list of strings")
    if len(labels) > limits.max_labels:
        raise PackageError(f"package has {len(labels)} labels, over the limit of {limits.max_labels}")
    for label in labels:
        problem = label_problem(label)
        if problem is not None:
            shown = wire.quoted(label) if isinstance(label, str) else wire.quoted(json.dumps(label))
            raise PackageError(f"label {shown} {problem} ({RULE})")
    if len(set(labels)) != len(labels):
        raise PackageError("package labels contain duplicates")
    return labels


def _parse_int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise PackageError(f"package {name} is not an integer") from exc
    if not low <= value <= high:
        raise PackageError(f"package {name}={value} is outside {low}..{high}")
    return value


def _parse_counts(text: str, num_labels: int) -> list[int]:
    try:
        counts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PackageError("package counts are not a JSON list") from exc
    if not isinstance(counts, list) or any(type(c) is not int or c < 0 for c in counts):
        raise PackageError("package counts must be a list of non-negative integers")
    if counts and len(counts) != num_labels:
        raise PackageError(f"package has {len(counts)} counts for {num_labels} labels")
    return counts


def _check_weights(
    tensors: Mapping[str, torch.Tensor], spec: ModelSpec, dim: int, num_labels: int, keep: bool
) -> dict[str, torch.Tensor]:
    """Check every `model.*` tensor against the spec, one at a time; the float32 weights if `keep`."""
    expected = expected_shapes(spec, dim, num_labels)
    names = {k[len("model.") :]: k for k in tensors if k.startswith("model.")}
    if set(names) != set(expected):
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        raise PackageError(f"weights do not match the spec: missing {missing[:5]}, unexpected {extra[:5]}")
    weights = {}
    for name, key in sorted(names.items()):  # sorted: the same first problem from bytes or a file
        shape, dtype, finite = _describe(tensors, key)
        if shape != expected[name]:
            raise PackageError(f"weight {name} has shape {shape}, spec needs {expected[name]}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise PackageError(f"weight {name} has dtype {dtype}; use float32")
        if not finite():
            raise PackageError(f"weight {name} contains NaN or Inf")
        if keep:
            weights[name] = tensors[key].float()
    return weights


def _describe(
    tensors: Mapping[str, torch.Tensor], key: str
) -> tuple[tuple[int, ...], torch.dtype | str, Callable[[], bool]]:
    """Shape, dtype and a finiteness check of one tensor; on disk without loading it whole."""
    if isinstance(tensors, _FileTensors):
        shape, dtype = tensors.describe(key)
        return shape, dtype, lambda: tensors.all_finite(key, dtype)
    tensor = tensors[key]
    return tuple(tensor.shape), tensor.dtype, lambda: _all_finite(tensor)


def _all_finite(tensor: torch.Tensor) -> bool:
    """`torch.isfinite(tensor).all()` through numpy, which is several times faster at it on a CPU."""
    if not tensor.is_floating_point():
        return True  # integers and booleans have no NaN/Inf
    exact = tensor.dtype in (torch.float16, torch.float32, torch.float64)  # numpy holds these as they are
    return bool(np.isfinite((tensor if exact else tensor.float()).detach().numpy()).all())


def _parse_stats(
    tensors: Mapping[str, torch.Tensor], labels_text: str, labels: list[str], dim: int, build: bool = True
) -> StatsBank | None:
    """Check the statistics; the bank they make (None without statistics, or when not `build`)."""
    if not any(k in tensors for k in STATS_TENSORS):
        return None
    try:
        stats_labels = json.loads(labels_text)
    except json.JSONDecodeError as exc:
        raise PackageError("package stats_labels are not a JSON list") from exc
    if not isinstance(stats_labels, list) or not all(isinstance(y, str) for y in stats_labels):
        raise PackageError("package stats_labels must be a JSON list of label names")
    if len(set(stats_labels)) != len(stats_labels):
        raise PackageError("statistics name a label twice")
    if not set(stats_labels) <= set(labels):
        raise PackageError("statistics name labels that the package does not have")
    counts, means, stds = (tensors.get(f"stats.{k}") for k in ("count", "mean", "std"))
    n = len(stats_labels)
    if counts is None or means is None or stds is None:
        raise PackageError("statistics need stats.count, stats.mean and stats.std")
    bases = tensors.get("stats.basis", torch.empty(n, 0, dim))
    if counts.shape != (n,) or means.shape != (n, dim) or stds.shape != (n, dim):
        raise PackageError(f"statistics shapes do not match {n} labels of dimension {dim}")
    if bases.ndim != 3 or bases.shape[0] != n or bases.shape[2] != dim or bases.shape[1] > MAX_RANK:
        raise PackageError(
            f"stats.basis has shape {tuple(bases.shape)}; it must be ({n}, k, {dim}) with k <= {MAX_RANK}"
        )
    if not all(_all_finite(t) for t in (counts, means, stds, bases)) or (counts <= 0).any():
        raise PackageError("statistics contain NaN/Inf or non-positive counts")
    # a count of 0.5 becomes 0 in the bank, and merging two zero counts divides by zero: a NaN bank
    if (counts != counts.round()).any():
        raise PackageError("statistics counts must be whole numbers of examples")
    if (counts > MAX_STATS_COUNT).any():
        raise PackageError(f"statistics counts must be at most {MAX_STATS_COUNT}")
    if not build:
        return None
    return StatsBank.from_tensors(
        StatsTensors(stats_labels, counts.float(), means.float(), stds.float().abs(), bases.float())
    )


def _stats_tensors(t: StatsTensors) -> dict[str, torch.Tensor]:
    tensors = {"stats.count": t.counts, "stats.mean": t.means, "stats.std": t.stds}
    if t.bases.shape[1]:
        tensors["stats.basis"] = t.bases.contiguous()
    return tensors


def encode_stats(bank: StatsBank) -> bytes:
    """A statistics bank alone (the server's bank across clients) as safetensors."""
    stacked = bank.to_tensors()
    return st_save(
        _stats_tensors(stacked),
        metadata={
            "format": FORMAT,
            "kind": "stats",
            "labels": json.dumps(stacked.labels),
            "feature_dim": str(bank.dim),
        },
    )


def decode_stats(data: bytes) -> StatsBank:
    tensors, metadata = st_load(data), _read_metadata(data)
    labels, dim = json.loads(metadata["labels"]), int(metadata["feature_dim"])
    bases = tensors.get("stats.basis", torch.empty(len(labels), 0, dim))
    bank = StatsBank.from_tensors(
        StatsTensors(labels, tensors["stats.count"], tensors["stats.mean"], tensors["stats.std"], bases)
    )
    bank.dim = dim
    return bank
