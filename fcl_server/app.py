"""Assemble the server: state, blobs, FM host, domain service, worker, gRPC (with health and reflection).

gRPC is served by grpc.aio on an event loop in its own thread: an open stream holds no thread, so
idle or slow callers cannot take the server from others; blocking domain work runs on a thread pool
of `max_workers`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.config import AbstentionConfig, OBODConfig
from common.fm import DEFAULT_FM, FoundationModel, default_device
from common.fm_encoding import EncodingOverrides, FMDtype, PoolingMode
from common.fm_options import fm_dtype_field, fm_max_length_field, fm_pooling_field, fm_prompt_field
from common.settings import host_port
from common.stubs.fcl.v1 import fcl_pb2, fcl_pb2_grpc
from common.tls import TLSConfigError, TLSFiles, is_loopback
from fcl_server.blobs import BlobStore
from fcl_server.classify import MAX_CALLS as MAX_CLASSIFY_CALLS
from fcl_server.dashboard import DashboardServer, start_dashboard
from fcl_server.database import database_url
from fcl_server.fm_host import FMHost, bind_fm, read_public_corpus
from fcl_server.interceptor import AdmissionInterceptor, ObservingInterceptor
from fcl_server.metrics import ServerMetrics
from fcl_server.service import WATCH_POLL_S, FclService, ServerLimits
from fcl_server.servicer import FclServicer
from fcl_server.state import DEFAULT_LEASE_S, State
from fcl_server.streams import StreamLimits
from fcl_server.worker import DistillationWorker, default_worker_id

log = logging.getLogger(__name__)
SERVICE_NAME = fcl_pb2.DESCRIPTOR.services_by_name["FclService"].full_name


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_dir: Path
    # repr=False: the URL may hold a password (fcl_server.database.mask shows it safely)
    database: str | None = Field(None, repr=False, description="database URL (default: SQLite in state_dir)")
    listen: str = "127.0.0.1:50051"
    blob_dir: Path | None = Field(
        None,
        description="blobs and unfinished uploads live here; a shared filesystem lets several front-ends "
        "and workers use one (default: state_dir)",
    )
    worker: bool = Field(True, description="run a distillation worker in this process (False: a front-end)")
    lease_s: float = Field(
        DEFAULT_LEASE_S, gt=1, description="a claimed job is the worker's this long after its last heartbeat"
    )
    watch_fallback_s: float = Field(
        15.0,
        gt=0,
        description="on PostgreSQL, where job changes wake WatchJob (LISTEN/NOTIFY), it also re-reads its "
        "job this often; on SQLite it polls every second",
    )
    fm: str = DEFAULT_FM
    fm_pooling: PoolingMode | None = fm_pooling_field()
    fm_max_length: int | None = fm_max_length_field()
    fm_prompt: str | None = fm_prompt_field()
    fm_dtype: FMDtype = fm_dtype_field()
    public_corpus: Path | None = Field(None, description="unlabeled text, one sentence per line")
    device: str = Field(default_factory=default_device)
    max_workers: int = Field(32, ge=2, description="threads doing the calls' work (database, files) at once")
    max_watchers: int | None = Field(
        None, ge=1, description="open WatchJob streams at most (default: half of max_workers)"
    )
    stream_idle_s: float = Field(
        60.0,
        gt=0,
        description="a stream on which no message moves for this long is ended (DEADLINE_EXCEEDED)",
    )
    max_streams_per_client: int = Field(
        8, ge=1, description="streams one authenticated client may hold at once"
    )
    max_anonymous_streams: int = Field(
        64, ge=1, description="health Watch and reflection streams (no token needed) open at once, in total"
    )
    worker_nice: int = Field(10, ge=0, le=19, description="niceness added to the distillation worker")
    worker_yield_s: float = Field(5.0, ge=0, description="most a job pauses for in-flight uploads")
    obod: OBODConfig = Field(default_factory=OBODConfig)
    # thresholds of G and each P_c, calibrated on the statistics bank (docs/abstention.md)
    abstention: AbstentionConfig = Field(default_factory=AbstentionConfig)
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
    max_classify_calls: int = Field(
        MAX_CLASSIFY_CALLS,
        ge=1,
        description="Classify calls admitted at once: one encodes, the others wait for it (no thread held)",
    )

    @field_validator("metrics_listen", "dashboard_listen")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        return None if value is None else host_port(value)

    def fm_overrides(self) -> EncodingOverrides:
        return EncodingOverrides.of(self.fm_pooling, self.fm_max_length, self.fm_prompt)

    def load_fm(self) -> FoundationModel:
        """The FM this server serves, with its encoding options."""
        return FoundationModel(
            self.fm, device=self.device, overrides=self.fm_overrides(), dtype=self.fm_dtype
        )

    def watchers(self) -> int:
        return self.max_watchers or max(1, self.max_workers // 2)

    def streams(self) -> StreamLimits:
        return StreamLimits(self.stream_idle_s, self.max_streams_per_client, self.max_anonymous_streams)

    def tls(self) -> TLSFiles:
        return TLSFiles(self.tls_cert, self.tls_key, self.tls_client_ca)

    def check_transport(self) -> None:
        """Plaintext is only for loopback unless the operator says --insecure explicitly."""
        if not self.tls().enabled and not is_loopback(self.listen) and not self.insecure:
            raise TLSConfigError(
                f"refusing to serve {self.listen} without TLS: pass --tls-cert/--tls-key, "
                "or --insecure to accept plaintext on a non-loopback address"
            )


T = TypeVar("T")

# HTTP/2 and keepalive settings, chosen rather than inherited (docs/operations.md, "Serving model")
CONNECTION_OPTIONS: list[tuple[str, int]] = [
    # per connection: clients in one process share one, so 200 of them bursting at once need 200; the
    # bounds per caller are the stream caps and the thread pool
    ("grpc.max_concurrent_streams", 1024),
    ("grpc.max_connection_idle_ms", 5 * 60_000),  # a connection with no call for 5 min is closed
    ("grpc.max_connection_age_ms", 60 * 60_000),  # each connection is renewed hourly ...
    ("grpc.max_connection_age_grace_ms", 10 * 60_000),  # ... letting its calls (a 64 MB upload) finish
    ("grpc.keepalive_time_ms", 60_000),  # ping an idle connection each minute: dead peers are dropped
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # clients ping at most this often
    ("grpc.http2.max_ping_strikes", 2),  # then GOAWAY
]


class EventLoopThread:
    """An asyncio event loop running in a daemon thread; sync code submits coroutines to it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    service: FclService
    worker: DistillationWorker
    health: health.aio.HealthServicer
    state: State
    state_dir: Path
    metrics: ServerMetrics
    loop: EventLoopThread
    executor: futures.ThreadPoolExecutor
    metrics_port: int | None = None  # bound port of /metrics; None when it is not served
    dashboard: DashboardServer | None = None  # its .port is the bound port; None when it is not served

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting calls, let in-flight ones finish, finish the running job, close the database."""
        self.loop.run(self._stop_grpc(grace))
        self.loop.close()
        self.executor.shutdown(wait=True)
        self.service.close()
        if not self.worker.stop(timeout=120):
            log.warning("distillation worker did not stop in time; its job is re-queued at the next start")
        if self.dashboard is not None:
            self.dashboard.stop()
        self.metrics.stop_http()
        self.service.blobs.close()
        self.state.close()

    async def _stop_grpc(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


@dataclass
class _Grpc:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer


async def _start_grpc(
    config: ServerConfig,
    service: FclService,
    metrics: ServerMetrics,
    executor: futures.Executor,
    credentials: grpc.ServerCredentials | None,
) -> _Grpc:
    """Build, bind and start the aio server on the running loop (its servicers bind to that loop)."""
    streams = config.streams()
    server = grpc.aio.server(
        interceptors=[ObservingInterceptor(metrics), AdmissionInterceptor(streams)],
        # gRPC's default 4 MiB receive cap counts protobuf framing, so it refused a chunk of exactly
        # max_chunk_bytes and pre-empted the servicer's own, clearer "chunk over N bytes" error
        options=[
            ("grpc.max_receive_message_length", service.limits.max_chunk_bytes + 64 * 1024),
            *CONNECTION_OPTIONS,
        ],
    )
    fcl_pb2_grpc.add_FclServiceServicer_to_server(FclServicer(service, executor, streams), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if credentials is not None:
            port = server.add_secure_port(config.listen, credentials)
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError:  # grpc.aio raises where the sync server returned 0
        port = 0
    if port == 0:
        raise OSError(f"could not bind {config.listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return _Grpc(server, port, health_servicer)


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
    state_dir.mkdir(parents=True, exist_ok=True)  # caches live here even when the database is elsewhere
    state = open_state(state_dir, config.database)
    blobs = BlobStore((config.blob_dir or state_dir) / "blobs")
    try:
        blobs.bind(state.set_kv_once)
    except BaseException:
        state.close()
        raise
    dropped = blobs.clear_temp()
    worker_id = default_worker_id("serve")
    requeued = state.requeue_running(worker_id) if config.worker else 0
    if dropped or requeued:
        log.info("recovery: dropped %d partial blobs, re-queued %d interrupted jobs", dropped, requeued)
    fm = fm or config.load_fm()
    try:
        bind_fm(state, fm)
    except BaseException:
        state.close()
        raise
    corpus = read_public_corpus(config.public_corpus or default_public_corpus())
    fm_host = FMHost(fm, state, blobs, corpus, state_dir / "cache")
    limits = ServerLimits(
        max_upload_bytes=config.max_upload_bytes,
        uploads_per_minute=config.uploads_per_minute,
        upload_mb_per_hour=config.upload_mb_per_hour,
        max_watchers=config.watchers(),
        watch_poll_s=config.watch_fallback_s if state.pushes_job_events else WATCH_POLL_S,
        client_quota_mb=config.client_quota_mb,
        max_metric_rows=config.max_metric_rows,
        max_classify_calls=config.max_classify_calls,
    )
    service = FclService(state, blobs, fm_host, limits)
    state.listen_jobs(service.notifier.notify)  # other processes' job changes wake watchers and the worker
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
        worker_id=worker_id,
        lease_s=config.lease_s,
        abstention=config.abstention,
    )
    metrics.watch_state(state, lambda: worker.busy)

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
    loop = EventLoopThread("fcl-grpc")
    executor = futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="fcl-rpc")
    try:
        grpc_server = loop.run(_start_grpc(config, service, metrics, executor, credentials))
    except BaseException:
        loop.close()
        executor.shutdown()
        if dashboard is not None:
            dashboard.stop()
        metrics.stop_http()
        state.close()
        raise
    if config.worker:
        worker.start()
    port = grpc_server.port
    log.info("fcl-server listening on %s (port %d), FM %s %s", config.listen, port, fm.name, fm.digest[:12])
    log.info("state database: %s", state.url)
    return RunningServer(
        grpc_server.server,
        port,
        service,
        worker,
        grpc_server.health,
        state,
        state_dir,
        metrics,
        loop,
        executor,
        metrics_port,
        dashboard,
    )
