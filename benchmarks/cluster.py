"""Start real fcl-server / fcl-client processes on loopback (for the demo, benchmarks and tests)."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # several processes share this machine's cores: one thread each avoids oversubscription
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def enroll(state_dir: Path, name: str, admin: bool = False) -> str:
    cmd = [sys.executable, "-m", "fcl_server.cli", "enroll", "--state-dir", str(state_dir), name]
    out = subprocess.run(
        cmd + (["--admin"] if admin else []), check=True, capture_output=True, text=True, env=_env()
    )
    return out.stdout.strip()


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM and wait; SIGKILL once `timeout` passes. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        return terminate(self.proc, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def metrics_port(self, wait_s: float = 30.0) -> int | None:
        """The port of `--metrics-listen` as the server printed it (None: not serving metrics)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            found = re.search(r"metrics on port (\d+)", self.log_path.read_text(errors="replace"))
            if found:
                return int(found[1])
            if self.proc.poll() is not None:
                return None
            time.sleep(0.1)
        return None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(state_dir: Path, log_path: Path, *extra: str, wait_s: float = 180.0) -> ServerProcess:
    """Run `fcl-server serve` on 127.0.0.1:0 and wait until it reports its port."""
    port_file = state_dir / "port"
    port_file.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "fcl_server.cli",
        "serve",
        "--state-dir",
        str(state_dir),
        "--listen",
        "127.0.0.1:0",
        "--port-file",
        str(port_file),
        *extra,
    ]
    proc = _launch(cmd, log_path, port_file.exists, "fcl-server", wait_s)
    return ServerProcess(proc, int(port_file.read_text()), log_path)


def _launch(
    cmd: list[str], log_path: Path, ready: Callable[[], bool], what: str, wait_s: float
) -> subprocess.Popen[bytes]:
    """Start `cmd` logging to `log_path` and wait until `ready()`; kill it and raise if it never is."""
    proc = _popen(cmd, log_path)
    _wait_ready(proc, log_path, ready, what, wait_s)
    return proc


def _popen(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())


def _wait_ready(
    proc: subprocess.Popen[bytes], log_path: Path, ready: Callable[[], bool], what: str, wait_s: float
) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{what} did not start (exit {proc.poll()}):\n{tail}")


def start_client(
    target: str,
    client_id: str,
    token: str,
    stream: Path,
    model: str,
    work_dir: Path,
    log_path: Path,
    *extra: str,
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "fcl_client.cli",
        "run",
        "--server",
        target,
        "--client-id",
        client_id,
        "--stream",
        str(stream),
        "--model",
        model,
        "--work-dir",
        str(work_dir),
        *extra,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        # the token travels in the environment, not argv, where `ps` would show it
        env = {**_env(), "FCL_TOKEN": token}
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def issue_token(state: Path | None, name: str, admin: bool = False, database: str | None = None) -> str:
    """Issue a token in process, as `enroll` does without starting a process (the server may run)."""
    return issue_tokens(state, [name], admin, database)[0]


def issue_tokens(
    state: Path | None, names: list[str], admin: bool = False, database: str | None = None
) -> list[str]:
    """One token for each name, on one open database (a benchmark enrolls a thousand clients)."""
    from fcl_server.app import open_state
    from fcl_server.cli import new_token

    tokens = [new_token() for _ in names]
    db = open_state(state, database)
    try:
        for name, token in zip(names, tokens, strict=True):
            db.add_token(token, name, admin)
    finally:
        db.close()
    return tokens


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the running job goes back to the queue) and wait; returns the exit code."""
        return terminate(self.proc, timeout)


def start_worker(name: str, log_path: Path, *args: str, wait_s: float = 180.0) -> WorkerProcess:
    """Run `fcl-server worker --worker-id NAME ARGS` and wait until it says it runs."""
    return start_workers({name: log_path}, *args, wait_s=wait_s)[0]


def start_workers(logs: dict[str, Path], *args: str, wait_s: float = 180.0) -> list[WorkerProcess]:
    """Start a worker per name (logging to its path) all at once, then wait until each says it runs:
    they begin claiming within moments of each other, not a process start-up apart."""
    started: list[WorkerProcess] = []
    try:
        for name, log in logs.items():
            cmd = [sys.executable, "-m", "fcl_server.cli", "worker", "--worker-id", name, *args]
            started.append(WorkerProcess(name, _popen(cmd, log), log))
        for w in started:
            running = functools.partial(_says, w.log_path, f"worker {w.name} running")
            _wait_ready(w.proc, w.log_path, running, f"fcl-server worker {w.name}", wait_s)
    except BaseException:
        for w in started:
            w.proc.kill()
        raise
    return started


def _says(log_path: Path, text: str) -> bool:
    return text in log_path.read_text(errors="replace")
