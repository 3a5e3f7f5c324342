"""The server's FM: loaded once, its archive kept as a blob, its public-corpus features cached on disk."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from common.fm import FoundationModel, cached_features, file_sha256, write_fm_archive
from common.fm_encoding import FMEncoding
from fcl_server.blobs import BlobStore
from fcl_server.state import State

log = logging.getLogger(__name__)
FM_KEY = "fm"  # the FM every process of this database encodes with: {"digest", "name", "encoding"}


class FMMismatchError(ValueError):
    """This process would compute other features than the database's other front-ends and workers."""


def bind_fm(state: State, fm: FoundationModel) -> None:
    """Check that `fm` is the FM this database's heads are built on; the first process records it.

    A worker started with other FM options than its front-ends would distil packages whose features it
    does not compute, and a front-end would accept packages that the heads cannot read: both are
    refused at start, naming each difference, instead of corrupting G.
    """
    encoding = fm.encoding.as_dict()
    mine = {"digest": fm.digest, "name": fm.name, "encoding": encoding}
    bound = json.loads(state.set_kv_once(FM_KEY, json.dumps(mine, sort_keys=True)))
    if bound["digest"] == fm.digest:
        return
    theirs = bound.get("encoding") or {}
    differences = [
        f"{key} {value!r} (the database's: {theirs.get(key)!r})"
        for key, value in encoding.items()
        if theirs.get(key) != value
    ]
    if bound.get("name") != fm.name:
        differences.insert(0, f"FM {fm.name!r} (the database's: {bound.get('name')!r})")
    raise FMMismatchError(
        f"this process encodes with FM digest {fm.digest[:12]}, but this database's heads are built on "
        f"{str(bound['digest'])[:12]}: {'; '.join(differences) or 'the model files differ'}. Start every "
        "front-end and worker of a database with the same --fm and --fm-pooling/--fm-max-length/"
        "--fm-prompt (`fcl-server fm info` prints them); a new FM needs a new state database"
    )


@dataclass(frozen=True)
class FMInfo:
    name: str
    digest: str
    feature_dim: int
    archive_blob: str
    archive_size: int
    files_digest: str = ""
    encoding: FMEncoding | None = None  # None only in tests' hand-made infos


class FMHost:
    def __init__(
        self, fm: FoundationModel, state: State, blobs: BlobStore, public_texts: list[str], cache: Path
    ):
        self.fm = fm
        self.info = self._archive(fm, state, blobs)
        self._public_texts = public_texts
        self._cache = cache
        self._public: torch.Tensor | None = None
        self._lock = threading.Lock()

    def public_features(self) -> torch.Tensor:
        """U = f(public corpus), computed on first use and cached on disk by (FM digest, corpus digest)."""
        with self._lock:
            if self._public is None:
                self._public = cached_features(self.fm, self._public_texts, self._cache)
            return self._public

    @staticmethod
    def _archive(fm: FoundationModel, state: State, blobs: BlobStore) -> FMInfo:
        key = f"fm_archive:{fm.digest}"
        blob = state.get_kv(key)
        if blob is None or not blobs.exists(blob):
            tmp = blobs.new_temp()
            write_fm_archive(fm.path, tmp, fm.encoding)
            blob = blobs.put_file(tmp, file_sha256(tmp))
            state.set_kv(key, blob)
            log.info("FM archive %s written (%d bytes)", blob[:12], blobs.size(blob))
        return FMInfo(
            fm.name, fm.digest, fm.feature_dim, blob, blobs.size(blob), fm.files_digest, fm.encoding
        )


def read_public_corpus(path: Path) -> list[str]:
    lines = [" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise ValueError(
            f"public corpus {path} has no sentences; give a text file with one sentence per line"
        )
    return texts
