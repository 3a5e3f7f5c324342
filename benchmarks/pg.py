"""A throwaway PostgreSQL cluster (tests, benchmarks): initdb on a temp dir, a free port on 127.0.0.1, stop.

initdb refuses to run as root: as root the cluster runs as the `postgres` user (which Debian's package
creates). The binaries come from PATH or /usr/lib/postgresql/*/bin (where Debian puts them).
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

USER = "fcl"


def bindir() -> Path | None:
    """The folder of initdb/pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return debian[-1].parent if debian else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One cluster for a test session; `new_database()` gives each test an empty database of its own.

    Commits are not flushed to disk (fsync off) unless `durable`: tests need no durability, and a
    benchmark that compares against SQLite's flushed commits must pay for its own."""

    def __init__(self, bin_dir: Path, durable: bool = False) -> None:
        self.bin = bin_dir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="fcl-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.password = secrets.token_urlsafe(12)
        self.port = 0
        self._names = itertools.count(1)
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, and there is no postgres user to run PostgreSQL as"
                ) from None
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root without runuser: cannot start PostgreSQL as postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as:
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile), "-A", "scram-sha-256",
            "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip
        pwfile.unlink()

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self._as, str(self.bin / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{log}")

    def _options(self) -> str:
        flushed = "" if self.durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        return (
            f"-c listen_addresses=127.0.0.1 {flushed}-c unix_socket_directories={self.root} "
            f"-c max_connections=200 -c shared_buffers=32MB -p {self.port}"
        )

    def start(self) -> None:
        for attempt in range(3):  # the free port may be taken before postgres binds it
            self.port = _free_port()
            try:
                self.resume()
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def pause(self) -> None:
        """Stop the server, keeping its data and port (resume() starts it again)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def resume(self) -> None:
        """Start the server on its port (start() picks the port)."""
        log = ["-l", str(self.log)]
        self._run("pg_ctl", "-D", str(self.data), *log, "-w", "-t", "60", "-o", self._options(), "start")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL (password included)."""
        name = f"fcl_test_{next(self._names)}"
        with psycopg.connect(self.url(driver="postgresql"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type,unused-ignore]  # a name we made
        return self.url(name)
