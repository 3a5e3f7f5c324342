"""`fcl-client agent`: learn a task-stream directory as it grows, for as long as the process runs.

One loop: look at the stream directory (stream_watch), admit complete folders to the ledger (a new
folder: the next task; changed content: a new round of that folder), learn every admitted task with
the same ClientRunner as `fcl-client run` (its checkpoint resumes a task where it stopped), and fetch
the personalised head whenever the server has a newer one. Server failures are waited out with capped
exponential backoff; SIGTERM/SIGINT stop the loop at the next safe point and the process exits 0.
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from common.datasets.records import DataFormatError
from common.datasets.streams import Task
from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.agent_metrics import AgentMetrics
from fcl_client.checkpoint import Step
from fcl_client.connection import Connection, StreamEnded, TransferError
from fcl_client.learner import Learner
from fcl_client.ledger import FolderRecord, Ledger, LedgerEntry, LedgerStore, read_task_folder
from fcl_client.progress import Bars, ProgressFn
from fcl_client.runner import ClientConfig, ClientRunner
from fcl_client.stream_watch import (
    TASK_FILES,
    Seen,
    complete_folders,
    fingerprint,
    folder_name_problem,
    new_examples,
    observe,
    round_task_name,
    scan_stream,
)

log = logging.getLogger(__name__)
# gRPC codes a later attempt may not see: the agent waits and tries again; any other code stops it
UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
RETRY_CODES = UNAVAILABLE_CODES | {
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}

AGENT_CALL_RETRIES = 3  # retries of a call inside the Connection before the loop backs off


@dataclass(frozen=True)
class AgentOptions:
    poll_s: float = 10.0  # between looks at the stream directory and at the server's head version
    settle_s: float = 30.0  # a folder without READY is complete once unchanged this long
    backoff_s: float = 1.0  # first pause after a failure; doubles per failure in a row
    backoff_max_s: float = 60.0


class Stopping(Exception):
    """The agent was told to stop: the current step is abandoned (its checkpoint resumes it)."""


class AgentError(RuntimeError):
    """The work dir or stream cannot be used by the agent; the message says why and what to do."""


def classify(exc: BaseException) -> tuple[str, bool]:
    """(error kind for the metrics, whether waiting and trying again may help)."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNAVAILABLE
        if code in UNAVAILABLE_CODES:
            return "server_unavailable", True
        return ("server_error", True) if code in RETRY_CODES else ("fatal", False)
    if isinstance(exc, StreamEnded):
        return "server_unavailable", True
    if isinstance(exc, TransferError):
        return "transfer", True
    if isinstance(exc, TimeoutError):  # (an OSError) a job not final within the watch's limit
        return "job_timeout", True
    if isinstance(exc, OSError):
        return "io", True
    return "fatal", False


def backoff_delays(first: float, cap: float, rng: random.Random | None = None) -> Iterator[float]:
    """first, 2·first, 4·first ... capped at `cap`, each jittered down by up to a quarter."""
    rng = rng or random.Random()
    delay = first
    while True:
        yield delay * rng.uniform(0.75, 1.0)
        delay = min(cap, delay * 2)


@dataclass
class ConnectionHooks:
    state: Callable[[str], None] = lambda _: None
    uploaded: Callable[[pb.UploadReceipt], None] = lambda _: None
    registered: Callable[[pb.RegisterResponse], None] = lambda _: None


class AgentConnection(Connection):
    """A Connection that tells the agent what it is doing (its state, accepted uploads, head versions)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = ConnectionHooks()

    def register(self, client_id: str, fm_digest: str, model_spec_json: str = "") -> pb.RegisterResponse:
        reply = super().register(client_id, fm_digest, model_spec_json)
        self.hooks.registered(reply)
        return reply

    def upload(
        self,
        data: bytes,
        upload_id: str,
        task_key: str,
        task_index: int,
        fm_digest: str,
        progress: Callable[[int, int], None] | None = None,
        fresh: bool = False,
    ) -> pb.UploadReceipt:
        self.hooks.state("uploading")
        log.info("uploading %s (%d bytes, upload %s)", task_key, len(data), upload_id)
        receipt = super().upload(data, upload_id, task_key, task_index, fm_digest, progress, fresh)
        self.hooks.uploaded(receipt)
        return receipt

    def watch_job(
        self, job_id: int, on_event: Callable[[pb.JobEvent], None] | None = None, timeout: float = 3600.0
    ) -> pb.JobEvent:
        self.hooks.state("waiting_for_job")
        return super().watch_job(job_id, on_event, timeout)

    def get_knowledge(
        self, scope: pb.HeadScope.ValueType = pb.HEAD_SCOPE_PERSONAL, version: int = 0, client_id: str = ""
    ) -> tuple[pb.KnowledgeHeader, bytes]:
        self.hooks.state("downloading_head")
        return super().get_knowledge(scope, version, client_id)


_BAR_STATES = {"training": "training", "FM features": "encoding", "uploading": "uploading"}


class StopBars(Bars):
    """Progress callbacks that also report the agent's state and stop a long step when told to."""

    def __init__(self, inner: Bars, on_state: Callable[[str], None], check_stop: Callable[[], None]) -> None:
        super().__init__(inner.enabled, inner.stream, inner.refresh_s)
        self.on_state = on_state
        self.check_stop = check_stop

    @contextmanager
    def bar(self, desc: str, unit: str = "it", data: bool = False) -> Iterator[ProgressFn]:
        state = next((s for prefix, s in _BAR_STATES.items() if desc.startswith(prefix)), None)
        if state is not None:
            self.on_state(state)
        with super().bar(desc, unit, data) as update:

            def checked(done: int, total: int) -> None:
                self.check_stop()  # an epoch, a batch of texts or a chunk: a safe place to stop
                update(done, total)

            yield checked


class Agent:
    """The loop of one edge agent; `run` returns the exit code (0 after a stop signal)."""

    def __init__(
        self,
        cfg: ClientConfig,
        conn: AgentConnection,
        options: AgentOptions,
        metrics: AgentMetrics,
        stop: threading.Event,
        say: Callable[[str], None] = print,
        bars: Bars | None = None,
    ) -> None:
        if cfg.stream is None:
            raise ValueError("no task stream directory configured (stream)")
        self.cfg, self.conn, self.options, self.metrics, self.stop = cfg, conn, options, metrics, stop
        self.stream: Path = cfg.stream
        self.say = say
        self.ledgers = LedgerStore(cfg.work_dir)
        self.ledger = Ledger()
        self.tasks: list[Task] = []  # the ledger's tasks, read from their copies in the work dir
        self.seen: dict[str, Seen] = {}
        self.hashed: dict[str, tuple[object, str]] = {}  # folder → (signature, fingerprint) looked at
        self.next_refresh = 0.0
        self.runner = ClientRunner(
            cfg, conn, say=say, bars=StopBars(bars or Bars(enabled=False), metrics.set_state, self.check_stop)
        )
        conn.hooks = ConnectionHooks(metrics.set_state, self._uploaded, self._registered)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        self.metrics.set_state("starting")
        try:
            self.load()
        except BaseException as exc:
            self.metrics.error("fatal", str(exc))
            self.metrics.set_state("failed")
            raise
        delays = self._delays()
        while not self.stop.is_set():
            try:
                self.cycle()
                delays = self._delays()  # a cycle that went through: the next failure starts afresh
                self.metrics.set_state("idle")
                self.stop.wait(self.options.poll_s)
            except Stopping:
                break
            except Exception as exc:
                if self.stop.is_set():
                    break  # e.g. the call the stop cancelled
                kind, retry = classify(exc)
                self.metrics.error(kind, str(exc))
                if not retry:
                    self.metrics.set_state("failed")
                    raise
                delay = next(delays)
                self.metrics.set_state("backoff")
                log.warning("%s (%s); trying again in %.1fs", _describe(exc), kind, delay)
                self.stop.wait(delay)
        self.metrics.set_state("stopped")
        self.say(f"[{self.cfg.client_id}] agent stopped: {self.runner.progress.task_index} tasks done")
        return 0

    def cycle(self) -> None:
        """One pass: admit complete folders, learn every pending task, refresh the head when due."""
        self.admit_complete_folders()
        while self.pending():
            self.check_stop()
            self._prepare()
            index = self.runner.progress.task_index
            failed = len(self.runner.progress.failed_jobs)
            self.runner.run_task(self.tasks, index)
            if len(self.runner.progress.failed_jobs) > failed:
                self.metrics.error("job_failed", f"the job of task {index} ({self.tasks[index].name}) failed")
            self._show_counts()
            self.admit_complete_folders()  # folders that arrived meanwhile come next
        if time.monotonic() >= self.next_refresh:
            self.refresh_head()
            self.next_refresh = time.monotonic() + self.options.poll_s

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopping

    def pending(self) -> bool:
        return self.runner.progress.task_index < len(self.tasks)

    # -- state on disk -----------------------------------------------------------------------------
    def load(self) -> None:
        """The ledger and the checkpoint; they must agree (a `fcl-client run` work dir has no ledger)."""
        self.ledger = self.ledgers.load()
        self.ledgers.drop_unlisted(self.ledger)
        self.tasks = [self.ledgers.read_task(e) for e in self.ledger.entries]
        progress, learner = self.runner.store.load()
        if progress.task_index > len(self.tasks):
            raise AgentError(
                f"the work dir {self.cfg.work_dir} has {progress.task_index} tasks done but its agent ledger "
                f"names {len(self.tasks)}: it was used by `fcl-client run` (or its ledger was removed); "
                "give the agent a new --work-dir"
            )
        self.runner.progress = progress
        self.metrics.set_last_upload(self.ledger.last_upload_at)
        self.metrics.set_personal_version(learner.personal_version if learner else 0)
        self._show_counts()

    def _prepare(self) -> tuple[FoundationModel, Learner]:
        fm, learner = self.runner.prepare()
        self.runner.local_fm = fm  # after a failure prepare() runs again: it need not load the FM again
        self.metrics.set_personal_version(learner.personal_version)
        return fm, learner

    def _show_counts(self) -> None:
        done = self.runner.progress.task_index
        self.metrics.set_tasks(done, len(self.tasks) - done)
        if self.runner._ready is not None:
            self.metrics.set_personal_version(self.runner._ready[1].personal_version)

    def _uploaded(self, receipt: pb.UploadReceipt) -> None:
        self.ledger.last_upload_at = time.time()
        self.ledgers.save(self.ledger)
        self.metrics.set_last_upload(self.ledger.last_upload_at)

    def _registered(self, reply: pb.RegisterResponse) -> None:
        self.metrics.server_personal_version.set(reply.personal_head_version)

    # -- the stream directory ----------------------------------------------------------------------
    def admit_complete_folders(self) -> list[LedgerEntry]:
        """Look at the stream directory; every complete folder with content not seen yet is admitted."""
        now = time.monotonic()
        self.seen = observe(self.seen, scan_stream(self.stream), now)
        admitted = []
        for name in complete_folders(self.seen, now, self.options.settle_s):
            signature = self.seen[name].scan.signature
            if name in self.hashed and self.hashed[name][0] == signature:
                continue  # looked at in this very state already
            entry = self.admit(name)
            self.hashed[name] = (signature, self.ledger.folders[name].fingerprint)
            if entry is not None:
                admitted.append(entry)
        return admitted

    def admit(self, name: str) -> LedgerEntry | None:
        """Take folder `name` as it is now: a new task, a new round of it, or nothing (same content, or
        rejected). The ledger records the outcome, so the same content is never looked at twice."""
        record = self.ledger.folders.get(name)
        if record is not None and fingerprint(self.stream / name) == record.fingerprint:
            return None  # e.g. every folder once after a restart: hashed in place, not copied
        staged = self._stage(name)  # read once: the fingerprint and the examples are of the same bytes
        try:
            digest = fingerprint(staged)
            if record is not None and record.fingerprint == digest:
                return None
            problem = folder_name_problem(name)
            if problem is not None:
                self._reject(name, digest, problem)
                return None
            try:
                current = read_task_folder(staged, name)
            except DataFormatError as exc:
                self._reject(name, digest, str(exc))
                return None
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        earlier = self.ledger.rounds(name)
        learned = [self.tasks[e.task_index] for e in earlier]
        train = new_examples(current.train, [ex for t in learned for ex in t.train])
        test = new_examples(current.test, [ex for t in learned for ex in t.test])
        if not train:
            self.ledger.folders[name] = FolderRecord(
                digest, "nothing-new", "no train example beyond those learned"
            )
            self.ledgers.save(self.ledger)
            self.say(f"[{self.cfg.client_id}] agent: folder {name} changed, but it has no new train example")
            return None
        index, round_no = len(self.tasks), len(earlier) + 1
        task = Task(round_task_name(name, round_no), train, test)
        self.ledgers.write_task(index, task)
        entry = LedgerEntry(index, name, round_no, task.name, digest, len(train), len(test), time.time())
        self.ledger.entries.append(entry)
        self.ledger.folders[name] = FolderRecord(digest, "task", task.name)
        self.ledgers.save(self.ledger)
        self.tasks.append(task)
        what = f"new folder {name}" if round_no == 1 else f"{task.name} (round {round_no} of folder {name})"
        new = "" if round_no == 1 else "new "
        self.say(
            f"[{self.cfg.client_id}] agent: {what} is task {index + 1}: "
            f"{len(train)} {new}train and {len(test)} {new}test examples"
        )
        self._show_counts()
        return entry

    def _stage(self, name: str) -> Path:
        staged = self.ledgers.root / "incoming" / name
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for file in TASK_FILES:
            with suppress(FileNotFoundError):
                shutil.copyfile(self.stream / name / file, staged / file)
        return staged

    def _reject(self, name: str, digest: str, why: str) -> None:
        self.ledger.folders[name] = FolderRecord(digest, "rejected", why[:2000])
        self.ledgers.save(self.ledger)
        self.metrics.error("bad_task", why)
        log.error("task folder %s is not taken (it is looked at again once it changes): %s", name, why)

    # -- the personalised head ---------------------------------------------------------------------
    def refresh_head(self) -> bool:
        """Install the server's personalised head when it is newer than ours; True when one was."""
        fm, learner = self._prepare()
        if self.runner.progress.step != Step.NONE:
            return False  # only between tasks: a task's own head comes with its job
        reply = self.conn.register(self.cfg.client_id, fm.digest, self.runner.spec.to_json())
        if reply.personal_head_version <= learner.personal_version:
            return False
        self.metrics.set_state("refreshing_head")
        header, data = self.conn.get_knowledge(pb.HEAD_SCOPE_PERSONAL, reply.personal_head_version)
        learner.set_personal(data, header.version)
        self.runner.store.save(self.runner.progress, learner)
        self.metrics.set_personal_version(header.version)
        self.say(
            f"[{self.cfg.client_id}] agent: personalised head v{header.version} from the server "
            f"({header.num_labels} labels)"
        )
        return True

    def _delays(self) -> Iterator[float]:
        return backoff_delays(self.options.backoff_s, self.options.backoff_max_s)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.Call):
        return f"server error {exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def run_agent(
    cfg: ClientConfig,
    options: AgentOptions,
    metrics_listen: str | None = None,
    say: Callable[[str], None] = print,
    bars: Bars | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Run the agent until a stop signal (exit 0) or an error waiting cannot mend (raised).

    The loop runs in a thread of its own; this (the main) thread only waits for it, so the signal
    handler, which runs here, never interrupts code holding a lock or writing output: it only sets
    an Event. Another thread then reports the stop and closes the channel, which cancels a call in
    flight (a job watch can last long); the loop sees it fail, finds stop set and ends.
    """
    metrics = AgentMetrics()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    # few retries inside a call (about 3 s): a longer outage is the loop's backoff, which shows in the
    # metrics and keeps admitting folders meanwhile
    conn = AgentConnection(
        cfg.server, cfg.token, timeout=cfg.timeout, tls=cfg.tls(), retries=AGENT_CALL_RETRIES
    )
    outcome: list[int | BaseException] = []

    def loop() -> None:
        try:
            agent = Agent(cfg, conn, options, metrics, stop, say, bars)
            say(
                f"[{cfg.client_id}] agent watching {cfg.stream} (every {options.poll_s:g}s; folders are "
                f"taken when READY or unchanged for {options.settle_s:g}s)"
            )
            outcome.append(agent.run())
        except BaseException as exc:
            outcome.append(exc)

    def close_on_stop() -> None:
        stop.wait()
        if received and worker.is_alive():
            name = signal.Signals(received[0]).name
            say(f"[{cfg.client_id}] agent: {name}: stopping at the next safe point")
            metrics.set_state("stopping")
        conn.close()

    previous = {s: signal.signal(s, on_signal) for s in signals}
    worker = threading.Thread(target=loop, name="agent-loop")
    closer = threading.Thread(target=close_on_stop, name="agent-stop", daemon=True)
    try:
        if metrics_listen:
            port = metrics.serve_http(metrics_listen)
            say(f"[{cfg.client_id}] agent metrics on port {port} (/metrics, /healthz)")
        worker.start()
        closer.start()
        while worker.is_alive():
            worker.join(0.5)
    finally:
        stop.set()
        if worker.ident is not None:  # (started)
            worker.join()
        if closer.is_alive():
            closer.join(timeout=5)
        metrics.stop_http()
        for s, handler in previous.items():
            signal.signal(s, handler)
    result = outcome[0] if outcome else 1
    if isinstance(result, BaseException):
        raise result
    return result
