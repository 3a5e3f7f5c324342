"""Prometheus metrics of one server: own registry, RPC and job instruments, state gauges, HTTP /metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common import __version__
from fcl_server.state import GLOBAL, PERSONAL, State, StateClosed

log = logging.getLogger(__name__)
NAMESPACE = "fcl"
# RPC latencies span sub-millisecond unary calls to minute-long transfers and job watches
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
JOB_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class ServerMetrics:
    """Every instrument of the server, registered in a registry of its own (several servers per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_handled = Counter(
            "fcl_rpc_handled",
            "RPCs completed, by method and gRPC status code",
            ["service", "method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "fcl_rpc_duration_seconds",
            "RPC handling time, by method and gRPC status code",
            ["service", "method", "code"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.rpc_in_flight = Gauge("fcl_rpc_in_flight", "RPCs being handled now", ["method"], registry=r)
        self.bytes_received = Counter(
            "fcl_rpc_received_bytes",
            "serialized request bytes (UploadKnowledge: uploads)",
            ["method"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "fcl_rpc_sent_bytes",
            "serialized response bytes (GetFoundationModel: FM downloads, GetKnowledge: head downloads)",
            ["method"],
            registry=r,
        )
        self.jobs = Counter("fcl_jobs", "distillation jobs finished, by outcome", ["outcome"], registry=r)
        self.job_seconds = Histogram(
            "fcl_job_duration_seconds",
            "distillation job run time, by outcome",
            ["outcome"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        Info("fcl_server", "server version", registry=r).info({"version": __version__})
        ProcessCollector(namespace=NAMESPACE, registry=r)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def observe_job(self, outcome: str, seconds: float) -> None:
        self.jobs.labels(outcome).inc()
        self.job_seconds.labels(outcome).observe(seconds)

    def watch_state(self, state: State, worker_busy: Callable[[], bool]) -> None:
        """Gauges read from the database at scrape time, so they are never stale or double-counted."""
        self.registry.register(StateCollector(state, worker_busy))

    def serve_http(self, address: str) -> int:
        """Serve /metrics on HOST:PORT in a daemon thread; returns the bound port (PORT 0 = any free)."""
        host, _, port = address.rpartition(":")
        self._http, self._http_thread = start_http_server(int(port), host.strip("[]"), self.registry)
        bound = int(self._http.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class StateCollector(Collector):
    def __init__(self, state: State, worker_busy: Callable[[], bool]) -> None:
        self.state = state
        self.worker_busy = worker_busy

    def describe(self) -> list[Metric]:
        return []  # unknown until collected: keeps registration from querying the database

    def collect(self) -> Iterator[Metric]:
        try:
            heads = self.state.head_summary()
            workers = self.state.workers(seen_within_s=120.0)
            values = {
                "queue_depth": ("distillation jobs waiting", self.state.queue_depth()),
                "clients_seen": ("clients that have called the server", self.state.client_count()),
                "labels": ("labels in the global label registry", self.state.label_count()),
                "worker_busy": ("1 while a distillation job runs", int(self.worker_busy())),
            }
        except StateClosed:  # database closed: the server is shutting down
            return
        for name, (doc, value) in values.items():
            yield GaugeMetricFamily(f"fcl_{name}", doc, value=value)
        live = GaugeMetricFamily(
            "fcl_worker_job", "job each distillation worker runs now (0: idle), by worker", labels=["worker"]
        )
        for row in workers:
            live.add_metric([row["worker_id"]], int(row["job_id"]))
        yield live
        version = GaugeMetricFamily("fcl_head_version", "highest published head version", labels=["scope"])
        published = GaugeMetricFamily("fcl_head_versions", "head versions published", labels=["scope"])
        for scope in (GLOBAL, PERSONAL):
            count, highest = heads.get(scope, (0, 0))
            version.add_metric([scope], highest)
            published.add_metric([scope], count)
        yield version
        yield published
