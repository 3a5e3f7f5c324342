"""The agent's Prometheus instruments and its HTTP endpoint: /metrics and /healthz (plain HTTP)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Info, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from common import __version__

# what the agent does now (fcl_client_agent_state); "backoff": waiting to try the server again
STATES = (
    "starting",
    "idle",
    "encoding",
    "training",
    "uploading",
    "waiting_for_job",
    "downloading_head",
    "refreshing_head",
    "backoff",
    "stopping",
    "stopped",
    "failed",
)
# fcl_client_agent_errors_total{kind}: a fixed set, so the label never grows without bound
ERROR_KINDS = (
    "server_unavailable",
    "server_error",
    "transfer",
    "job_failed",
    "job_timeout",
    "bad_task",
    "io",
    "fatal",
)

StartResponse = Callable[..., Any]


class AgentMetrics:
    """Every instrument of one agent, in a registry of its own (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.tasks_done = Gauge(
            "fcl_client_agent_tasks_done", "tasks of the stream learned to the end", registry=r
        )
        self.tasks_pending = Gauge(
            "fcl_client_agent_tasks_pending", "tasks admitted to the stream and not learned yet", registry=r
        )
        self.last_upload = Gauge(
            "fcl_client_agent_last_upload_timestamp_seconds",
            "unix time the server last accepted an upload of this agent (0: none yet)",
            registry=r,
        )
        self.personal_version = Gauge(
            "fcl_client_agent_personal_head_version",
            "version of the personalised FM head this agent holds (0: none yet)",
            registry=r,
        )
        self.server_personal_version = Gauge(
            "fcl_client_agent_server_personal_head_version",
            "latest version of this client's personalised head the server reported",
            registry=r,
        )
        self.errors = Counter(
            "fcl_client_agent_errors",
            "failures the agent recovered from or stopped on, by kind",
            ["kind"],
            registry=r,
        )
        for kind in ERROR_KINDS:
            self.errors.labels(kind)  # every kind is exported from the start, at 0
        self.state = Enum(
            "fcl_client_agent_state", "what the agent does now", states=list(STATES), registry=r
        )
        Info("fcl_client_agent", "client version", registry=r).info({"version": __version__})
        ProcessCollector(namespace="fcl_client_agent", registry=r)
        self.current = "starting"
        self.since = time.time()
        self.last_error = ""
        self.values: dict[str, float] = {
            "tasks_done": 0,
            "tasks_pending": 0,
            "personal_head_version": 0,
            "last_upload_timestamp": 0.0,
        }
        self._lock = threading.Lock()
        self._http: ThreadingWSGIServer | None = None

    def set_tasks(self, done: int, pending: int) -> None:
        self.tasks_done.set(done)
        self.tasks_pending.set(pending)
        self.values.update(tasks_done=done, tasks_pending=pending)

    def set_personal_version(self, version: int) -> None:
        self.personal_version.set(version)
        self.values["personal_head_version"] = version

    def set_last_upload(self, timestamp: float) -> None:
        self.last_upload.set(timestamp)
        self.values["last_upload_timestamp"] = timestamp

    def set_state(self, state: str) -> None:
        with self._lock:
            if state != self.current:
                self.current, self.since = state, time.time()
            self.state.state(state)

    def error(self, kind: str, message: str) -> None:
        self.errors.labels(kind if kind in ERROR_KINDS else "fatal").inc()
        self.last_error = f"{kind}: {message}"[:500]

    def health(self) -> tuple[int, dict[str, object]]:
        """(HTTP status, body) of /healthz: 200 while the agent runs, also while it waits for the server."""
        healthy = self.current not in ("failed", "stopped")
        body: dict[str, object] = {
            "status": "ok" if healthy else self.current,
            "state": self.current,
            "state_since": round(self.since, 3),
            **self.values,
            "last_error": self.last_error,
        }
        return (200 if healthy else 503), body

    # -- HTTP -------------------------------------------------------------------------------------
    def app(self) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
        metrics = make_wsgi_app(self.registry)

        def serve(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics(environ, start_response)
            if path == "/healthz":
                code, body = self.health()
                reason = "OK" if code == 200 else "Service Unavailable"
                start_response(f"{code} {reason}", [("Content-Type", "application/json")])
                return [json.dumps(body).encode()]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics or /healthz\n"]

        return serve

    def serve_http(self, address: str) -> int:
        """Serve /metrics and /healthz on HOST:PORT in a daemon thread; returns the port (PORT 0: any)."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._http = make_server(host, int(port), self.app(), Server, handler_class=_SilentHandler)
        threading.Thread(target=self._http.serve_forever, name="agent-metrics", daemon=True).start()
        return int(self._http.server_address[1])

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
