"""Unfinished uploads kept under the state dir, so a broken UploadKnowledge stream resumes later."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from fcl_server.errors import Aborted, InvalidArgument

log = logging.getLogger(__name__)
SWEEP_EVERY_S = 60.0
HASH_BLOCK = 1 << 20
STRIPES = 64
PARTIAL_SUFFIXES = (".part", ".json", ".tmp")  # .tmp: left by older servers, which wrote meta via a temp file


@dataclass(frozen=True)
class PartialMeta:
    """What the held bytes belong to: a resume must describe the same package."""

    size: int
    sha256: str
    task_key: str
    task_index: int


@dataclass(frozen=True)
class Held:
    meta: PartialMeta
    committed: int  # bytes on disk, a prefix of the package


class PartialUploads:
    """`<root>/<client>/<upload_id>.part` (bytes) and `.json` (PartialMeta); never read by the worker.

    Only the newest stream of an upload may write (a retry takes over from a stream the server has not
    yet seen die); every write is a plain unbuffered write, so bytes survive a kill -9 of the server.
    Partials are dropped when sealed (complete), when invalid, and `ttl_s` after their last write.
    """

    def __init__(self, root: Path, ttl_s: float = 24 * 3600.0, max_per_client: int = 8) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.max_per_client = max_per_client
        self.root.mkdir(parents=True, exist_ok=True)
        # the global lock guards the owner map and the directory layout; each upload's bytes are written
        # under its stripe lock, so many uploads write at once while a takeover stays atomic.
        # Order: a stripe lock before the global lock, never the other way round.
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(STRIPES)]
        # (client, upload id) → generation of the one open stream allowed to write it
        self._owner: dict[tuple[str, str], int] = {}
        self._generation = 0
        self._last_sweep = 0.0
        self.sweep()

    # -- queries ----------------------------------------------------------------------------------
    def held(self, client: str, upload_id: str) -> Held | None:
        with self._stripe(client, upload_id):
            return self._held(client, upload_id)

    def _held(self, client: str, upload_id: str) -> Held | None:
        part, meta_path = self._paths(client, upload_id)
        try:
            meta = PartialMeta(**json.loads(meta_path.read_text()))
            committed = part.stat().st_size if part.exists() else 0
        except (OSError, ValueError, TypeError):  # OSError too: a sweep may drop it meanwhile
            return None
        return Held(meta, min(committed, meta.size))

    def _stripe(self, client: str, upload_id: str) -> threading.Lock:
        return self._stripes[hash((client, upload_id)) % STRIPES]

    # -- writing ----------------------------------------------------------------------------------
    def open(self, client: str, upload_id: str, meta: PartialMeta, offset: int) -> PartialWriter:
        """Start (offset 0) or resume (offset ≤ bytes held, same package) an upload; takes over writing."""
        self._maybe_sweep()
        with self._stripe(client, upload_id), self._lock:
            part, meta_path = self._paths(client, upload_id)
            if offset == 0:
                part.parent.mkdir(parents=True, exist_ok=True)
                # written in place, not via a temp file: a torn one (a crash mid-write) fails to parse,
                # which reads as no bytes held, so the client starts over
                meta_path.write_text(json.dumps(asdict(meta)))
                fh: BinaryIO = part.open("wb", buffering=0)
                self._evict_over_cap(client, keep=upload_id)
            else:
                held = self._held(client, upload_id)
                if held is None or held.meta.size != meta.size or held.meta.sha256 != meta.sha256:
                    raise Aborted(
                        f"the server holds no bytes of upload {upload_id!r} for this package; "
                        "ask GetUploadStatus and resume from its committed_size (0: start over)"
                    )
                if offset > held.committed:
                    raise Aborted(
                        f"offset {offset} is past the {held.committed} bytes the server holds of upload "
                        f"{upload_id!r}; resume from GetUploadStatus.committed_size"
                    )
                fh = part.open("r+b", buffering=0)
                fh.truncate(offset)
                fh.seek(offset)
            self._generation += 1
            self._owner[(client, upload_id)] = self._generation
            return PartialWriter(self, client, upload_id, meta, self._generation, fh, offset)

    def discard(self, client: str, upload_id: str) -> None:
        with self._lock:
            self._discard(client, upload_id)

    def _discard(self, client: str, upload_id: str) -> None:
        self._owner.pop((client, upload_id), None)
        part, meta = self._paths(client, upload_id)
        for path in (part, meta, meta.with_suffix(".tmp")):
            path.unlink(missing_ok=True)

    def _release(self, writer: PartialWriter) -> None:
        with self._lock:
            if self._owner.get((writer.client, writer.upload_id)) == writer.generation:
                del self._owner[(writer.client, writer.upload_id)]

    def _drop(self, writer: PartialWriter) -> None:
        with self._lock:
            if self._owner.get((writer.client, writer.upload_id)) == writer.generation:
                self._discard(writer.client, writer.upload_id)

    def _write(self, writer: PartialWriter, data: bytes) -> None:
        with self._stripe(writer.client, writer.upload_id):
            with self._lock:
                self._check_owner(writer)
            view = memoryview(data)
            while view:
                written = writer.fh.write(view)
                view = view[written or 0 :]

    def _seal(self, writer: PartialWriter, dest: Path) -> None:
        """Move the complete bytes to `dest` (atomically, so no later stream can touch them); forget it.

        The file stays open: the caller fsyncs it (`writer.sync`) before it acknowledges the bytes.
        """
        with self._stripe(writer.client, writer.upload_id), self._lock:
            self._check_owner(writer)
            part, meta_path = self._paths(writer.client, writer.upload_id)
            os.replace(part, dest)
            meta_path.unlink(missing_ok=True)
            self._owner.pop((writer.client, writer.upload_id), None)

    def _check_owner(self, writer: PartialWriter) -> None:
        if self._owner.get((writer.client, writer.upload_id)) != writer.generation:
            raise Aborted(f"a newer stream of upload {writer.upload_id!r} took over; this one stops")

    # -- housekeeping -----------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> int:
        """Drop partials not written to for `ttl_s`; returns how many."""
        now = time.time() if now is None else now
        dropped = 0
        with self._lock:
            self._last_sweep = now
            for client_dir in [p for p in self.root.iterdir() if p.is_dir()]:
                for upload_id, mtime in _last_writes(_partial_files(client_dir)).items():
                    if now - mtime > self.ttl_s and (client_dir.name, upload_id) not in self._owner:
                        self._discard(client_dir.name, upload_id)
                        dropped += 1
        if dropped:
            log.info("dropped %d unfinished uploads idle for over %.0fs", dropped, self.ttl_s)
        return dropped

    def _maybe_sweep(self) -> None:
        if time.time() - self._last_sweep > SWEEP_EVERY_S:
            self.sweep()

    def _evict_over_cap(self, client: str, keep: str) -> None:
        """A client holds at most `max_per_client` unfinished uploads: the least recently written go."""
        files = _partial_files(self.root / client)
        if len({_upload_id(f) for f in files} | {keep}) <= self.max_per_client:
            return  # under the cap, decided from the names alone: no file is stat'ed
        others = _last_writes(files)
        for upload_id in [keep] + [u for u in others if (client, u) in self._owner]:
            others.pop(upload_id, None)  # never one being written right now
        keep_n = self.max_per_client
        excess = max(0, len(others) + 1 - keep_n)
        for upload_id in sorted(others, key=others.__getitem__)[:excess]:
            log.info("client %s: dropping unfinished upload %s (%d kept at most)", client, upload_id, keep_n)
            self._discard(client, upload_id)

    def _paths(self, client: str, upload_id: str) -> tuple[Path, Path]:
        # client and upload ids are validated (ID_RE: no '/', no leading '.') before they get here
        base = self.root / client / upload_id
        return base.with_name(upload_id + ".part"), base.with_name(upload_id + ".json")


class PartialWriter:
    """One stream's handle on an unfinished upload."""

    def __init__(
        self,
        store: PartialUploads,
        client: str,
        upload_id: str,
        meta: PartialMeta,
        generation: int,
        fh: BinaryIO,
        offset: int,
    ) -> None:
        self.store, self.client, self.upload_id, self.meta = store, client, upload_id, meta
        self.generation, self.fh = generation, fh
        self.offset = offset  # where this stream started: > 0 when it resumed an earlier one
        self.committed = offset
        self.sealed = self.abandoned = False
        # hashed as it is written, so accepting an upload needs no second pass over the file; the prefix
        # an earlier stream left is read back from disk (damaged held bytes then fail the sha256 check)
        self._sha = hashlib.sha256()
        for start in range(0, offset, HASH_BLOCK):
            self._sha.update(os.pread(fh.fileno(), min(HASH_BLOCK, offset - start), start))

    def write(self, chunk: bytes) -> None:
        if self.committed + len(chunk) > self.meta.size:
            self.abandon()
            raise InvalidArgument(f"more bytes arrived than the {self.meta.size} the header announced")
        self.store._write(self, chunk)
        self._sha.update(chunk)
        self.committed += len(chunk)

    def sha256(self) -> str:
        """sha256 (hex) of the bytes held so far: the resumed prefix and everything this stream wrote."""
        return self._sha.hexdigest()

    def abandon(self) -> None:
        """The stream broke the protocol: what it sent cannot be trusted as a prefix, so drop it all."""
        self.abandoned = True
        self.store._drop(self)

    def seal(self, dest: Path) -> None:
        self.store._seal(self, dest)
        self.sealed = True

    def sync(self) -> None:
        """Flush the written bytes to disk (through this stream's own descriptor, so no error is missed)."""
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        """End of this stream without sealing: the bytes stay for a resume."""
        if not self.fh.closed:
            self.fh.close()
        self.store._release(self)
        if not (self.sealed or self.abandoned):
            log.info(
                "upload %s of %s: stream ended holding %d of %d bytes (this stream sent %d)",
                self.upload_id,
                self.client,
                self.committed,
                self.meta.size,
                self.committed - self.offset,
            )


def _partial_files(client_dir: Path) -> list[os.DirEntry[str]]:
    """The files of unfinished uploads in a client's directory (none when it does not exist)."""
    try:
        with os.scandir(client_dir) as entries:
            return [e for e in entries if os.path.splitext(e.name)[1] in PARTIAL_SUFFIXES]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _upload_id(entry: os.DirEntry[str]) -> str:
    return os.path.splitext(entry.name)[0]


def _last_writes(files: list[os.DirEntry[str]]) -> dict[str, float]:
    """upload id → last write time, over the given partial files."""
    found: dict[str, float] = {}
    for entry in files:
        upload_id = _upload_id(entry)
        found[upload_id] = max(found.get(upload_id, 0.0), entry.stat().st_mtime)
    return found
