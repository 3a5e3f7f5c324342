"""Watching a task-stream directory: which folders are complete, their content fingerprints, new rounds.

Everything here but `scan_stream` and `fingerprint` (which read the disk) is a pure function of its
arguments, so the agent's decisions can be tested without a clock or a file system.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.datasets.records import Example
from common.datasets.streams import TEST_FILE, TRAIN_FILE
from common.wire_limits import ID_MAX_CHARS, ID_RE

READY_FILE = "READY"  # a writer's "this folder is complete" marker
TASK_FILES = (TRAIN_FILE, TEST_FILE)  # what a task is made of: the fingerprint covers these only


@dataclass(frozen=True)
class FileStat:
    name: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FolderScan:
    """What one look at a task folder saw: its files' sizes and times (no content read)."""

    name: str
    files: tuple[FileStat, ...]  # every plain file but READY, by name
    ready_mtime_ns: int | None = None  # READY's modification time; None: no marker

    @property
    def signature(self) -> tuple[FileStat, ...]:
        return self.files

    @property
    def has_train(self) -> bool:
        return any(f.name == TRAIN_FILE for f in self.files)

    @property
    def marked_ready(self) -> bool:
        """READY is there and no file changed after it was written (a later change needs settling)."""
        if self.ready_mtime_ns is None:
            return False
        return all(f.mtime_ns <= self.ready_mtime_ns for f in self.files)


@dataclass(frozen=True)
class Seen:
    """A folder as the watcher last saw it, and since when (monotonic seconds) it looks like that."""

    scan: FolderScan
    since: float


def scan_stream(directory: Path) -> dict[str, FolderScan]:
    """Every task folder of `directory` (subdirectories not starting with '.'), by name; {} if none.

    A writer that wants a folder taken at once writes it under a '.'-name and renames it when done,
    or touches READY last.
    """
    found: dict[str, FolderScan] = {}
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=True):
            continue
        files: list[FileStat] = []
        ready: int | None = None
        try:
            for item in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if not item.is_file(follow_symlinks=True):
                    continue
                st = item.stat(follow_symlinks=True)
                if item.name == READY_FILE:
                    ready = st.st_mtime_ns
                else:
                    files.append(FileStat(item.name, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:  # removed while we looked: it is not complete
            continue
        found[entry.name] = FolderScan(entry.name, tuple(files), ready)
    return found


def observe(previous: Mapping[str, Seen], scans: Mapping[str, FolderScan], now: float) -> dict[str, Seen]:
    """The watcher's new view: a folder keeps its `since` while its files look the same, else it is now."""
    seen: dict[str, Seen] = {}
    for name, scan in scans.items():
        before = previous.get(name)
        unchanged = before is not None and before.scan.signature == scan.signature
        seen[name] = Seen(scan, before.since if unchanged and before else now)
    return seen


def is_complete(seen: Seen, now: float, settle_s: float) -> bool:
    """A folder with a train file is complete when marked READY or when unchanged for settle_s seconds."""
    if not seen.scan.has_train:
        return False
    return seen.scan.marked_ready or now - seen.since >= settle_s


def complete_folders(seen: Mapping[str, Seen], now: float, settle_s: float) -> list[str]:
    """The complete folders, in name order (the order a new batch of tasks is taken in)."""
    return sorted(name for name, s in seen.items() if is_complete(s, now, settle_s))


def fingerprint(folder: Path) -> str:
    """sha256 over the task files' names and contents: the same data gives the same fingerprint."""
    digest = hashlib.sha256()
    for name in TASK_FILES:
        path = folder / name
        if not path.is_file():
            continue
        file_digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                file_digest.update(block)
        digest.update(f"{name}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


def round_task_name(folder: str, round_no: int) -> str:
    """The task name (upload task_key) of a folder's round: the folder's name, then `<folder>.r<N>`.

    A folder name too long for a task key with the suffix is cut, so the name stays a valid key.
    """
    if round_no <= 1:
        return folder
    suffix = f".r{round_no}"
    return folder[: ID_MAX_CHARS - len(suffix)] + suffix


def folder_name_problem(folder: str) -> str | None:
    """Why a folder name cannot name a task (None: it can); names are task keys on the server."""
    if ID_RE.match(folder):
        return None
    return (
        f"task folder {folder!r} cannot be a task name: use 1-{ID_MAX_CHARS} letters, digits, '_', '.' "
        "or '-', starting with a letter or digit (rename the folder)"
    )


def new_examples(current: Iterable[Example], learned: Iterable[Example]) -> list[Example]:
    """The examples of `current` beyond those `learned` already (a multiset difference), in file order."""
    left = Counter((ex.text, ex.label) for ex in learned)
    out = []
    for ex in current:
        key = (ex.text, ex.label)
        if left[key] > 0:
            left[key] -= 1
        else:
            out.append(ex)
    return out
