"""Assemble the server: state, blobs, FM host, domain service, worker, gRPC (with health and reflection)."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.config import OBODConfig
from common.fm import DEFAULT_FM, FoundationModel, default_device
from common.settings import host_port
from common.stubs.fcl.v1 import fcl_pb2, fcl_pb2_grpc
from common.tls import TLSConfigError, TLSFiles, is_loopback
from fcl_server.blobs import BlobStore
from fcl_server.dashboard import DashboardServer, start_dashboard
from fcl_server.database import database_url
from fcl_server.fm_host import FMHost, read_public_corpus
from fcl_server.interceptor import ObservingInterceptor
from fcl_server.metrics import ServerMetrics
from fcl_server.service import FclService, ServerLimits
from fcl_server.servicer import FclServicer
from fcl_server.state import State
from fcl_server.worker import DistillationWorker

log = logging.getLogger(__name__)
SERVICE_NAME = fcl_pb2.DESCRIPTOR.services_by_name["FclService"].full_name


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_dir: Path
    # repr=False: the URL may hold a password (fcl_server.database.mask shows it safely)
    database: str | None = Field(None, repr=False, description="database URL (default: SQLite in state_dir)")
    listen: str = "127.0.0.1:50051"
    fm: str = DEFAULT_FM
    public_corpus: Path | None = Field(None, description="unlabeled text, one sentence per line")
    device: str = Field(default_factory=default_device)
    max_workers: int = Field(32, ge=2, description="gRPC worker threads: calls served at once")
    max_watchers: int | None = Field(
        None, ge=1, description="open WatchJob streams at most (default: half of max_workers)"
    )
    worker_nice: int = Field(10, ge=0, le=19, description="niceness added to the distillation worker")
    worker_yield_s: float = Field(5.0, ge=0, description="most a job pauses for in-flight uploads")
    obod: OBODConfig = Field(default_factory=OBODConfig)
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    uploads_per_minute: int = Field(60, ge=0, description="per client; 0 disables the limit")
    upload_mb_per_hour: int = Field(1024, ge=0, description="MiB uploaded per client per hour; 0: no limit")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(None, description="require client certificates signed by this CA")
    insecure: bool = Field(False, description="allow plaintext on a non-loopback address")
    metrics_listen: str | None = Field(None, description="HOST:PORT of the Prometheus /metrics endpoint")
    dashboard_listen: str | None = Field(None, description="HOST:PORT of the read-only admin web dashboard")
    client_quota_mb: int = Field(
        1024,
        ge=0,
        description="MiB one client may make the server store (packages, partials, metrics); 0: no limit",
    )
    max_metric_rows: int = Field(100_000, ge=0, description="metric rows stored per client; 0: no limit")

    @field_validator("metrics_listen", "dashboard_listen")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        return None if value is None else host_port(value)

    @model_validator(mode="after")
    def _watchers_leave_threads(self) -> ServerConfig:
        if self.max_watchers is not None and self.max_watchers >= self.max_workers:
            raise ValueError(
                f"max_watchers ({self.max_watchers}) must be below max_workers ({self.max_workers}): "
                "waiting WatchJob streams would otherwise hold every thread and stall all other calls"
            )
        return self

    def watchers(self) -> int:
        return self.max_watchers or max(1, self.max_workers // 2)

    def tls(self) -> TLSFiles:
        return TLSFiles(self.tls_cert, self.tls_key, self.tls_client_ca)

    def check_transport(self) -> None:
        """Plaintext is only for loopback unless the operator says --insecure explicitly."""
        if not self.tls().enabled and not is_loopback(self.listen) and not self.insecure:
            raise TLSConfigError(
                f"refusing to serve {self.listen} without TLS: pass --tls-cert/--tls-key, "
                "or --insecure to accept plaintext on a non-loopback address"
            )


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    service: FclService
    worker: DistillationWorker
    health: health.HealthServicer
    state: State
    state_dir: Path
    metrics: ServerMetrics
    metrics_port: int | None = None  # bound port of /metrics; None when it is not served
    dashboard: DashboardServer | None = None  # its .port is the bound port; None when it is not served

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting calls, let in-flight ones finish, finish the running job, close the database."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.service.close()
        if not self.worker.stop(timeout=120):
            log.warning("distillation worker did not stop in time; its job is re-queued at the next start")
        if self.dashboard is not None:
            self.dashboard.stop()
        self.metrics.stop_http()
        self.state.close()


def default_public_corpus() -> Path:
    from common.datasets import builtin

    return builtin.public_path()


def open_state(state_dir: Path | None, database: str | None = None) -> State:
    """The server's State: `database` (a URL) when given, else the SQLite file in the state dir."""
    return State(database_url(state_dir, database))


def create_server(config: ServerConfig, fm: FoundationModel | None = None) -> RunningServer:
    """Build and start the server; returns it with the port it bound (listen on port 0 for a free one)."""
    config.check_transport()
    credentials = config.tls().server_credentials() if config.tls().enabled else None
    state_dir = config.state_dir
    state = open_state(state_dir, config.database)
    blobs = BlobStore(state_dir / "blobs")
    dropped = blobs.clear_temp()
    requeued = state.requeue_running()
    if dropped or requeued:
        log.info("recovery: dropped %d partial blobs, re-queued %d interrupted jobs", dropped, requeued)
    fm = fm or FoundationModel(config.fm, device=config.device)
    corpus = read_public_corpus(config.public_corpus or default_public_corpus())
    fm_host = FMHost(fm, state, blobs, corpus, state_dir / "cache")
    limits = ServerLimits(
        max_upload_bytes=config.max_upload_bytes,
        uploads_per_minute=config.uploads_per_minute,
        upload_mb_per_hour=config.upload_mb_per_hour,
        max_watchers=config.watchers(),
        client_quota_mb=config.client_quota_mb,
        max_metric_rows=config.max_metric_rows,
    )
    service = FclService(state, blobs, fm_host, limits)
    metrics = ServerMetrics()
    worker = DistillationWorker(
        state,
        blobs,
        fm_host,
        config.obod,
        service.notifier,
        config.device,
        observe=metrics.observe_job,
        nice=config.worker_nice,
        yield_to=service.uploads_in_flight,
        max_yield_s=config.worker_yield_s,
    )
    metrics.watch_state(state, lambda: worker.busy)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers),
        interceptors=[ObservingInterceptor(metrics)],
        # gRPC's default 4 MiB receive cap counts protobuf framing, so it refused a chunk of exactly
        # max_chunk_bytes and pre-empted the servicer's own, clearer "chunk over N bytes" error
        options=[("grpc.max_receive_message_length", limits.max_chunk_bytes + 64 * 1024)],
    )
    fcl_pb2_grpc.add_FclServiceServicer_to_server(FclServicer(service), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if credentials is not None:
        port = server.add_secure_port(config.listen, credentials)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        state.close()
        raise OSError(f"could not bind {config.listen}")
    try:
        metrics_port = metrics.serve_http(config.metrics_listen) if config.metrics_listen else None
    except OSError as exc:
        state.close()
        raise OSError(f"could not serve metrics on {config.metrics_listen}: {exc.strerror}") from exc
    try:
        listen = config.dashboard_listen
        dashboard = start_dashboard(service, listen, config.tls(), config.insecure) if listen else None
    except (OSError, ValueError):
        metrics.stop_http()
        state.close()
        raise
    server.start()
    worker.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("fcl-server listening on %s (port %d), FM %s %s", config.listen, port, fm.name, fm.digest[:12])
    log.info("state database: %s", state.url)
    return RunningServer(
        server, port, service, worker, health_servicer, state, state_dir, metrics, metrics_port, dashboard
    )
