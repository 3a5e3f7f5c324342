"""Content-addressed blob store: files named by their sha256, written atomically (temp, fsync, link).

The store may be shared by several server processes, on one host or over a shared filesystem. Each
process writes its temp files in a directory of its own under `tmp/`, named by host, pid and a random
suffix; at start a process removes only the temp directories of processes that are gone: on its own
host, those whose pid is dead; on any host, those untouched for `stale_temp_s`.

A writer that finds its blob already there touches it (its mtime becomes now) instead of writing it
again, and so does anything else that makes a new reference to an existing blob (`fcl-server
rollback`): `fcl-server gc` never deletes a blob touched within its grace period, so a blob that a
concurrent upload or job is about to reference in the database is never collected (fcl_server.gc).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

STALE_TEMP_S = 3600.0  # a temp dir untouched this long belongs to no live process (a temp lives seconds)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


MARK = ".fcl-blob-dir"  # names the blob dir; its database records the same token


class BlobDirError(ValueError):
    """The blob dir is not the one the database's other processes use."""


class BlobStore:
    def __init__(self, root: Path, stale_temp_s: float = STALE_TEMP_S) -> None:
        self.root = root
        self.stale_temp_s = stale_temp_s
        self.tmp_root = root / "tmp"
        self.tmp = self.tmp_root / f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def bind(self, set_once: Callable[[str, str], str]) -> None:
        """Check that this is the blob dir of the database: the first process writes a token into the
        dir and the database (`set_once`, e.g. State.set_kv_once); every later one must find it here.

        A front-end or worker whose --blob-dir is a local folder, not the shared one, is refused at
        start, instead of serving uploads that the others cannot read.
        """
        mark = self.root / MARK
        if not mark.exists():
            tmp = self.root / f"{MARK}.{uuid.uuid4().hex}"
            tmp.write_text(uuid.uuid4().hex)
            try:
                os.link(tmp, mark)  # atomic and never overwrites: one token per dir, whoever wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        token = mark.read_text().strip()
        expected = set_once("blob_dir_token", token)
        if expected != token:
            raise BlobDirError(
                f"{self.root} is not the blob dir this database's other front-ends and workers use (its "
                f"{MARK} token is {token[:8]}..., the database's {expected[:8]}...): give every process "
                "the same --blob-dir on a shared filesystem (NFS, CephFS, an RWX volume)"
            )

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest[2:]

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def touch(self, digest: str) -> bool:
        """Mark an existing blob as just used (mtime now): gc keeps it for its grace period. False when
        the blob is not there (then write it)."""
        try:
            os.utime(self.path(digest))
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's file (not a setup fcl makes): it is there, untouchable
            return True
        return True

    def read_mark(self) -> str | None:
        """The token of this blob dir (see bind), or None when the dir has none yet."""
        try:
            return (self.root / MARK).read_text().strip()
        except FileNotFoundError:
            return None

    def check_mark(self, expected: str | None) -> None:
        """Refuse a blob dir that is not the database's (without writing anything, unlike bind)."""
        token = self.read_mark()
        if expected is None or token == expected:
            return
        found = f"its {MARK} token is {token[:8]}..." if token else f"it has no {MARK}"
        raise BlobDirError(
            f"{self.root} is not the blob dir of this database ({found}, the database's {expected[:8]}...): "
            "give --blob-dir (or --state-dir) as the server has it"
        )

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.touch(digest):
            fd, tmp = tempfile.mkstemp(dir=self._temp_dir())
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self._publish(Path(tmp), digest)
        return digest

    def put_file(self, tmp_path: Path, digest: str) -> str:
        """Move a fully written, fsynced temp file (inside this store's tmp dir) in under `digest`."""
        if self.touch(digest):
            tmp_path.unlink(missing_ok=True)
        else:
            self._publish(tmp_path, digest)
        return digest

    def new_temp(self) -> Path:
        """A fresh name in the temp dir; nothing is created (the caller's write or rename makes it)."""
        return self._temp_dir() / f"{uuid.uuid4().hex}.part"

    def _temp_dir(self) -> Path:
        # made again if another process swept it as stale while this one was idle for long
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def digests(self) -> Iterator[str]:
        """Every blob in the store (not temp files, not the dir's mark), as its digest."""
        for prefix in self.root.glob("??"):
            if prefix.is_dir() and all(c in "0123456789abcdef" for c in prefix.name):
                for entry in prefix.iterdir():
                    digest = prefix.name + entry.name
                    if len(digest) == 64 and all(c in "0123456789abcdef" for c in entry.name):
                        yield digest

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def clear_temp(self) -> int:
        """Drop the temp files of processes that are gone (left by a crash); returns how many.

        Never another live process's: those may be uploads in flight.
        """
        dropped = 0
        for entry in self.tmp_root.iterdir():
            if entry == self.tmp or not self._abandoned(entry):
                continue
            if entry.is_dir():
                dropped += sum(1 for p in entry.iterdir() if p.is_file())
                shutil.rmtree(entry, ignore_errors=True)
            else:  # a temp file of a version that wrote them straight into tmp/
                entry.unlink(missing_ok=True)
                dropped += 1
        return dropped

    def close(self) -> None:
        """Remove this process's temp dir (empty once no write is in flight)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _abandoned(self, entry: Path) -> bool:
        host, _, rest = entry.name.partition("-")
        pid = rest.partition("-")[0]
        if entry.is_dir() and host == _host() and pid.isdigit():
            return not _pid_alive(int(pid))
        newest = max((p.stat().st_mtime for p in entry.rglob("*")), default=entry.stat().st_mtime)
        return time.time() - max(newest, entry.stat().st_mtime) > self.stale_temp_s or not entry.is_dir()

    def _publish(self, tmp: Path, digest: str) -> None:
        """Link the temp file in under its digest. A blob a concurrent writer published meanwhile (the same
        bytes: e.g. the FM archive, written by every process that starts at once) is kept, not replaced:
        a replaced file's open readers on other NFS hosts would fail (ESTALE)."""
        dest = self.path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, dest)  # atomic, and never overwrites
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
