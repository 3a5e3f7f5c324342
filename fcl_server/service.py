"""Domain service behind the RPCs: auth, registration, uploads, jobs, heads, metrics, status (no gRPC)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import __version__
from common import wire_limits as wire
from common.package import PackageError, PackageLimits, validate_package_file
from common.wire_limits import ID_RE as ID_RE  # re-exported (fcl_server.cli)
from common.wire_limits import SHA_RE, quoted
from fcl_server.blobs import BlobStore
from fcl_server.classify import MAX_CALLS as MAX_CLASSIFY_CALLS
from fcl_server.classify import Classifier
from fcl_server.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from fcl_server.fm_host import FMHost, FMInfo
from fcl_server.job_events import EVERY_JOB, JobChange
from fcl_server.partials import PartialMeta, PartialUploads, PartialWriter
from fcl_server.ratelimit import ByteQuota, RateLimiter
from fcl_server.state import GLOBAL, PERSONAL, HeadVersion, Job, Principal, State

log = logging.getLogger(__name__)
SERVER_VERSION = __version__
HELPER_THREADS = 4  # uploads validated at once off their handler threads (one holds the GIL at a time)
# a metric row's stored size at most, for the client's storage quota: client_id, task_key (128 chars
# each), name (64), three numbers and SQLite's row and index overhead
METRIC_ROW_BYTES = 512
MIB = 1024 * 1024
WATCH_POLL_S = 1.0  # how often a watch re-reads its job where nothing else tells it of changes (SQLite)
_ID_RULE = f"1-{wire.ID_MAX_CHARS} letters, digits, '_', '.' or '-', starting with a letter or digit"


def check_id(field: str, value: str, example: str = "", optional: bool = False) -> None:
    """An id field (client_id, upload_id, task_key) is 1-128 safe chars (empty too when `optional`)."""
    if optional and not value:
        return
    if not ID_RE.match(value):
        raise InvalidArgument(f"{field} must be {_ID_RULE}{example}; got {quoted(value)}")


def check_sha256(field: str, value: str, optional: bool = False) -> None:
    if optional and not value:
        return
    if not SHA_RE.match(value):
        n = wire.SHA256_HEX_CHARS
        rule = (
            f"empty or a {n}-character lowercase hex sha256 digest"
            if optional
            else f"{n} lowercase hex digits"
        )
        raise InvalidArgument(f"{field} must be {rule}; got {quoted(value)}")


def check_range(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be >= {low} and <= {high}, not {value}")


@dataclass(frozen=True)
class ServerLimits:
    max_upload_bytes: int = 64 * 1024 * 1024
    max_chunk_bytes: int = wire.MAX_CHUNK_BYTES
    max_labels: int = wire.MAX_LABELS
    max_metrics: int = wire.MAX_METRICS
    uploads_per_minute: int = 60  # per client; 0 disables the limit
    partial_upload_ttl_s: float = 24 * 3600.0  # unfinished uploads are dropped after this long idle
    max_partial_uploads: int = 8  # per client; starting one more drops the least recently written
    upload_mb_per_hour: int = 1024  # MiB uploaded per client per hour; 0 disables the limit
    # a WatchJob stream holds a gRPC worker thread while it waits: past max_watchers open streams a new
    # one answers once and ends (the client polls again), and each ends after watch_slice_s, so waiting
    # clients can never take every thread from the calls that do work
    max_watchers: int = 16
    watch_slice_s: float = 30.0
    # a watch re-reads its job this often when nothing woke it: job changes in this process wake it at
    # once, and so do other processes' on PostgreSQL (LISTEN/NOTIFY, where this is only a fallback)
    watch_poll_s: float = WATCH_POLL_S
    # what one client may make the server store: its accepted packages, its unfinished uploads (their
    # declared sizes) and its metric rows (METRIC_ROW_BYTES each), in MiB; 0 disables the quota
    client_quota_mb: int = 1024
    max_metric_rows: int = 100_000  # metric rows stored per client; 0 disables the limit
    # Classify calls admitted at once, encoding or waiting for the one encoder thread (fcl_server/classify.py)
    max_classify_calls: int = MAX_CLASSIFY_CALLS


@dataclass(frozen=True)
class UploadHeader:
    upload_id: str
    task_key: str
    task_index: int
    fm_digest: str
    size: int
    sha256: str
    offset: int = 0  # > 0: the chunks resume an earlier stream of this upload at this byte


@dataclass(frozen=True)
class Receipt:
    upload_id: str
    job_id: int
    duplicate: bool
    size: int
    sha256: str


@dataclass(frozen=True)
class UploadProgress:
    upload_id: str
    committed: int  # bytes held of an unfinished upload
    size: int
    sha256: str
    receipt: Receipt | None  # set once the upload was accepted


@dataclass(frozen=True)
class Registration:
    client_id: str
    fm: FMInfo
    fm_matches: bool
    personal_version: int


@dataclass(frozen=True)
class ClientView:
    client_id: str
    last_seen: float
    personal_version: int
    uploads: int
    last_metrics: dict[str, float]


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    job_id: int


@dataclass(frozen=True)
class StatusView:
    fm: FMInfo
    global_version: int
    num_labels: int
    queue_depth: int
    clients: list[ClientView]
    jobs: list[Job]
    uptime_s: float
    workers: list[WorkerView]


class JobNotifier:
    """Wakes the worker at any job change, and passes each change on to the watchers' bridge."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tick = 0
        self._subscribers: list[Callable[[JobChange], None]] = []

    def subscribe(self, callback: Callable[[JobChange], None]) -> None:
        """Also call `callback` (from the notifying thread) at every change: the event loop's bridge."""
        self._subscribers.append(callback)

    def notify(self, change: JobChange = EVERY_JOB) -> None:
        with self._cond:
            self._tick += 1
            self._cond.notify_all()
        for callback in self._subscribers:
            callback(change)

    def wait(self, last_tick: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._tick != last_tick, timeout=timeout)
            return self._tick


class InFlight:
    """Counts calls in progress, so background work can step aside while there are any."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        with self._cond:
            self._count += 1
        try:
            yield
        finally:
            with self._cond:
                self._count -= 1
                if not self._count:
                    self._cond.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def wait_idle(self, timeout: float) -> bool:
        """Block until none is in progress (True) or `timeout` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._count, timeout=timeout)


class FclService:
    def __init__(self, state: State, blobs: BlobStore, fm_host: FMHost, limits: ServerLimits | None = None):
        self.state = state
        self.blobs = blobs
        self.fm_host = fm_host
        self.limits = limits or ServerLimits()
        self.notifier = JobNotifier()
        self.uploads_in_flight = InFlight()  # the distillation worker yields to these
        self._watch_slots = threading.BoundedSemaphore(self.limits.max_watchers)
        # in the database, on the wall clock: one limit for a client however many front-ends it calls
        self.upload_limiter = RateLimiter(self.limits.uploads_per_minute, time.time, state)
        # validates uploads while their handler thread waits on the disk
        self._helpers = futures.ThreadPoolExecutor(HELPER_THREADS, thread_name_prefix="fcl-upload")
        # next to the blob store, under the state dir, but not in blobs/tmp (cleared at every start)
        self.partials = PartialUploads(
            blobs.root.parent / "partial-uploads",
            self.limits.partial_upload_ttl_s,
            self.limits.max_partial_uploads,
        )
        self.upload_quota = ByteQuota(self.limits.upload_mb_per_hour, time.time, state)
        self._metrics_lock = threading.Lock()  # ReportMetrics: a client's quota check and insert at once
        self.classifier = Classifier(state, blobs, fm_host, self.limits.max_classify_calls)
        self.started = time.time()

    def close(self) -> None:
        """Release the helper threads (after the gRPC server stopped: no upload is finishing)."""
        self._helpers.shutdown(wait=True)
        self.classifier.close()

    # -- auth -----------------------------------------------------------------------------------
    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
        principal = self.state.principal_for(token)
        if principal is None:
            raise Unauthenticated("unknown or revoked token; ask the operator for one (fcl-server enroll)")
        return principal

    def _client(self, principal: Principal) -> str:
        if principal.is_admin:
            raise PermissionDenied("this call is for clients; an admin token has no client identity")
        return principal.name

    # -- registration and FM ----------------------------------------------------------------------
    def register(
        self, principal: Principal, client_id: str, fm_digest: str, model_spec: str, client_version: str = ""
    ) -> Registration:
        own = self._client(principal)
        check_id("client_id", client_id, optional=True)
        if client_id and client_id != own:
            raise PermissionDenied(f"token belongs to client {own!r}, not {client_id!r}")
        check_sha256("fm_digest", fm_digest, optional=True)
        if len(client_version) > wire.CLIENT_VERSION_MAX_CHARS:
            raise InvalidArgument(
                f"client_version is {len(client_version)} chars, over the limit of "
                f"{wire.CLIENT_VERSION_MAX_CHARS}; send a short version string: {quoted(client_version)}"
            )
        spec_bytes = len(model_spec.encode())
        if spec_bytes > wire.MODEL_SPEC_JSON_MAX_BYTES:
            raise InvalidArgument(
                f"model_spec_json is {spec_bytes} bytes, over the limit of {wire.MODEL_SPEC_JSON_MAX_BYTES}; "
                "send the small-model spec only (it is informational)"
            )
        self.state.touch_client(own, fm_digest=fm_digest, model_spec=model_spec)
        head = self.state.head(PERSONAL, own)
        info = self.fm_host.info
        return Registration(own, info, fm_digest == info.digest, head.version if head else 0)

    def fm_archive(self, offset: int, expected_sha: str) -> tuple[FMInfo, Path]:
        check_sha256("archive_sha256", expected_sha, optional=True)
        info = self.fm_host.info
        if expected_sha and expected_sha != info.archive_blob:
            raise FailedPrecondition("the server's FM archive changed; restart the download from offset 0")
        if not 0 <= offset <= info.archive_size:
            raise InvalidArgument(f"offset {offset} is outside the archive (0..{info.archive_size})")
        return info, self.blobs.path(info.archive_blob)

    # -- uploads ----------------------------------------------------------------------------------
    def check_upload_header(self, principal: Principal, header: UploadHeader) -> Receipt | None:
        """Validate a header; returns the earlier receipt when this upload id was already accepted."""
        client = self._client(principal)
        check_id("upload_id", header.upload_id, " (e.g. a UUID)")
        check_id("task_key", header.task_key, " (e.g. task-01)")
        check_range("task_index", header.task_index, 0, wire.TASK_INDEX_MAX)
        check_sha256("sha256", header.sha256)
        check_sha256("fm_digest", header.fm_digest)
        if header.size < 1:
            raise InvalidArgument(f"upload size must be at least 1 byte, not {header.size}")
        if header.size > self.limits.max_upload_bytes:
            raise ResourceExhausted(
                f"upload size {header.size} is over the limit of {self.limits.max_upload_bytes} bytes"
            )
        if header.fm_digest != self.fm_host.info.digest:
            raise FailedPrecondition(
                "the package was built on a different FM than the server's; download the server's FM "
                "(GetFoundationModel) and retrain before uploading"
            )
        if not 0 <= header.offset <= header.size:
            raise InvalidArgument(f"offset {header.offset} is outside the package (0..{header.size})")
        existing = self.state.find_upload(client, header.upload_id)
        if existing is None:  # a retry of an accepted upload stores nothing new
            # a resume (or restart) of an unfinished upload replaces its own held bytes
            self._check_storage(client, header.size, "This upload", except_upload=header.upload_id)
            made = self._reserve_upload_id(client, header)
            try:
                self._admit_new_bytes(client, header)
            except DomainError:
                if made:  # a refused header binds nothing
                    self.state.release_upload_id(client, header.upload_id)
                raise
            return None
        self.partials.discard(client, header.upload_id)  # leftovers of a stream cut after acceptance
        if existing["sha256"] != header.sha256:
            raise FailedPrecondition(f"upload id {header.upload_id!r} was already used for different content")
        return Receipt(
            header.upload_id, int(existing["job_id"]), True, int(existing["size"]), existing["sha256"]
        )

    def _admit_new_bytes(self, client: str, header: UploadHeader) -> None:
        """A resume must continue the bytes held; a fresh start is charged to the client's limits."""
        held = self.partials.held(client, header.upload_id)
        same = held is not None and (held.meta.size, held.meta.sha256) == (header.size, header.sha256)
        if header.offset > 0 and not same:  # refused before charging: the retry from 0 pays once
            raise Aborted(
                f"the server holds no bytes of upload {header.upload_id!r} for this package; ask "
                "GetUploadStatus and resume from its committed_size (0: start over)"
            )
        if not same:
            self._admit_upload(client, header.size)  # retries of an accepted upload are free
        # else it continues an upload that was charged when its first stream began

    def _reserve_upload_id(self, client: str, header: UploadHeader) -> bool:
        """Bind the upload id to this header's bytes before any is received: a racing stream under the
        same id with other bytes is refused, so every receipt names the bytes its job uses. True when
        this header made the binding."""
        stale_before = time.time() - self.limits.partial_upload_ttl_s
        bound = self.state.reserve_upload(client, header.upload_id, header.size, header.sha256, stale_before)
        if isinstance(bound, tuple):
            size, sha256 = bound
            raise FailedPrecondition(
                f"upload id {quoted(header.upload_id)} is already being uploaded with other content "
                f"({size} bytes, sha256 {sha256[:12]}...); a new package needs a new upload id"
            )
        return bound

    def close_upload(
        self, principal: Principal, header: UploadHeader, writer: PartialWriter, accepted: bool = False
    ) -> None:
        """The stream is over: an upload not accepted of which nothing is held is unbound again (an
        accepted one's binding ended in the transaction that recorded it)."""
        writer.close()
        client = self._client(principal)
        if not accepted and self.partials.held(client, header.upload_id) is None:
            self.state.release_upload_id(client, header.upload_id)

    # -- per-client storage quota ----------------------------------------------------------------
    def storage_used(self, client: str, except_upload: str = "") -> tuple[int, int, int]:
        """Bytes the client makes the server store: (accepted packages, unfinished uploads, metric rows).

        Unfinished uploads count at their declared size (what they grow to), `except_upload` not at all.
        """
        packages, rows = self.state.client_storage(client)
        partial = 0
        for meta_file in sorted((self.partials.root / client).glob("*.json")):
            held = self.partials.held(client, meta_file.stem) if meta_file.stem != except_upload else None
            partial += held.meta.size if held is not None else 0
        return packages, partial, rows * METRIC_ROW_BYTES

    def _check_storage(self, client: str, adding: int, what: str, except_upload: str = "") -> None:
        """Refuse (RESOURCE_EXHAUSTED) what would take the client over --client-quota-mb."""
        if not self.limits.client_quota_mb:
            return
        quota = self.limits.client_quota_mb * MIB
        packages, partial, metrics = self.storage_used(client, except_upload)
        if packages + partial + metrics + adding > quota:
            raise ResourceExhausted(
                f"{what} would take client {client!r} past its storage quota of "
                f"{self.limits.client_quota_mb} MiB: it stores {packages} bytes of packages, {partial} of "
                f"unfinished uploads and {metrics} of metrics, and this adds {adding}; nothing was stored. "
                "Ask the operator for a larger --client-quota-mb"
            )

    def _admit_upload(self, client: str, size: int) -> None:
        """Charge a new upload to the client's byte quota and upload rate, or say how long to wait."""
        wait = self.upload_quota.try_acquire(client, size)
        if math.isinf(wait):
            raise ResourceExhausted(
                f"an upload of {size} bytes is larger than the whole quota of "
                f"{self.limits.upload_mb_per_hour} MiB per hour; ask the operator for a larger "
                "--upload-mb-per-hour"
            )
        if wait > 0:
            raise ResourceExhausted(
                f"client {client!r} is over its quota of {self.limits.upload_mb_per_hour} MiB uploaded per "
                f"hour; retry in {math.ceil(wait)}s"
            )
        wait = self.upload_limiter.try_acquire(client)
        if wait > 0:
            self.upload_quota.refund(client, size)  # the upload is refused, so its bytes are not spent
            raise ResourceExhausted(
                f"client {client!r} is over {self.limits.uploads_per_minute} uploads per minute; "
                f"retry in {math.ceil(wait)}s"
            )

    def accept_upload(
        self,
        principal: Principal,
        header: UploadHeader,
        tmp: Path,
        size: int,
        sha256: str,
        sync: Callable[[], None],
    ) -> Receipt:
        """Validate a fully received package, make it durable (`sync`) and queue its distillation job.

        The package is validated on a helper thread while this one waits in `sync` (an fsync, which
        releases the GIL): the disk and the CPU work at once, and both finish before the receipt.
        """
        client = self._client(principal)
        try:
            if size != header.size:
                raise InvalidArgument(f"received {size} bytes but the header announced {header.size}")
            if sha256 != header.sha256:
                raise InvalidArgument("sha256 of the received bytes does not match the header; upload again")
            validated = self._helpers.submit(self._validate_package, tmp)
            try:
                sync()
            finally:
                futures.wait([validated])
            validated.result()  # one tensor at a time: memory does not grow with the upload
            self.blobs.put_file(tmp, sha256)
        finally:
            tmp.unlink(missing_ok=True)
        job_id, duplicate = self.state.add_upload_and_job(  # also touches the client
            client, header.upload_id, header.task_key, header.task_index, size, sha256
        )
        self.notifier.notify(JobChange(job_id, queued=not duplicate))
        if duplicate:  # a stream of the same bytes got there first: name what its job uses
            kept = self.state.find_upload(client, header.upload_id)
            if kept is not None:
                size, sha256 = int(kept["size"]), str(kept["sha256"])
        return Receipt(header.upload_id, job_id, duplicate, size, sha256)

    def open_upload(self, principal: Principal, header: UploadHeader) -> PartialWriter:
        """Start receiving (offset 0) or resume (offset > 0) an upload whose header was checked."""
        meta = PartialMeta(header.size, header.sha256, header.task_key, header.task_index)
        return self.partials.open(self._client(principal), header.upload_id, meta, header.offset)

    def finish_upload(self, principal: Principal, header: UploadHeader, writer: PartialWriter) -> Receipt:
        """The stream ended: accept the upload if all its bytes are held, else keep them for a resume."""
        if writer.committed < header.size:
            raise InvalidArgument(
                f"received {writer.committed} bytes but the header announced {header.size}; the server "
                f"keeps them: send the rest with UploadHeader.offset={writer.committed}"
            )
        tmp = self.blobs.new_temp()
        writer.seal(tmp)
        digest = writer.sha256()  # hashed while received (a resumed prefix: as read back from disk)
        if digest != header.sha256 and writer.offset > 0:
            tmp.unlink(missing_ok=True)
            raise Aborted(
                "the resumed upload does not match its sha256 (the bytes held from an earlier stream "
                "were damaged); they were dropped: upload again from offset 0"
            )
        receipt = self.accept_upload(principal, header, tmp, writer.committed, digest, writer.sync)
        log.info(
            "upload %s of %s accepted: %d bytes (%d resumed from an earlier stream), job %d",
            header.upload_id,
            principal.name,
            receipt.size,
            writer.offset,
            receipt.job_id,
        )
        return receipt

    def upload_status(self, principal: Principal, upload_id: str) -> UploadProgress:
        client = self._client(principal)
        check_id("upload_id", upload_id, " (e.g. a UUID)")
        existing = self.state.find_upload(client, upload_id)
        if existing is not None:
            size, sha256 = int(existing["size"]), str(existing["sha256"])
            receipt = Receipt(upload_id, int(existing["job_id"]), True, size, sha256)
            return UploadProgress(upload_id, size, size, sha256, receipt)
        held = self.partials.held(client, upload_id)
        if held is None:
            return UploadProgress(upload_id, 0, 0, "", None)
        return UploadProgress(upload_id, held.committed, held.meta.size, held.meta.sha256, None)

    def _validate_package(self, path: Path) -> None:
        limits = PackageLimits(max_bytes=self.limits.max_upload_bytes, max_labels=self.limits.max_labels)
        try:
            pkg = validate_package_file(path, limits)
        except PackageError as exc:
            raise InvalidArgument(f"invalid knowledge package: {exc}") from exc
        if pkg.kind != "small":
            raise InvalidArgument("uploads must be small-model packages (kind 'small')")
        if pkg.feature_dim != self.fm_host.info.feature_dim:
            raise InvalidArgument(
                f"package feature_dim {pkg.feature_dim} differs from the FM's {self.fm_host.info.feature_dim}"
            )
        if pkg.fm_digest != self.fm_host.info.digest:
            raise FailedPrecondition("the package names a different FM digest than the server's")

    # -- jobs, heads, metrics, status ---------------------------------------------------------------
    @contextmanager
    def watch_slot(self) -> Iterator[float]:
        """Seconds a WatchJob stream may stay open now: 0 when every slot is taken (answer once, end)."""
        if not self._watch_slots.acquire(blocking=False):
            yield 0.0
            return
        try:
            yield self.limits.watch_slice_s
        finally:
            self._watch_slots.release()

    def job(self, principal: Principal, job_id: int) -> Job:
        job = self.state.job(job_id)
        if job is None or (not principal.is_admin and job.client_id != principal.name):
            raise NotFound(f"no job {job_id} for this caller")
        return job

    def head(
        self, principal: Principal, scope: str, client_id: str, version: int
    ) -> tuple[HeadVersion, Path]:
        check_id("client_id", client_id, optional=True)
        if version < 0:
            raise InvalidArgument(f"version must be >= 0 (0: the latest), not {version}")
        if scope == GLOBAL:
            if not principal.is_admin:
                raise PermissionDenied("the global head is readable with an admin token only")
            owner = ""
        else:
            owner = client_id or principal.name
            if owner != principal.name and not principal.is_admin:
                raise PermissionDenied("a client can read only its own personalised head")
        found = self.state.head(scope, owner, version)
        if found is None:
            which = f"version {version}" if version else "any version"
            raise NotFound(
                f"no {scope} head ({which}) yet for {owner or 'the server'}; upload knowledge first"
            )
        if version and not self.blobs.exists(found.blob) and self.state.collected({found.blob}):
            raise NotFound(
                f"{scope} head version {version} was deleted by `fcl-server gc` (its history row stays); "
                "ask for a newer version, or 0 for the latest"
            )
        return found, self.blobs.path(found.blob)

    def report_metrics(
        self, principal: Principal, task_key: str, task_index: int, values: dict[str, float]
    ) -> int:
        client = self._client(principal)
        check_id("task_key", task_key, " (e.g. task-01)")
        check_range("task_index", task_index, 0, wire.TASK_INDEX_MAX)
        if len(values) > self.limits.max_metrics:
            raise InvalidArgument(f"at most {self.limits.max_metrics} metrics per report, not {len(values)}")
        for name, value in values.items():
            if not wire.METRIC_NAME_RE.match(name):
                raise InvalidArgument(
                    f"metric name {quoted(name)} is invalid: use a short name of "
                    f"1-{wire.METRIC_NAME_MAX_CHARS} letters, digits, '_', '.', '-' or '/', starting with a "
                    "letter or digit"
                )
            if not math.isfinite(value):
                raise InvalidArgument(f"metric {name!r} is {value}: each value must be a finite number")
        with self._metrics_lock:  # the quota check and the insert are one step per client
            self._check_metric_quota(client, task_index, values)
            self.state.touch_client(client)
            return self.state.put_metrics(client, task_key, task_index, values)

    def _check_metric_quota(self, client: str, task_index: int, values: dict[str, float]) -> None:
        """Refuse a report whose new rows would pass --max-metric-rows or the storage quota."""
        # a row is (client, task_index, name): a repeated report replaces it
        rows, stored = self.state.metric_rows(client, task_index)
        new_rows = len(values.keys() - stored)
        if not new_rows:
            return
        cap = self.limits.max_metric_rows
        if cap and rows + new_rows > cap:
            raise ResourceExhausted(
                f"client {client!r} stores {rows} metric rows, the most allowed is {cap}, and this report "
                f"adds {new_rows}; report fewer metrics, or ask the operator for a larger --max-metric-rows"
            )
        self._check_storage(client, new_rows * METRIC_ROW_BYTES, "This report")

    def status(self, principal: Principal, max_jobs: int) -> StatusView:
        if not principal.is_admin:
            raise PermissionDenied("GetStatus needs an admin token (fcl-server enroll --admin NAME)")
        check_range("max_jobs", max_jobs, 0, wire.MAX_STATUS_JOBS)
        clients = []
        for row in self.state.clients():
            head = self.state.head(PERSONAL, row["client_id"])
            clients.append(
                ClientView(
                    row["client_id"],
                    float(row["last_seen"]),
                    head.version if head else 0,
                    int(row["uploads"]),
                    self.state.last_metrics(row["client_id"]),
                )
            )
        global_head = self.state.head(GLOBAL, "")
        return StatusView(
            self.fm_host.info,
            global_head.version if global_head else 0,
            self.state.label_count(),
            self.state.queue_depth(),
            clients,
            self.state.jobs(max_jobs or wire.DEFAULT_STATUS_JOBS),
            time.time() - self.started,
            [
                WorkerView(
                    r["worker_id"],
                    r["host"],
                    int(r["pid"]),
                    float(r["started"]),
                    float(r["heartbeat"]),
                    int(r["job_id"]),
                )
                for r in self.state.workers()
            ],
        )
