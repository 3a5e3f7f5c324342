"""A distillation worker process (`fcl-server worker`): state, blobs, FM host and one worker; no gRPC.

Several workers and front-ends (`fcl-server serve --no-worker`) share one PostgreSQL database and one
blob dir. A worker claims jobs under a lease that its heartbeat renews (fcl_server.worker); jobs run
one at a time across all workers, in job order, so each is applied to G exactly once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.fm import FoundationModel
from fcl_server.app import ServerConfig, default_public_corpus, open_state
from fcl_server.blobs import BlobStore
from fcl_server.fm_host import FMHost, bind_fm, read_public_corpus
from fcl_server.service import JobNotifier
from fcl_server.state import State
from fcl_server.worker import DistillationWorker, default_worker_id

log = logging.getLogger(__name__)
# on PostgreSQL a worker hears of new jobs and finished global steps (LISTEN/NOTIFY); it also polls,
# often enough to pick up the next global step while another worker personalises should a notification
# be lost (a query on an index, a few per second per worker)
POLL_S = 0.2


@dataclass
class RunningWorker:
    worker: DistillationWorker
    state: State
    blobs: BlobStore

    def stop(self, timeout: float = 120.0) -> None:
        """Interrupt the running job (re-queued, never half-applied), then close the database."""
        if not self.worker.stop(timeout=timeout):
            log.warning("the worker did not stop in time; its job goes back to the queue when the lease ends")
        self.blobs.close()
        self.state.close()


def create_worker(
    config: ServerConfig, worker_id: str | None = None, fm: FoundationModel | None = None
) -> RunningWorker:
    """Start a worker on the config's database and blob dir; it runs until stop()."""
    config.state_dir.mkdir(parents=True, exist_ok=True)  # the FM's public-feature cache lives here
    state = open_state(config.state_dir, config.database)
    blobs = BlobStore((config.blob_dir or config.state_dir) / "blobs")
    try:
        blobs.bind(state.set_kv_once)
    except BaseException:
        state.close()
        raise
    blobs.clear_temp()
    fm = fm or config.load_fm()
    try:
        bind_fm(state, fm)
    except BaseException:
        state.close()
        raise
    corpus = read_public_corpus(config.public_corpus or default_public_corpus())
    fm_host = FMHost(fm, state, blobs, corpus, config.state_dir / "cache")
    notifier = JobNotifier()
    state.listen_jobs(notifier.notify)  # on SQLite nothing tells the worker: it polls every POLL_S
    worker = DistillationWorker(
        state,
        blobs,
        fm_host,
        config.obod,
        notifier,
        config.device,
        nice=config.worker_nice,
        worker_id=worker_id or default_worker_id("worker"),
        lease_s=config.lease_s,
        poll_s=POLL_S,
        abstention=config.abstention,
    )
    worker.start()
    log.info("fcl-server worker %s on %s, FM %s %s", worker.worker_id, state.url, fm.name, fm.digest[:12])
    return RunningWorker(worker, state, blobs)
