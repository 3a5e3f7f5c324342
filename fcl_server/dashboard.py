"""Read-only admin web dashboard (stdlib HTTP in a thread): clients, queue, jobs, heads, accuracy curves."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from common.report.svg import Series, line_chart
from common.tls import TLSConfigError, TLSFiles, is_loopback, ssl_context
from fcl_server.errors import PermissionDenied, Unauthenticated
from fcl_server.service import FclService, StatusView
from fcl_server.state import GLOBAL, PERSONAL, HeadVersion, Job, JobState, Principal, Record

log = logging.getLogger(__name__)

MAX_JOBS = 200
MAX_LABELS_SHOWN = 1000  # label names listed; a larger registry is counted
REFRESH_S = 15
PAGES = ("/", "/index.html")
ALLOWED = "GET, HEAD"
SECURITY_HEADERS: dict[str, str] = {
    # nothing outside the page itself may load (no scripts at all), and the token never leaks via Referer
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
UNAUTHENTICATED_TEXT = (
    "The fcl-server dashboard needs an admin token (fcl-server enroll --admin NAME): send the header "
    "'Authorization: Bearer TOKEN', or open /?token=TOKEN in a browser.\n"
)
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 20px auto; max-width: 1240px;
       padding: 0 16px; color: #1d2430; }
h1 { font-size: 21px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.meta { color: #5a6472; } code { background: #f2f4f7; padding: 1px 4px; border-radius: 3px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin-top: 12px; }
.card { border: 1px solid #d9dee5; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 20px; } .card span { color: #5a6472; font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d9dee5; padding: 3px 8px; text-align: left; } th { background: #f2f4f7; }
td.num { text-align: right; } .state { font-weight: 600; border-radius: 3px; padding: 0 5px; }
.state-done { color: #1a7f37; } .state-running, .state-personalizing { color: #9a6700; background: #fff8c5; }
.state-queued { color: #0550ae; } .state-failed { color: #cf222e; background: #ffebe9; }
.state-superseded { color: #6e7781; } .empty { color: #6e7781; font-style: italic; }
.chart { max-width: 100%; height: auto; }
.labels { columns: 4 220px; margin: 0; padding-left: 2.5em; font-size: 13px; }
"""


@dataclass(frozen=True)
class DashboardData:
    """Everything one page shows, read through the domain service and the state module."""

    status: StatusView
    heads: list[HeadVersion]
    metrics: list[Record]
    now: float
    labels: list[str] = field(default_factory=list)  # the registry's first MAX_LABELS_SHOWN names


def collect(service: FclService, principal: Principal, max_jobs: int = MAX_JOBS) -> DashboardData:
    """The admin status view (PermissionDenied for non-admins), latest heads and every reported metric."""
    status = service.status(principal, max_jobs)
    found = [service.state.head(GLOBAL, "")]
    found += [service.state.head(PERSONAL, c.client_id) for c in status.clients]
    heads = [h for h in found if h is not None]
    labels = service.state.label_names(MAX_LABELS_SHOWN)
    return DashboardData(status, heads, service.state.metric_history(), time.time(), labels)


# -- rendering ----------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _when(ts: float, now: float) -> str:
    if ts <= 0:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    return f"{stamp} ({_duration(max(0.0, now - ts))} ago)"


def _metric(name: str, value: float) -> str:
    if "acc" in name and 0.0 <= value <= 1.0:
        return f"{value * 100:.1f}%"
    if "bytes" in name:
        return f"{value / 1e3:,.0f} kB"
    return f"{value:.4g}"


def job_times(job: Job, now: float) -> tuple[float | None, float | None]:
    """(seconds queued, seconds running) of a job so far; None where the phase never happened."""
    if job.started > 0:
        waited: float | None = job.started - job.created
        ran: float | None = (job.finished if job.finished > 0 else now) - job.started
    elif job.state == JobState.QUEUED:
        waited, ran = now - job.created, None
    else:  # superseded (or failed) before it ever ran
        waited, ran = (job.finished - job.created if job.finished > 0 else None), None
    return waited, ran


def _cards(data: DashboardData) -> str:
    s = data.status
    running = sum(1 for j in s.jobs if j.state == JobState.RUNNING)
    cards = [
        ("clients", len(s.clients)),
        ("jobs queued", s.queue_depth),
        ("jobs running", running),
        ("global head version", s.global_version),
        ("labels", s.num_labels),
        ("uptime", _duration(s.uptime_s)),
    ]
    return (
        '<div class="cards" id="summary">'
        + "".join(
            f'<div class="card"><b>{escape(str(v))}</b><span>{escape(k)}</span></div>' for k, v in cards
        )
        + "</div>"
    )


def _clients(data: DashboardData) -> str:
    if not data.status.clients:
        return '<p class="empty">no client has called the server yet</p>'
    pending: dict[str, list[Job]] = {}
    for job in data.status.jobs:
        if not job.state.final:
            pending.setdefault(job.client_id, []).append(job)
    rows = []
    for c in data.status.clients:
        waiting = pending.get(c.client_id, [])
        queue = ", ".join(f"#{j.job_id} {j.state.value}" for j in sorted(waiting, key=lambda j: j.job_id))
        last = ", ".join(f"{escape(k)} {_metric(k, v)}" for k, v in sorted(c.last_metrics.items()))
        rows.append(
            f'<tr id="client-{escape(c.client_id)}" data-client="{escape(c.client_id)}">'
            f"<td><code>{escape(c.client_id)}</code></td><td>{_when(c.last_seen, data.now)}</td>"
            f'<td class="num">{c.uploads}</td><td>{escape(queue) or "–"}</td>'
            f'<td class="num">{c.personal_version or "–"}</td><td>{last or "–"}</td></tr>'
        )
    return (
        '<table id="clients"><thead><tr><th>client</th><th>last contact</th><th>uploads</th>'
        "<th>queued / running jobs</th><th>personal head</th><th>last reported metrics</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _jobs(data: DashboardData) -> str:
    if not data.status.jobs:
        return '<p class="empty">no upload yet, so no distillation job</p>'
    rows = []
    for job in data.status.jobs:
        waited, ran = job_times(job, data.now)
        versions = f"g{job.global_version} / p{job.personal_version}" if job.state == JobState.DONE else "–"
        rows.append(
            f'<tr id="job-{job.job_id}" data-state="{job.state.value}"><td class="num">{job.job_id}</td>'
            f"<td><code>{escape(job.client_id)}</code></td><td>{escape(job.task_key)} ({job.task_index})</td>"
            f'<td><span class="state state-{job.state.value}">{job.state.value}</span></td>'
            f"<td>{_when(job.created, data.now)}</td>"
            f'<td class="num">{_duration(waited) if waited is not None else "–"}</td>'
            f'<td class="num">{_duration(ran) if ran is not None else "–"}</td>'
            f"<td>{versions}</td><td>{escape(job.message) or ''}</td></tr>"
        )
    return (
        '<table id="jobs"><thead><tr><th>job</th><th>client</th><th>task</th><th>state</th><th>queued at</th>'
        "<th>waited</th><th>ran</th><th>heads made</th><th>message</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _workers(data: DashboardData) -> str:
    if not data.status.workers:
        return '<p class="empty">no distillation worker has reported in the last hour</p>'
    rows = "".join(
        f'<tr id="worker-{escape(w.worker_id)}"><td><code>{escape(w.worker_id)}</code></td>'
        f'<td>{escape(w.host)}</td><td class="num">{w.pid}</td><td>{_when(w.started, data.now)}</td>'
        f"<td>{_when(w.heartbeat, data.now)}</td>"
        f'<td class="num">{f"#{w.job_id}" if w.job_id else "idle"}</td></tr>'
        for w in data.status.workers
    )
    return (
        '<table id="workers"><thead><tr><th>worker</th><th>host</th><th>pid</th><th>started</th>'
        f"<th>last heartbeat</th><th>running job</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _heads(data: DashboardData) -> str:
    if not data.heads:
        return '<p class="empty">no head published yet</p>'
    rows = "".join(
        f'<tr id="head-{h.scope}-{escape(h.client_id or "server")}"><td>{h.scope}</td>'
        f'<td><code>{escape(h.client_id) or "–"}</code></td><td class="num version">v{h.version}</td>'
        f'<td class="num">{h.num_labels}</td><td class="num">#{h.job_id}</td>'
        f"<td>{_when(h.created, data.now)}</td></tr>"
        for h in data.heads
    )
    return (
        '<table id="heads"><thead><tr><th>head</th><th>client</th><th>version</th><th>labels</th>'
        f"<th>made by job</th><th>published</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _labels(data: DashboardData) -> str:
    """The label registry. Labels are any printable Unicode (common/labels.py): escaped like all text, and
    each in its own <bdi>, so a right-to-left name cannot reorder the names around it."""
    if not data.labels:
        return '<p class="empty">no label published yet</p>'
    names = "".join(f"<li><bdi>{escape(y)}</bdi></li>" for y in data.labels)
    rest = data.status.num_labels - len(data.labels)
    more = f'<p class="meta">and {rest} more (the first {len(data.labels)} are listed)</p>' if rest else ""
    return f'<ol id="labels" class="labels">{names}</ol>{more}'


def accuracy_series(metrics: list[Record]) -> list[Series]:
    """One series per (client, metric whose name contains 'acc'): x = task number (index + 1)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in metrics:
        if "acc" in row["name"].lower():
            points.setdefault(f"{row['client_id']} · {row['name']}", []).append(
                (row["task_index"] + 1, float(row["value"]))
            )
    return [Series(label, sorted(pts)) for label, pts in sorted(points.items())]


def _chart(data: DashboardData) -> str:
    svg = line_chart(
        accuracy_series(data.metrics),
        title="Accuracy reported by clients after each task",
        x_label="task",
        y_label="accuracy on the client's own test data",
        element_id="accuracy-chart",
    )
    return svg or '<p class="empty" id="accuracy-chart-empty">no accuracy reported yet (ReportMetrics)</p>'


def render_page(data: DashboardData) -> str:
    """The whole dashboard page (no scripts, no external resources; refreshes itself every REFRESH_S)."""
    fm = data.status.fm
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data.now))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<title>fcl-server dashboard</title><style>{STYLE}</style></head>
<body>
<h1>fcl-server dashboard</h1>
<p class="meta">FM <code>{escape(fm.name)}</code> ({escape(fm.digest[:12])}) · read-only ·
generated {generated} · refreshes every {REFRESH_S} s</p>
{_cards(data)}
<h2>Clients</h2>
{_clients(data)}
<h2>Distillation workers</h2>
{_workers(data)}
<h2>Distillation jobs (newest first)</h2>
{_jobs(data)}
<h2>Accuracy curves</h2>
{_chart(data)}
<h2>Head versions</h2>
{_heads(data)}
<h2>Labels ({data.status.num_labels}, in the order the global head learnt them)</h2>
{_labels(data)}
</body></html>
"""


# -- HTTP -----------------------------------------------------------------------------------------------
def request_token(headers: Any, query: str) -> str | None:
    """The bearer token of a request: 'Authorization: Bearer T' (preferred) or '?token=T' (browsers)."""
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    values = parse_qs(query).get("token")
    return values[0] if values else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: FclService, ipv6: bool) -> None:
        self.address_family = socket.AF_INET6 if ipv6 else socket.AF_INET
        self.service = service
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fcl-dashboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _not_allowed(self) -> None:
        self._send(405, "text/plain", b"the dashboard is read-only: GET only\n", {"Allow": ALLOWED})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _respond(self, send_body: bool) -> None:
        code, ctype, body, extra = self._page()
        self._send(code, ctype, body, extra, send_body)

    def _page(self) -> tuple[int, str, bytes, dict[str, str]]:
        """(status, content type, body, headers) of a GET; auth first, so a 404 tells outsiders nothing."""
        url = urlsplit(self.path)
        service = self.server.service
        try:
            principal = service.authenticate(request_token(self.headers, url.query))
            data = collect(service, principal)
        except Unauthenticated:
            auth = {"WWW-Authenticate": 'Bearer realm="fcl-server dashboard"'}
            return 401, "text/plain", UNAUTHENTICATED_TEXT.encode(), auth
        except PermissionDenied:
            return 403, "text/plain", b"this is not an admin token; the dashboard is for admins only\n", {}
        except Exception:
            log.exception("dashboard: reading the state failed")
            return 500, "text/plain", b"internal error; see the server log\n", {}
        if url.path not in PAGES:
            return 404, "text/plain", b"not found; the dashboard is at /\n", {}
        return 200, "text/html; charset=utf-8", render_page(data).encode(), {}

    def _send(
        self, code: int, ctype: str, body: bytes, extra: dict[str, str], send_body: bool = True
    ) -> None:
        self.send_response(code)
        for name, value in {**SECURITY_HEADERS, **extra, "Content-Type": ctype}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # never log the query string: it may hold the token
        log.debug("dashboard %s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: " + format, *args)


class DashboardServer:
    """The dashboard's HTTP(S) server in a daemon thread; `port` is the bound port (listen on :0 for any)."""

    def __init__(self, service: FclService, listen: str, context: ssl.SSLContext | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self._http = _Server((host.strip("[]"), int(port)), service, ipv6=host.startswith("["))
        if context is not None:
            # the handshake happens in the request's own thread, so a slow client cannot stall accept()
            self._http.socket = context.wrap_socket(
                self._http.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = int(self._http.server_address[1])
        self.scheme = "https" if context is not None else "http"
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, name="dashboard", daemon=True
        )

    def start(self) -> DashboardServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


def start_dashboard(
    service: FclService, listen: str, tls: TLSFiles | None = None, insecure: bool = False
) -> DashboardServer:
    """Serve the dashboard on HOST:PORT (HTTPS when the server has a TLS certificate).

    Like the gRPC port, plaintext HTTP on a non-loopback address needs insecure=True (--insecure): the admin
    token travels with every request.
    """
    tls = tls or TLSFiles()
    context = ssl_context(tls)
    if context is None and not is_loopback(listen) and not insecure:
        raise TLSConfigError(
            f"refusing to serve the dashboard on {listen} without TLS: pass --tls-cert/--tls-key, "
            "or --insecure to accept plaintext on a non-loopback address"
        )
    dashboard = DashboardServer(service, listen, context).start()
    host = listen.rpartition(":")[0]
    log.info("dashboard on %s://%s:%d/ (admin token required)", dashboard.scheme, host, dashboard.port)
    return dashboard
