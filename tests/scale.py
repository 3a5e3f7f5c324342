"""Scale-out test clusters: front-end and worker processes on one PostgreSQL database and one blob dir."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.cluster import ServerProcess, WorkerProcess, start_server, start_worker
from fcl_server.state import State
from tests.servers import write_tiny_corpus

LEASE_S = 3.0  # short: a killed worker's job is taken back within seconds


def wait_for(what: Callable[[], object], label: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {label}")


@dataclass
class Cluster:
    url: str
    root: Path  # logs and each process's own state dir
    blob_dir: Path  # the one every process shares (an NFS or RWX volume in production)
    args: tuple[str, ...]  # --database, --blob-dir, --public-corpus: what every process is started with
    state: State
    frontends: list[ServerProcess] = field(default_factory=list)
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    lease_s: float = LEASE_S  # the workers'

    @property
    def frontend(self) -> ServerProcess:
        return self.frontends[0]

    @property
    def target(self) -> str:
        return self.frontend.target

    def start_frontend(self, n: int) -> ServerProcess:
        """`serve --no-worker` without an upload-rate limit (the tests send uploads in bursts)."""
        state_dir, log = self.root / f"fe-{n}", self.root / f"fe-{n}.log"
        return start_server(state_dir, log, *self.args, "--no-worker", "--uploads-per-minute", "0")

    def start_worker(self, name: str) -> WorkerProcess:
        log, state_dir = self.root / f"{name}.log", str(self.root / name)
        return start_worker(name, log, *self.args, "--state-dir", state_dir, "--lease-s", str(self.lease_s))


@contextmanager
def scale_cluster(
    root: Path, url: str, frontends: int = 1, workers: int = 2, lease_s: float = LEASE_S
) -> Iterator[Cluster]:
    """Migrate the database, start the processes (at once: each start is mostly loading the FM), and
    stop them all at the end, killed ones included."""
    corpus = write_tiny_corpus(root / "public.txt")
    shared = root / "shared"
    args = ("--database", url, "--blob-dir", str(shared), "--public-corpus", str(corpus))
    # in process, as `fcl-server db upgrade` does it (tested in test_storage): one process start less
    c = Cluster(url, root, shared, args, State(url, upgrade=True), lease_s=lease_s)
    try:
        _start_all(c, frontends, [f"worker-{i}" for i in range(workers)])
        yield c
    finally:
        stop_all([*c.workers.values(), *c.frontends], timeout=60)
        c.state.close()


def _start_all(c: Cluster, frontends: int, workers: list[str]) -> None:
    with ThreadPoolExecutor(frontends + len(workers)) as pool:
        fes = [pool.submit(c.start_frontend, n) for n in range(frontends)]
        ws = {name: pool.submit(c.start_worker, name) for name in workers}
    # keep every process that did start, so the caller stops them, before raising what failed
    c.frontends = [f.result() for f in fes if f.exception() is None]
    c.workers = {name: f.result() for name, f in ws.items() if f.exception() is None}
    started: list[Future[ServerProcess] | Future[WorkerProcess]] = [*fes, *ws.values()]
    for f in started:
        if (exc := f.exception()) is not None:
            raise exc


def stop_all(procs: list[ServerProcess | WorkerProcess], timeout: float) -> None:
    """SIGTERM every process first, so they drain side by side, then wait for each."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        p.stop(timeout=timeout)
