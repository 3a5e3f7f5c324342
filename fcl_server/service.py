"""Domain service behind the RPCs: auth, registration, uploads, jobs, heads, metrics, status (no gRPC)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import __version__
from common.package import PackageError, PackageLimits, decode_package
from fcl_server.blobs import BlobStore
from fcl_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from fcl_server.fm_host import FMHost, FMInfo
from fcl_server.ratelimit import RateLimiter
from fcl_server.state import GLOBAL, PERSONAL, HeadVersion, Job, Principal, State

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
SERVER_VERSION = __version__


@dataclass(frozen=True)
class ServerLimits:
    max_upload_bytes: int = 64 * 1024 * 1024
    max_chunk_bytes: int = 4 * 1024 * 1024
    max_labels: int = 10_000
    max_metrics: int = 256
    uploads_per_minute: int = 60  # per client; 0 disables the limit


@dataclass(frozen=True)
class UploadHeader:
    upload_id: str
    task_key: str
    task_index: int
    fm_digest: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Receipt:
    upload_id: str
    job_id: int
    duplicate: bool
    size: int
    sha256: str


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
class StatusView:
    fm: FMInfo
    global_version: int
    num_labels: int
    queue_depth: int
    clients: list[ClientView]
    jobs: list[Job]
    uptime_s: float


class JobNotifier:
    """Wakes job watchers when any job changes state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tick = 0

    def notify(self) -> None:
        with self._cond:
            self._tick += 1
            self._cond.notify_all()

    def wait(self, last_tick: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._tick != last_tick, timeout=timeout)
            return self._tick


class FclService:
    def __init__(self, state: State, blobs: BlobStore, fm_host: FMHost, limits: ServerLimits | None = None):
        self.state = state
        self.blobs = blobs
        self.fm_host = fm_host
        self.limits = limits or ServerLimits()
        self.notifier = JobNotifier()
        self.upload_limiter = RateLimiter(self.limits.uploads_per_minute)
        self.started = time.time()

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
    def register(self, principal: Principal, client_id: str, fm_digest: str, model_spec: str) -> Registration:
        own = self._client(principal)
        if client_id and client_id != own:
            raise PermissionDenied(f"token belongs to client {own!r}, not {client_id!r}")
        self.state.touch_client(own, fm_digest=fm_digest, model_spec=model_spec[:4096])
        head = self.state.head(PERSONAL, own)
        info = self.fm_host.info
        return Registration(own, info, fm_digest == info.digest, head.version if head else 0)

    def fm_archive(self, offset: int, expected_sha: str) -> tuple[FMInfo, Path]:
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
        if not ID_RE.match(header.upload_id):
            raise InvalidArgument("upload_id must be 1-128 letters, digits, '_', '.' or '-' (e.g. a UUID)")
        if not ID_RE.match(header.task_key):
            raise InvalidArgument("task_key must be 1-128 letters, digits, '_', '.' or '-'")
        if header.task_index < 0:
            raise InvalidArgument("task_index must be >= 0")
        if not SHA_RE.match(header.sha256):
            raise InvalidArgument("sha256 must be 64 lowercase hex digits")
        if not 0 < header.size <= self.limits.max_upload_bytes:
            raise ResourceExhausted(
                f"upload size {header.size} is outside 1..{self.limits.max_upload_bytes} bytes"
            )
        if header.fm_digest != self.fm_host.info.digest:
            raise FailedPrecondition(
                "the package was built on a different FM than the server's; download the server's FM "
                "(GetFoundationModel) and retrain before uploading"
            )
        existing = self.state.find_upload(client, header.upload_id)
        if existing is None:
            wait = self.upload_limiter.try_acquire(client)  # retries of an accepted upload are free
            if wait > 0:
                raise ResourceExhausted(
                    f"client {client!r} is over {self.limits.uploads_per_minute} uploads per minute; "
                    f"retry in {wait:.0f}s"
                )
            return None
        if existing["sha256"] != header.sha256:
            raise FailedPrecondition(f"upload id {header.upload_id!r} was already used for different content")
        return Receipt(
            header.upload_id, int(existing["job_id"]), True, int(existing["size"]), existing["sha256"]
        )

    def accept_upload(
        self, principal: Principal, header: UploadHeader, tmp: Path, size: int, sha256: str
    ) -> Receipt:
        """Validate a fully received package and queue its distillation job."""
        client = self._client(principal)
        try:
            if size != header.size:
                raise InvalidArgument(f"received {size} bytes but the header announced {header.size}")
            if sha256 != header.sha256:
                raise InvalidArgument("sha256 of the received bytes does not match the header; upload again")
            self._validate_package(tmp.read_bytes())
            self.blobs.put_file(tmp, sha256)
        finally:
            tmp.unlink(missing_ok=True)
        job_id, duplicate = self.state.add_upload_and_job(
            client, header.upload_id, header.task_key, header.task_index, size, sha256
        )
        self.state.touch_client(client)
        self.notifier.notify()
        return Receipt(header.upload_id, job_id, duplicate, size, sha256)

    def _validate_package(self, data: bytes) -> None:
        limits = PackageLimits(max_bytes=self.limits.max_upload_bytes, max_labels=self.limits.max_labels)
        try:
            pkg = decode_package(data, limits)
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
    def job(self, principal: Principal, job_id: int) -> Job:
        job = self.state.job(job_id)
        if job is None or (not principal.is_admin and job.client_id != principal.name):
            raise NotFound(f"no job {job_id} for this caller")
        return job

    def head(
        self, principal: Principal, scope: str, client_id: str, version: int
    ) -> tuple[HeadVersion, Path]:
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
        return found, self.blobs.path(found.blob)

    def report_metrics(
        self, principal: Principal, task_key: str, task_index: int, values: dict[str, float]
    ) -> int:
        client = self._client(principal)
        if len(values) > self.limits.max_metrics:
            raise InvalidArgument(f"at most {self.limits.max_metrics} metrics per report")
        for name, value in values.items():
            if not ID_RE.match(name.replace("/", "_")) or value != value:
                raise InvalidArgument(
                    f"metric {name!r}={value} is invalid: use a short name and a finite number"
                )
        self.state.touch_client(client)
        return self.state.put_metrics(client, task_key, task_index, values)

    def status(self, principal: Principal, max_jobs: int) -> StatusView:
        if not principal.is_admin:
            raise PermissionDenied("GetStatus needs an admin token (fcl-server enroll --admin NAME)")
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
            self.state.jobs(max_jobs or 100),
            time.time() - self.started,
        )
