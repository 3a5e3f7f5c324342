"""Content-addressed blob store: files named by their sha256, written atomically (temp, fsync, rename)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest[2:]

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.exists(digest):
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self._publish(Path(tmp), digest)
        return digest

    def put_file(self, tmp_path: Path, digest: str) -> str:
        """Move a fully written, fsynced temp file (inside this store's tmp dir) in under `digest`."""
        if self.exists(digest):
            tmp_path.unlink(missing_ok=True)
        else:
            self._publish(tmp_path, digest)
        return digest

    def new_temp(self) -> Path:
        """A fresh name in the temp dir; nothing is created (the caller's write or rename makes it)."""
        return self.tmp / f"{uuid.uuid4().hex}.part"

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def clear_temp(self) -> int:
        """Drop partial writes left by a crash; returns how many."""
        stale = list(self.tmp.iterdir())
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def _publish(self, tmp: Path, digest: str) -> None:
        dest = self.path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
