"""`fcl-server gc`: delete the blobs of old head versions and finished jobs, safely beside live servers.

What is kept is inventory.plan. Deleting is safe with front-ends and workers running on the same blob
dir (several hosts over a shared filesystem too), because of three rules:

1. Anything that makes a new reference to a blob that is already there touches it first (mtime now;
   BlobStore.touch: uploads of bytes the store has, a job's head identical to an old one, a rollback).
   gc deletes only blobs older than the grace period (default one hour, far longer than the seconds
   between a touch and the database commit that references the blob).
2. A candidate is renamed into gc's own temp dir first (atomic), and only then is its mtime read, on
   the renamed file: a touch that came before the rename shows there, and the blob is put back; a touch
   after it finds no file, and its writer writes the blob anew. So no writer can be left believing in a
   blob that gc then deletes.
3. After the rename gc asks the live database once more whether anything needs the blob now (a live
   head, an unfinished job, a kv value), and puts it back if so.

Each deleted blob is recorded in collected_blobs first, so a reference to it (an old head version's
history row) reads as "collected", not as a lost file. History rows stay: gc never rewrites history.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from fcl_server import inventory
from fcl_server.blobs import BlobStore
from fcl_server.state import State

DEFAULT_GRACE_S = 3600.0
ORPHAN = "orphan"  # a blob no row names (gc --orphans)


@dataclass
class GcReport:
    keep_versions: int
    grace_s: float
    dry_run: bool
    freed: Counter[str] = field(default_factory=Counter)  # kind → blobs deleted (would be, dry run)
    freed_bytes: int = 0
    kept: int = 0  # referenced blobs still needed
    recent: int = 0  # candidates younger than the grace period, left for a later run
    in_use: int = 0  # candidates that became needed while gc ran, put back
    missing: int = 0  # candidates with no file (collected before, or lost)

    @property
    def freed_count(self) -> int:
        return sum(self.freed.values())

    def as_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "keep_versions": self.keep_versions,
            "grace_s": self.grace_s,
            "freed": {"count": self.freed_count, "bytes": self.freed_bytes, "by_kind": dict(self.freed)},
            "kept": self.kept,
            "skipped_recent": self.recent,
            "put_back_in_use": self.in_use,
            "missing": self.missing,
        }


def collect(
    state: State,
    blobs: BlobStore,
    keep_versions: int,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    orphans: bool = False,
) -> GcReport:
    """Delete what inventory.plan no longer needs, older than `grace_s`; returns what was freed.

    `orphans`: also the blobs no row names at all, by the same rules (a writer's new blob is younger
    than the grace period until its commit names it)."""
    if keep_versions < 0:
        raise ValueError(
            f"--keep-versions must be >= 0 (the live heads are always kept), not {keep_versions}"
        )
    if grace_s < 0:
        raise ValueError(f"--grace-s must be >= 0, not {grace_s}")
    # the files first, then the plan: a blob written in between is named by the plan or is young
    on_disk = set(blobs.digests()) if orphans else set()
    with state.engine.connect() as conn, conn.begin():  # one snapshot for the whole plan
        planned = inventory.plan(conn, keep_versions)
    report = GcReport(keep_versions, grace_s, dry_run, kept=len(planned.keep))
    drop = dict(planned.drop)
    drop.update((d, ORPHAN) for d in on_disk - planned.keep.keys() - planned.drop.keys())
    for digest, kind in sorted(drop.items()):
        path = blobs.path(digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            report.missing += 1
            continue
        if time.time() - stat.st_mtime < grace_s:
            report.recent += 1
            continue
        if dry_run:
            report.freed[_kind(kind)] += 1
            report.freed_bytes += stat.st_size
            continue
        freed = _delete(state, blobs, digest, kind, grace_s)
        if freed is None:
            report.in_use += 1
        elif freed < 0:
            report.missing += 1
        else:
            report.freed[_kind(kind)] += 1
            report.freed_bytes += freed
    return report


def _kind(kinds: str) -> str:
    """One word for what a blob was: a head version wins over a package or bank of the same bytes."""
    for kind in ("global-head", "personal-head", "package", "bank", ORPHAN):
        if kind in kinds.split("+"):
            return kind
    return kinds


def _delete(state: State, blobs: BlobStore, digest: str, kind: str, grace_s: float) -> int | None:
    """Delete one blob by the rules above: its size when deleted, None when put back (needed), -1 when
    another process deleted it first."""
    path = blobs.path(digest)
    size = path.stat().st_size if path.exists() else 0
    state.record_collected(digest, size, kind)  # first: a crash after it leaves a file the next run deletes
    aside = blobs.new_temp()
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another gc got there first
        return -1
    touched = time.time() - aside.stat().st_mtime < grace_s
    with state.engine.connect() as conn, conn.begin():
        needed = touched or inventory.still_needed(conn, digest)
    if not needed:
        aside.unlink()
        return size
    with contextlib.suppress(FileExistsError):  # a writer that found it gone wrote it anew meanwhile
        os.link(aside, path)  # back where it was
    aside.unlink()
    state.forget_collected(digest)
    return None
