"""The read-only admin dashboard: auth, GET only, the page, its wiring into fcl-server, a real browser."""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import ssl
from collections.abc import Iterator
from dataclasses import replace
from html import escape
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from common.config import OBODConfig
from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.tls import TLSConfigError, TLSFiles
from fcl_client.connection import Connection
from fcl_server import cli as server_cli
from fcl_server.blobs import BlobStore
from fcl_server.dashboard import DashboardServer, job_times, start_dashboard
from fcl_server.fm_host import FMHost, FMInfo
from fcl_server.service import FclService
from fcl_server.settings import ServeSettings
from fcl_server.state import JobState, State
from tests import browser
from tests.servers import inprocess_server, package_bytes, self_signed_cert

ADMIN = "fcl_admin-token"
CLIENT = "fcl_client-token"
Response = tuple[int, dict[str, str], str]
# labels are any printable Unicode: markup, quotes, right-to-left scripts, emoji, CJK
LABELS = ["<script>alert(2)</script>", "\"quoted\" & 'single'", "שלום עולם", "مرحبا", "🎉 汇率 (rate)?"]


def request(
    port: int,
    method: str = "GET",
    path: str = "/",
    token: str | None = None,
    https: ssl.SSLContext | None = None,
) -> Response:
    """(status, headers, body) of one HTTP request to the dashboard."""
    if https is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, context=https)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def populated_state(path: Path) -> State:
    """Two clients; jobs done (edge-1, task 0), failed (edge-2), queued (edge-1, task 1); 2 tasks metrics."""
    state = State(path / "state.sqlite3")
    state.add_token(ADMIN, "ops", True)
    state.add_token(CLIENT, "edge-1", False)
    for client in ("edge-1", "edge-2"):
        state.touch_client(client)
    state.add_upload_and_job("edge-1", "u1", "task-00", 0, 100, "a" * 64)
    done = state.claim_next_job()
    assert done is not None
    state.complete_job(done, "b" * 64, "c" * 64, len(LABELS), LABELS, None)
    state.add_upload_and_job("edge-2", "u2", "task-00", 0, 100, "d" * 64)
    failed = state.claim_next_job()
    assert failed is not None
    state.fail_job(failed.job_id, "<script>alert(1)</script> invalid package")
    state.add_upload_and_job("edge-1", "u3", "task-01", 1, 100, "e" * 64)
    state.worker_heartbeat("w<script>", "node-a", 41, job_id=3)  # a name to escape
    state.worker_heartbeat("serve@node-b", "node-b", 7)
    state.put_metrics("edge-1", "task-00", 0, {"small_acc": 0.8, "personal_acc": 0.9})
    state.put_metrics("edge-1", "task-01", 1, {"small_acc": 0.7, "personal_acc": 0.85, "bytes_up": 4.5e5})
    return state


@pytest.fixture
def service(tmp_path: Path) -> Iterator[FclService]:
    """The real domain service over a populated state; the FM host is a stand-in (status needs its info)."""
    state = populated_state(tmp_path)
    fm_host = cast(FMHost, SimpleNamespace(info=FMInfo("tiny-fm", "f" * 64, 8, "0" * 64, 0)))
    yield FclService(state, BlobStore(tmp_path / "blobs"), fm_host)
    state.close()


@pytest.fixture
def dashboard(service: FclService) -> Iterator[DashboardServer]:
    running = start_dashboard(service, "127.0.0.1:0")
    yield running
    running.stop()


def test_dashboard_requires_an_admin_token(dashboard: DashboardServer, service: FclService) -> None:
    status, headers, body = request(dashboard.port)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and "?token=" in body
    assert request(dashboard.port, token="fcl_wrong")[0] == 401
    assert request(dashboard.port, path="/?token=fcl_wrong")[0] == 401
    assert request(dashboard.port, token=CLIENT)[0] == 403  # a valid client token is not an admin token
    assert request(dashboard.port, path="/nowhere")[0] == 401  # nothing is revealed before auth
    assert request(dashboard.port, token=ADMIN)[0] == 200
    assert request(dashboard.port, path=f"/?token={ADMIN}")[0] == 200
    assert request(dashboard.port, path="/nowhere", token=ADMIN)[0] == 404
    service.state.revoke_tokens("ops")
    assert request(dashboard.port, token=ADMIN)[0] == 401


def test_dashboard_is_read_only(dashboard: DashboardServer, service: FclService) -> None:
    before = [tuple(r) for r in service.state.clients()]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = request(dashboard.port, method, token=ADMIN)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    status, headers, body = request(dashboard.port, "HEAD", token=ADMIN)
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 1000
    assert request(dashboard.port, token=ADMIN)[0] == 200
    assert [tuple(r) for r in service.state.clients()] == before  # reading touches no client


def test_page_shows_clients_queue_jobs_heads_and_curves(dashboard: DashboardServer) -> None:
    status, headers, body = request(dashboard.port, token=ADMIN)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    page = browser.Elements(body)
    text = "".join(page.text)
    assert [a["data-client"] for a in page.all("tr") if "data-client" in a] == ["edge-1", "edge-2"]
    assert "#3 queued" in text  # edge-1's queue
    assert {a["id"]: a["data-state"] for a in page.all("tr") if a.get("id", "").startswith("job-")} == {
        "job-1": "done",
        "job-2": "failed",
        "job-3": "queued",
    }
    assert "g1 / p1" in text and "<script>" not in body and "&lt;script&gt;alert(1)" in body
    assert page.by_id("head-global-server") and page.by_id("head-personal-edge-1")
    assert not page.by_id("head-personal-edge-2")  # its only job failed
    assert page.by_id("accuracy-chart") is not None
    series = {a["data-series"]: a["points"] for a in page.all("polyline", **{"class": "series"})}
    assert set(series) == {"edge-1 · personal_acc", "edge-1 · small_acc"}  # bytes_up is not an accuracy
    assert all(len(points.split()) == 2 for points in series.values())
    assert "small_acc 70.0%" in text and "bytes_up 450 kB" in text  # edge-1's last metrics, formatted
    assert page.by_id("workers") is not None
    rows = [a["id"] for a in page.all("tr") if a.get("id", "").startswith("worker-")]
    assert sorted(rows) == ["worker-serve@node-b", "worker-w<script>"]  # attributes unescaped by the parser
    assert "w<script>" not in body and "w&lt;script&gt;" in body
    assert "#3" in text and "idle" in text and "node-a" in text


def test_page_lists_the_labels_escaped(dashboard: DashboardServer) -> None:
    _, _, body = request(dashboard.port, token=ADMIN)
    page = browser.Elements(body)
    assert "<script>alert(2)" not in body and "&lt;script&gt;alert(2)&lt;/script&gt;" in body
    assert "&quot;quoted&quot; &amp; &#x27;single&#x27;" in body
    for label in LABELS:  # in registry order, each isolated in its own <bdi> (right-to-left names too)
        assert f"<li><bdi>{escape(label)}</bdi></li>" in body, label
    items = re.findall(r"<li><bdi>(.*?)</bdi></li>", body)
    assert items == [escape(y) for y in LABELS]
    assert page.by_id("labels") is not None and f"Labels ({len(LABELS)}," in "".join(page.text)


def test_empty_server_page(tmp_path: Path) -> None:
    state = State(tmp_path / "empty.sqlite3")
    state.add_token(ADMIN, "ops", True)
    fm_host = cast(FMHost, SimpleNamespace(info=FMInfo("tiny-fm", "f" * 64, 8, "0" * 64, 0)))
    running = start_dashboard(FclService(state, BlobStore(tmp_path / "blobs"), fm_host), "127.0.0.1:0")
    try:
        status, _, body = request(running.port, token=ADMIN)
    finally:
        running.stop()
        state.close()
    assert status == 200 and 'id="accuracy-chart-empty"' in body and "no client has called" in body
    assert "no distillation worker has reported" in body


def test_job_times(service: FclService) -> None:
    jobs = {j.job_id: j for j in service.state.jobs()}
    now = jobs[3].created + 5.0
    assert job_times(jobs[3], now) == (pytest.approx(5.0), None)  # queued: waiting so far, never ran
    waited, ran = job_times(jobs[1], now)
    assert waited == pytest.approx(jobs[1].started - jobs[1].created)
    assert ran == pytest.approx(jobs[1].finished - jobs[1].started)
    running = replace(jobs[1], state=JobState.RUNNING, finished=0.0)
    assert job_times(running, running.started + 2.0)[1] == pytest.approx(2.0)
    superseded = replace(jobs[3], state=JobState.SUPERSEDED, finished=jobs[3].created + 1.0)
    assert job_times(superseded, now) == (pytest.approx(1.0), None)


def test_plaintext_only_on_loopback_unless_insecure(service: FclService) -> None:
    with pytest.raises(TLSConfigError, match="--insecure"):
        start_dashboard(service, "0.0.0.0:0")
    start_dashboard(service, "0.0.0.0:0", insecure=True).stop()


def test_dashboard_over_https(service: FclService, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    running = start_dashboard(service, "0.0.0.0:0", TLSFiles(cert, key))
    try:
        assert running.scheme == "https"
        context = ssl.create_default_context(cafile=str(cert))
        assert request(running.port, token=ADMIN, https=context)[0] == 200
        with pytest.raises(http.client.RemoteDisconnected):
            request(running.port, token=ADMIN)  # plain HTTP to the HTTPS port gets nothing
    finally:
        running.stop()


def test_serve_flag_reaches_the_server_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Any] = []

    def fake_create_server(config: Any) -> Any:
        seen.append(config)
        raise OSError("stop here")

    monkeypatch.setattr(server_cli, "create_server", fake_create_server)
    argv = ["serve", "--state-dir", str(tmp_path), "--dashboard-listen", "127.0.0.1:0"]
    with contextlib.redirect_stderr(io.StringIO()):
        assert server_cli.main(argv) == 2
    assert seen[0].dashboard_listen == "127.0.0.1:0"
    assert ServeSettings(state_dir=tmp_path).server_config().dashboard_listen is None  # off by default
    with pytest.raises(ValueError, match="HOST:PORT"):
        ServeSettings(state_dir=tmp_path, dashboard_listen="8080")


def _token(state_dir: Path, name: str, admin: bool = False) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            server_cli.main(["enroll", "--state-dir", str(state_dir), name] + (["--admin"] if admin else []))
            == 0
        )
    return out.getvalue().strip()


def test_served_and_stopped_with_the_grpc_server(tmp_path: Path, fm: FoundationModel) -> None:
    running = inprocess_server(tmp_path, fm, dashboard_listen="127.0.0.1:0")
    assert running.dashboard is not None
    port = running.dashboard.port
    try:
        with Connection(f"127.0.0.1:{running.port}", _token(running.state_dir, "edge-9")) as conn:
            conn.register("edge-9", fm.digest)
            conn.report_metrics("task-00", 0, {"small_acc": 0.5})
        status, _, body = request(port, token=_token(running.state_dir, "ops", admin=True))
        assert status == 200 and 'data-client="edge-9"' in body and 'data-series="edge-9 · small_acc"' in body
    finally:
        running.stop(grace=1)
    with pytest.raises(ConnectionRefusedError):
        request(port)


@pytest.mark.browser
@browser.needs_chromium
def test_dashboard_in_a_real_browser(tmp_path: Path, fm: FoundationModel) -> None:
    """A client registers, uploads two tasks and reports metrics; headless Chromium renders the page."""
    fast = OBODConfig(epochs=1, min_steps=5, personal_epochs=0)
    running = inprocess_server(tmp_path, fm, dashboard_listen="127.0.0.1:0", obod=fast)
    assert running.dashboard is not None
    try:
        with Connection(f"127.0.0.1:{running.port}", _token(running.state_dir, "edge-1")) as conn:
            conn.register("edge-1", fm.digest)
            labels = ["open_door", "close_door", "ring_bell", "play_music", "stop_music"]
            for index, (acc_small, acc_personal) in enumerate(((0.81, 0.92), (0.74, 0.88))):
                data = package_bytes(fm, labels[: 3 + 2 * index])
                receipt = conn.upload(data, f"upload-{index}", f"task-0{index}", index, fm.digest)
                event = conn.watch_job(receipt.job_id, timeout=300)
                assert event.state == pb.JOB_STATE_DONE, event.message
                metrics = {"small_acc": acc_small, "personal_acc": acc_personal, "bytes_up": float(len(data))}
                conn.report_metrics(f"task-0{index}", index, metrics)
        with Connection(f"127.0.0.1:{running.port}", _token(running.state_dir, "edge-2")) as conn:
            conn.register("edge-2", fm.digest)
            conn.report_metrics("task-00", 0, {"small_acc": 0.66, "personal_acc": 0.79})
        url = (
            f"http://127.0.0.1:{running.dashboard.port}/?token={_token(running.state_dir, 'ops', admin=True)}"
        )
        dom = browser.dump_dom(url, tmp_path / "profile")
        shot = browser.screenshot(url, tmp_path / "dashboard.png", tmp_path / "profile")
    finally:
        running.stop(grace=1)
    page = browser.Elements(dom)
    assert page.by_id("client-edge-1") and page.by_id("client-edge-2")
    assert page.all("tr", id="job-1", **{"data-state": "done"}) and page.all("tr", id="job-2")
    assert re.search(r'id="head-personal-edge-1".*?>v2</td>', dom)  # its second distillation's head
    assert len(page.all("polyline", **{"class": "series"})) == 4 and page.by_id("accuracy-chart")
    size, spread = browser.image_stats(shot)
    assert size == browser.WINDOW and spread > 10.0, (size, spread)
    browser.keep_screenshot(shot, "dashboard.png")
