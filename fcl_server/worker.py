"""The distillation worker: takes queued jobs strictly one at a time, FIFO, and runs OBOD on each."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import torch

from common.algorithms.abstention import Threshold, calibrate_on_stats
from common.algorithms.obod import (
    Cancelled,
    Head,
    Teacher,
    global_step,
    personalise,
    synthesise,
    undescribed_labels,
)
from common.algorithms.stats import StatsBank
from common.config import AbstentionConfig, OBODConfig
from common.logs import fields
from common.package import KnowledgePackage, decode_package, decode_stats, encode_package, encode_stats
from fcl_server.blobs import BlobStore
from fcl_server.errors import Unavailable
from fcl_server.fm_host import FMHost
from fcl_server.job_events import JobChange
from fcl_server.service import InFlight, JobNotifier
from fcl_server.state import DEFAULT_LEASE_S, GLOBAL, Job, JobState, LeaseLost, State

log = logging.getLogger(__name__)
JobObserver = Callable[[str, float], None]  # (outcome: done | failed | interrupted, seconds)


def lower_thread_priority(nice: int) -> bool:
    """Make the calling thread (and threads it starts later) yield the CPU to RPC threads; Linux only.

    Distillation is background work: when uploads arrive in a burst they should get the cores, and the
    worker catches up when they are idle. False where the OS has no per-thread niceness.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        log.warning("could not lower the distillation worker's priority: %s", exc)
        return False
    return True


class DistillationWorker:
    """One thread; order is part of the algorithm, so jobs never run concurrently on the heads."""

    def __init__(
        self,
        state: State,
        blobs: BlobStore,
        fm_host: FMHost,
        cfg: OBODConfig,
        notifier: JobNotifier,
        device: str = "cpu",
        observe: JobObserver | None = None,
        nice: int = 0,
        yield_to: InFlight | None = None,
        max_yield_s: float = 0.0,
        worker_id: str = "",
        lease_s: float = DEFAULT_LEASE_S,
        poll_s: float = 1.0,
        abstention: AbstentionConfig | None = None,
    ) -> None:
        self.state, self.blobs, self.fm_host, self.cfg = state, blobs, fm_host, cfg
        self.abstention = abstention or AbstentionConfig()
        self.nice = nice
        # uploads are waited on by clients, a job only by the queue: the job pauses between steps while
        # uploads are in flight, for at most max_yield_s in all, so a busy server still distils
        self.yield_to, self.max_yield_s = yield_to, max_yield_s
        self.yielded_s = 0.0  # in the running job
        self.notifier = notifier
        self.observe = observe
        self.device = torch.device(device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="obod-worker", daemon=True)
        self.busy = False
        # jobs are claimed under a lease that a heartbeat renews; a worker that dies loses it, and
        # another worker (or this one, restarted) runs the job again
        self.worker_id = worker_id or default_worker_id("serve")
        # an idle worker looks at the queue this often; its own server's uploads also wake it at once
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.job_id = 0  # the running job, 0 when idle
        self._lost = threading.Event()  # the running job's lease was taken back
        # a job given up while still this worker's (database away, shutdown): put back at the next
        # write, so the queue need not wait out its lease (the next global step would wait for it)
        self._abandoned: Job | None = None
        # held while job_id changes: a beat renews the job it read before, which may have ended (and the
        # next one begun) meanwhile; a failed renewal may then drop no run but that job's
        self._running = threading.Lock()
        self._beat = threading.Thread(target=self._heartbeat, name="obod-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._beat.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Interrupt the running job (it is re-queued, never half-applied) and stop; False if not in time."""
        self._stop.set()
        self.notifier.notify()
        if not self._thread.is_alive():  # never started (a front-end), or already stopped
            return True
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped and self._beat.is_alive():
            self._beat.join(timeout=10)
            self._drop_self()
        return stopped

    def _drop_self(self) -> None:
        try:
            self.state.drop_worker(self.worker_id)
        except Exception as exc:  # the database may be gone at shutdown; the row then just ages out
            log.warning("could not drop worker %s from the database: %s", self.worker_id, exc)

    def _heartbeat(self) -> None:
        """Every lease_s/3: tell the database this worker lives, and renew the running job's lease."""
        while True:
            job_id = self.job_id
            try:
                self._renew(job_id)
                self.state.worker_heartbeat(self.worker_id, socket.gethostname(), os.getpid(), job_id)
            except Exception as exc:  # a database blip: the next beat tries again, within the lease
                log.warning("worker heartbeat failed: %s", exc)
            if self._stop.wait(self.lease_s / 3) and not self._thread.is_alive():
                return

    def _renew(self, job_id: int) -> None:
        """Renew the lease on `job_id` (0: none); lost, it drops that job's run if it is still running."""
        if not job_id or self.state.renew_lease(job_id, self.worker_id, self.lease_s):
            return
        with self._running:
            if self.job_id != job_id:
                return  # it ended while the beat was on its way (its lease with it): nothing is lost
            self._lost.set()
        log.warning("job %d: lease lost to another worker; dropping this run", job_id)

    def _loop(self) -> None:
        # before any torch op here: the intra-op threads this thread starts inherit its priority
        lower_thread_priority(self.nice)
        # U is needed by every job: compute (or load) it now, while clients are still training
        self.fm_host.public_features()
        tick, outage = 0, 0.0
        while not self._stop.is_set():
            try:
                self._release_abandoned()
                job = self.state.claim_next_job(self.worker_id, self.lease_s)
            except Unavailable as exc:  # the database is away: wait for it, growing the pause to 10 s
                outage = min(10.0, max(0.5, 2 * outage))
                log.warning("worker %s: %s; trying again in %.1f s", self.worker_id, exc, outage)
                self._stop.wait(outage)
                continue
            outage = 0.0
            if job is None:
                tick = self.notifier.wait(tick, timeout=self.poll_s)
                continue
            with self._running:
                self.busy, self.job_id = True, job.job_id
                self._lost.clear()
            try:
                self.run_job(job)
            finally:
                with self._running:
                    self.busy, self.job_id = False, 0
                self.notifier.notify(JobChange(job.job_id))
        self._release_at_exit()

    def _release_abandoned(self) -> None:
        """Put the job this worker gave up back in the queue, if it still holds that claim of it (one
        taken back meanwhile, even by this worker again, is left alone). Unavailable: try again later."""
        job = self._abandoned
        if job is None:
            return
        if self.state.requeue_job(job.job_id, self.worker_id, job.attempts):
            log.info("job %d (client %s, %s) re-queued", job.job_id, job.client_id, job.task_key)
        self._abandoned = None

    def _release_at_exit(self) -> None:
        job = self._abandoned
        if job is None:
            return
        try:
            self._release_abandoned()
        except Exception as exc:  # the database is away at shutdown: the job's lease runs out instead
            log.warning("could not re-queue job %d (%s); it runs again once its lease ends", job.job_id, exc)

    def run_job(self, job: Job) -> None:
        """Run one job; logs exactly one INFO (or ERROR) line with its outcome and duration."""
        started = time.perf_counter()
        log.debug("job %d (client %s, %s) running", job.job_id, job.client_id, job.task_key)
        try:
            versions = self._distill(job)
        except Unavailable as exc:  # nothing was applied; the job is re-queued once the database is back
            self._abandoned = job
            self._finished(job, "interrupted", started, f"stopped after {{s}}: {exc}")
            return
        except (Cancelled, LeaseLost) as exc:
            if self._lost.is_set() or isinstance(exc, LeaseLost):
                if not self._lost.is_set():
                    # G moved on under it (`fcl-server rollback` published a version meanwhile), or the
                    # claim went to another worker: put it back at its place at once if it is still this
                    # worker's claim, so it runs again from the live G (requeue_job checks the claim)
                    self._abandoned = job
                self._finished(job, "lost", started, f"dropped after {{s}}: {exc or 'lease lost'}")
                return
            self._abandoned = job  # re-queued as the worker stops
            self._finished(
                job, "interrupted", started, "interrupted by shutdown; re-queued for the next start (ran {s})"
            )
            return
        except Exception as exc:  # a bad job must not stop the worker; it is recorded as failed
            self._fail(job, exc)
            self._finished(
                job, "failed", started, f"failed after {{s}}: {type(exc).__name__}: {exc}", exc_info=True
            )
            return
        self._finished(
            job, "done", started, f"done in {{s}}: global v{versions[0]}, personal v{versions[1]}", versions
        )

    def _fail(self, job: Job, exc: Exception) -> None:
        try:
            self.state.fail_job(job.job_id, f"{type(exc).__name__}: {exc}", self.worker_id)
        except Unavailable:  # its failure cannot be recorded now: it is re-queued, and runs again
            self._abandoned = job

    def _finished(
        self,
        job: Job,
        outcome: str,
        started: float,
        what: str,  # what happened; "{s}" becomes the duration
        versions: tuple[int, int] = (0, 0),
        exc_info: bool = False,
    ) -> None:
        seconds = time.perf_counter() - started
        if self.observe is not None:
            self.observe(outcome, seconds)
        log.log(
            logging.ERROR if outcome == "failed" else logging.INFO,
            "job %d (client %s, %s) %s",
            job.job_id,
            job.client_id,
            job.task_key,
            what.replace("{s}", f"{seconds:.2f}s")
            + (f" ({self.yielded_s:.2f}s of it paused for uploads)" if self.yielded_s >= 0.01 else ""),
            exc_info=exc_info,
            extra=fields(
                event="job",
                job_id=job.job_id,
                client_id=job.client_id,
                task_key=job.task_key,
                outcome=outcome,
                duration_ms=round(seconds * 1000, 1),
                yielded_ms=round(self.yielded_s * 1000, 1),
                global_version=versions[0] or None,
                personal_version=versions[1] or None,
            ),
        )

    def _checkpoint(self) -> bool:
        """Between optimizer steps: step aside while uploads are in flight; True to stop the job."""
        uploads = self.yield_to
        while uploads is not None and uploads.count and self.yielded_s < self.max_yield_s:
            if self._stop.is_set():
                break
            started = time.perf_counter()
            uploads.wait_idle(min(0.1, self.max_yield_s - self.yielded_s))
            self.yielded_s += time.perf_counter() - started
        return self._stop.is_set() or self._lost.is_set()

    def _distill(self, job: Job) -> tuple[int, int]:
        """The job's global step (RUNNING), then its personal step; a job claimed while PERSONALIZING
        (its worker stopped after publishing G) gets the personal step only, on the G it published."""
        self.yielded_s = 0.0
        self._checkpoint()
        pkg = decode_package(self.blobs.read(job.blob))
        teacher = Teacher.from_package(pkg, self.device)
        public = self.fm_host.public_features()
        seed, cancel = job.job_id, self._checkpoint
        if job.state is JobState.RUNNING:
            current, based_on = self._global_head()
            step = global_step(current, self._bank(), teacher, pkg.stats, public, self.cfg, seed, cancel)
            head, bank, synth = step.global_head, step.bank, step.synth
            head.abstention = self._threshold(head, bank, seed)
            digest = self.fm_host.info.digest
            g_blob = self.blobs.put_bytes(encode_package(_head_package(head, digest)))
            bank_blob = self.blobs.put_bytes(encode_stats(bank)) if bank.stats else None
            known = set(current.labels) if current else set()
            new_labels = [y for y in head.labels if y not in known]
            version = self.state.complete_global(
                job, g_blob, len(head.labels), new_labels, bank_blob, self.worker_id, based_on
            )
        else:
            version = job.global_version
            head = self._head_at(version)
            bank = decode_stats(self.blobs.read(job.bank_blob)) if job.bank_blob else self._empty_bank()
            synth = synthesise(teacher, undescribed_labels(teacher, pkg.stats), public, self.cfg, seed)
        # from here on the next upload's global step may run on another worker
        personal = personalise(head, teacher, public, bank, self.cfg, seed, cancel, synth)
        personal.abstention = self._threshold(personal, bank, seed + 1)
        p_blob = self.blobs.put_bytes(encode_package(_head_package(personal, self.fm_host.info.digest)))
        return version, self.state.complete_personal(job, p_blob, len(personal.labels), self.worker_id)

    def _threshold(self, head: Head, bank: StatsBank, seed: int) -> Threshold | None:
        """The head's abstention threshold on fresh pseudo-features of the bank (the server holds no
        held-out data); None where abstention is off or the bank describes none of its labels."""
        if not self.abstention.enabled:
            return None
        cfg = self.abstention
        return calibrate_on_stats(head.model, head.labels, bank, cfg.stats_coverage, cfg.score, seed=seed)

    def _head_at(self, version: int) -> Head:
        found = self.state.head(GLOBAL, "", version)
        if found is None:
            raise RuntimeError(f"global head v{version} is missing from the database")
        pkg = decode_package(self.blobs.read(found.blob))
        return Head(pkg.build().to(self.device), pkg.labels)

    def _empty_bank(self) -> StatsBank:
        return StatsBank(self.fm_host.info.feature_dim)

    def _global_head(self) -> tuple[Head | None, int]:
        """G as the database has it now, and its version (0: none yet)."""
        found = self.state.head(GLOBAL, "")
        if found is None:
            return None, 0
        pkg = decode_package(self.blobs.read(found.blob))
        return Head(pkg.build().to(self.device), pkg.labels), found.version

    def _bank(self) -> StatsBank:
        blob = self.state.get_kv("stats_bank")
        if blob is None:
            return StatsBank(self.fm_host.info.feature_dim)
        return decode_stats(self.blobs.read(blob))


def _head_package(head: Head, fm_digest: str) -> KnowledgePackage:
    return KnowledgePackage.from_model(
        head.model.cpu(), head.labels, fm_digest, kind="head", abstention=head.abstention
    )


def default_worker_id(role: str) -> str:
    """`serve@HOST` for the worker of an all-in-one server (a restart recognises its own jobs);
    `worker@HOST:PID` for a worker process."""
    host = socket.gethostname() or "localhost"
    return f"serve@{host}" if role == "serve" else f"{role}@{host}:{os.getpid()}"
