"""`fcl-client agent`: folder detection (pure), the ledger, metrics, and a real agent against a real server.

The end-to-end test drops task folders into a running agent's stream directory one by one (one of them
grows after its first round), kills the agent with SIGKILL while it uploads, restarts it, has the server
publish a newer personalised head, and stops the agent with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from benchmarks.cluster import ServerProcess
from common.datasets.records import Example
from common.fm import FoundationModel
from common.settings import load_settings
from common.wire_limits import ID_RE
from fcl_client.agent import (
    Agent,
    AgentConnection,
    AgentError,
    AgentOptions,
    StopBars,
    Stopping,
    backoff_delays,
    classify,
)
from fcl_client.agent_metrics import AgentMetrics
from fcl_client.checkpoint import CheckpointStore, Progress
from fcl_client.connection import Connection
from fcl_client.ledger import LedgerStore
from fcl_client.progress import Bars
from fcl_client.runner import ClientConfig
from fcl_client.settings import AgentSettings
from fcl_client.stream_watch import (
    READY_FILE,
    FileStat,
    FolderScan,
    Seen,
    complete_folders,
    fingerprint,
    folder_name_problem,
    is_complete,
    new_examples,
    observe,
    round_task_name,
    scan_stream,
)
from tests.faultproxy import UP, FaultProxy
from tests.servers import accepted, enroll, serve, wait_until

CLIENT = "edge-1"


# -- folder detection: pure functions -------------------------------------------------------------------
def scan(name: str, *files: tuple[str, int, int], ready: int | None = None) -> FolderScan:
    return FolderScan(name, tuple(FileStat(*f) for f in files), ready)


def test_a_folder_is_complete_once_unchanged_for_settle_s() -> None:
    first = observe({}, {"a": scan("a", ("train.jsonl", 10, 1))}, now=100.0)
    assert not is_complete(first["a"], 100.0, settle_s=5)
    # still growing at 103: the quiet period starts again
    grown = observe(first, {"a": scan("a", ("train.jsonl", 20, 2))}, now=103.0)
    assert grown["a"].since == 103.0 and not is_complete(grown["a"], 107.0, settle_s=5)
    same = observe(grown, {"a": scan("a", ("train.jsonl", 20, 2))}, now=108.0)
    assert same["a"].since == 103.0 and is_complete(same["a"], 108.0, settle_s=5)
    # a folder that disappeared is forgotten
    assert observe(same, {}, now=109.0) == {}


def test_ready_marks_a_folder_complete_at_once_unless_a_file_changed_after_it() -> None:
    ready = observe({}, {"a": scan("a", ("train.jsonl", 10, 50), ready=60)}, now=0.0)["a"]
    assert ready.scan.marked_ready and is_complete(ready, 0.0, settle_s=1e9)
    same_tick = Seen(scan("a", ("train.jsonl", 10, 60), ready=60), 0.0)
    assert is_complete(same_tick, 0.0, settle_s=1e9), "READY written in the same clock tick counts"
    later = Seen(scan("a", ("train.jsonl", 30, 70), ("test.jsonl", 1, 40), ready=60), 0.0)
    assert not later.scan.marked_ready and not is_complete(later, 1.0, settle_s=5)
    assert is_complete(later, 5.0, settle_s=5), "once settled it is complete again"


def test_a_folder_without_a_train_file_is_never_complete() -> None:
    seen = observe(
        {}, {"a": scan("a", ("test.jsonl", 10, 1), ready=5), "b": scan("b", ("train.jsonl", 1, 1))}, 0.0
    )
    assert complete_folders(seen, now=100.0, settle_s=1) == ["b"]


def test_scan_skips_hidden_folders_and_files_and_reads_ready(tmp_path: Path) -> None:
    (tmp_path / ".incoming").mkdir()
    (tmp_path / "loose.jsonl").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").write_text("x")
    (tmp_path / "a" / READY_FILE).touch()
    found = scan_stream(tmp_path)
    assert list(found) == ["a", "b"]
    assert [f.name for f in found["a"].files] == ["train.jsonl"] and found["a"].ready_mtime_ns is not None
    assert found["b"].files == () and found["b"].ready_mtime_ns is None
    assert scan_stream(tmp_path / "missing") == {}


def test_fingerprint_follows_the_task_files_content_only(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "train.jsonl").write_text('{"text": "hi", "label": "greet"}\n')
    assert fingerprint(a) == fingerprint(b), "same data, same fingerprint (the folder name is not part)"
    before = fingerprint(a)
    os.utime(a / "train.jsonl", (1, 1))
    (a / READY_FILE).touch()
    (a / "notes.txt").write_text("not task data")
    assert fingerprint(a) == before, "times, READY and other files do not change it"
    with (a / "train.jsonl").open("a") as fh:
        fh.write('{"text": "hello", "label": "greet"}\n')
    assert fingerprint(a) != before
    grown = fingerprint(a)
    (a / "test.jsonl").write_text("")
    assert fingerprint(a) != grown, "a test file is part of the task"


def test_new_examples_is_a_multiset_difference_in_file_order() -> None:
    ex = [Example("a", "x"), Example("b", "y"), Example("a", "x"), Example("c", "x")]
    assert new_examples(ex, [Example("a", "x")]) == ex[1:]
    assert new_examples(ex, ex) == []
    assert new_examples(ex[:2], [Example("a", "y")]) == ex[:2], "same text, other label: new"


def test_round_task_names_stay_valid_task_keys() -> None:
    assert round_task_name("task-00", 1) == "task-00"
    assert round_task_name("task-00", 2) == "task-00.r2"
    long = "t" * 128
    assert ID_RE.match(round_task_name(long, 12)) and round_task_name(long, 12).endswith(".r12")
    assert folder_name_problem("task-00") is None
    assert "rename the folder" in (folder_name_problem("täsk 1") or "")


# -- admission and the ledger (no server: nothing here makes a call) -----------------------------------
def write_folder(folder: Path, train: list[str], test: list[str] | None = None, ready: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(train))
    (folder / "test.jsonl").write_text("".join(test or []))
    if ready:
        (folder / READY_FILE).touch()


def line(text: str, label: str) -> str:
    return json.dumps({"text": text, "label": label}) + "\n"


def offline_agent(tmp_path: Path) -> Agent:
    cfg = ClientConfig(
        server="127.0.0.1:1", client_id=CLIENT, token="t", stream=tmp_path / "stream",
        work_dir=tmp_path / "work", model="linear", device="cpu",
    )  # fmt: skip
    conn = AgentConnection(cfg.server, cfg.token)
    agent = Agent(cfg, conn, AgentOptions(settle_s=0), AgentMetrics(), threading.Event(), say=lambda _: None)
    agent.load()
    return agent


def test_admission_new_folder_growth_round_and_restart(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    write_folder(stream / "b", [line("b one", "lb")])
    write_folder(stream / "a", [line("a one", "la"), line("a two", "la")], [line("a test", "la")])
    agent = offline_agent(tmp_path)
    first = agent.admit_complete_folders()
    assert [(e.task_index, e.folder, e.round, e.task_name) for e in first] == [
        (0, "a", 1, "a"),
        (1, "b", 1, "b"),
    ]
    assert agent.admit_complete_folders() == [], "the same content is not taken twice"
    # a grows: only what is new becomes the next task, as a round of a
    with (stream / "a" / "train.jsonl").open("a") as fh:
        fh.write(line("a three", "la") + line("a four", "lb"))
    (grown,) = agent.admit_complete_folders()
    assert (grown.task_index, grown.folder, grown.round, grown.task_name) == (2, "a", 2, "a.r2")
    assert [ex.text for ex in agent.tasks[2].train] == ["a three", "a four"] and agent.tasks[2].test == []
    # reordered lines: a change, but nothing new to learn
    lines = (stream / "a" / "train.jsonl").read_text().splitlines(keepends=True)
    (stream / "a" / "train.jsonl").write_text("".join(reversed(lines)))
    assert agent.admit_complete_folders() == []
    assert agent.ledger.folders["a"].outcome == "nothing-new"
    # bad data is rejected (and counted) until it changes; a bad name likewise
    write_folder(stream / "c", ['{"text": "no label"}\n'])
    write_folder(stream / "bad name", [line("x", "y")])
    assert agent.admit_complete_folders() == []
    assert {k: v.outcome for k, v in agent.ledger.folders.items()}["c"] == "rejected"
    assert agent.ledger.folders["bad name"].outcome == "rejected"
    assert agent.metrics.registry.get_sample_value("fcl_client_agent_errors_total", {"kind": "bad_task"}) == 2
    write_folder(stream / "c", [line("fixed", "lc")])
    (fixed,) = agent.admit_complete_folders()
    assert fixed.task_index == 3 and fixed.folder == "c"

    # a copy left by an agent killed before its ledger write is dropped; the rest reads back the same
    store = LedgerStore(tmp_path / "work")
    store.task_dir(9).mkdir(parents=True)
    again = offline_agent(tmp_path)
    assert [t.name for t in again.tasks] == ["a", "b", "a.r2", "c"]
    assert [t.train for t in again.tasks] == [t.train for t in agent.tasks]
    assert not store.task_dir(9).exists() and not list(store.root.glob("*.tmp"))
    assert again.admit_complete_folders() == [], "a restart does not take the same content again"


def test_the_loop_backs_off_while_the_server_is_down_and_stops_with_exit_0(
    tmp_path: Path, fm: FoundationModel
) -> None:
    """Nothing listens at the server address: the agent counts, backs off, keeps admitting, never exits."""
    cfg = ClientConfig(
        server="127.0.0.1:1", client_id=CLIENT, token="t", stream=tmp_path / "stream",
        work_dir=tmp_path / "work", model="linear", device="cpu",
    )  # fmt: skip
    conn = AgentConnection(cfg.server, cfg.token, timeout=2, retries=0)
    options = AgentOptions(poll_s=0.05, settle_s=0, backoff_s=0.05, backoff_max_s=0.2)
    metrics, stop = AgentMetrics(), threading.Event()
    agent = Agent(cfg, conn, options, metrics, stop, say=lambda _: None)
    agent.runner.local_fm = fm  # the session's FM: no load in this test
    outcome: list[int] = []
    loop = threading.Thread(target=lambda: outcome.append(agent.run()))
    loop.start()
    try:
        errors = ("fcl_client_agent_errors_total", {"kind": "server_unavailable"})
        wait_until(lambda: (metrics.registry.get_sample_value(*errors) or 0) >= 3, "three failed cycles", 60)
        assert loop.is_alive() and metrics.current in ("backoff", "starting", "idle")
        write_folder(tmp_path / "stream" / "task-00", [line("a", "la")], ready=True)
        wait_until(lambda: metrics.values["tasks_pending"] == 1, "admitted during the outage", 30)
    finally:
        stop.set()
        conn.close()
        loop.join(timeout=60)
    assert outcome == [0] and metrics.current == "stopped"
    assert LedgerStore(tmp_path / "work").load().entries[0].folder == "task-00"


def test_agent_refuses_a_work_dir_of_fcl_client_run(tmp_path: Path) -> None:
    CheckpointStore(tmp_path / "work").save(Progress(task_index=2), None)
    with pytest.raises(AgentError, match="used by `fcl-client run`"):
        offline_agent(tmp_path)


class _Rpc(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "test"


def test_outages_are_retried_with_capped_backoff_and_config_errors_are_not() -> None:
    assert classify(_Rpc(grpc.StatusCode.UNAVAILABLE)) == ("server_unavailable", True)
    assert classify(_Rpc(grpc.StatusCode.RESOURCE_EXHAUSTED)) == ("server_error", True)
    assert classify(_Rpc(grpc.StatusCode.PERMISSION_DENIED)) == ("fatal", False)
    assert classify(TimeoutError()) == ("job_timeout", True)
    assert classify(ValueError()) == ("fatal", False)
    delays = backoff_delays(1.0, 8.0)
    got = [next(delays) for _ in range(7)]
    assert all(0.75 * c <= d <= c for d, c in zip(got, [1, 2, 4, 8, 8, 8, 8], strict=True)), got


def test_agent_settings_come_from_flags_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'server = "h:1"\nclient_id = "e"\nstream = "/s"\nwork_dir = "/w"\nsettle_s = 5.0\n'
        'metrics_listen = "0.0.0.0:9101"\n'
    )
    monkeypatch.setenv("FCL_POLL_S", "2.5")
    settings = load_settings(AgentSettings, {"settle_s": "7"}, config)
    assert (settings.poll_s, settings.settle_s, settings.metrics_listen) == (2.5, 7.0, "0.0.0.0:9101")
    assert settings.agent_options().poll_s == 2.5
    with pytest.raises(ValueError, match=r"HOST:PORT"):
        load_settings(AgentSettings, {"metrics_listen": "nowhere"}, config)


def test_metrics_endpoint_serves_healthz_and_metrics() -> None:
    metrics = AgentMetrics()
    port = metrics.serve_http("127.0.0.1:0")
    try:
        metrics.set_tasks(3, 1)
        metrics.set_state("training")
        metrics.error("server_unavailable", "down")
        code, body = get(port, "/healthz")
        assert code == 200 and body["state"] == "training" and body["tasks_done"] == 3
        text = get(port, "/metrics")[1]
        assert metric(text, "fcl_client_agent_tasks_done") == 3.0
        assert metric(text, 'fcl_client_agent_errors_total{kind="server_unavailable"}') == 1.0
        assert metric(text, 'fcl_client_agent_state{fcl_client_agent_state="training"}') == 1.0
        metrics.set_state("failed")
        assert get(port, "/healthz")[0] == 503
        assert get(port, "/nothing")[0] == 404
    finally:
        metrics.stop_http()


# -- helpers for real processes ---------------------------------------------------------------------
def get(port: int, path: str) -> tuple[int, object]:
    """(HTTP status, parsed JSON or text) of GET path on the agent's metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            code, data = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        code, data = err.code, err.read().decode()
    return code, (json.loads(data) if path == "/healthz" else data)


def health(port: int) -> dict[str, object]:
    body = get(port, "/healthz")[1]
    assert isinstance(body, dict)
    return body


def metric(text: object, name: str) -> float:
    assert isinstance(text, str)
    for row in text.splitlines():
        if row.startswith(name + " "):
            return float(row.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


class AgentProcess:
    def __init__(self, target: str, token: str, stream: Path, work: Path, log: Path) -> None:
        cmd = [
            sys.executable, "-m", "fcl_client.cli", "agent", "--server", target, "--client-id", CLIENT,
            "--stream", str(stream), "--work-dir", str(work), "--model", "linear", "--epochs", "2",
            "--device", "cpu", "--poll-s", "0.3", "--settle-s", "1", "--metrics-listen", "127.0.0.1:0",
            "--log-level", "INFO",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("FCL_")}
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", FCL_TOKEN=token)
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        found: list[int] = []
        wait_until(lambda: found.append(self._port()) or found[-1], f"the agent serves metrics ({log})", 120)
        self.port = found[-1]

    def _port(self) -> int:
        self.alive()
        m = re.search(r"agent metrics on port (\d+)", self.text())
        return int(m[1]) if m else 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        assert self.proc.poll() is None, f"the agent exited {self.proc.returncode}:\n{self.text()[-4000:]}"
        return True

    def done(self, n: int) -> bool:
        return self.alive() and health(self.port)["tasks_done"] == n

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[ServerProcess, FaultProxy, str, str]]:
    """A real fcl-server behind a FaultProxy; the client's and an admin's token."""
    state = tmp_path / "server"
    token, admin = enroll(state, CLIENT), enroll(state, "ops", admin=True)
    server = serve(state, tmp_path / "server.log", tmp_path)
    proxy = FaultProxy(server.port)
    try:
        yield server, proxy, token, admin
    finally:
        proxy.close()
        assert server.stop() == 0, server.log_tail()


def jsonl(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_agent_learns_a_growing_stream_survives_kill_9_mid_upload_and_follows_the_servers_head(
    tmp_path: Path, small_split: Path, running: tuple[ServerProcess, FaultProxy, str, str]
) -> None:
    server, proxy, token, admin = running
    source = small_split / "clients" / "client-0"
    # small tasks keep it quick: a slice of each built-in task folder
    train_a = jsonl(source / "task-00" / "train.jsonl")[:160]
    test_a = jsonl(source / "task-00" / "test.jsonl")[:80]
    half, half_test = len(train_a) // 2, len(test_a) // 2
    stream, work = tmp_path / "stream", tmp_path / "work"
    write_folder(stream / "task-00", train_a[:half], test_a[:half_test], ready=True)
    train_b = jsonl(source / "task-01" / "train.jsonl")[:120]
    started = time.time()
    agents: list[AgentProcess] = []
    try:
        agents.append(first := AgentProcess(proxy.target, token, stream, work, tmp_path / "agent-1.log"))
        wait_until(lambda: first.done(1), "task 1 is learned", 180)

        # a second folder, without READY (taken once settled); its upload crawls and the agent is killed in it
        proxy.rate[UP] = 100_000
        write_folder(stream / "task-01", train_b, jsonl(source / "task-01" / "test.jsonl")[:60])
        wait_until(
            lambda: first.alive() and "uploading task-01" in first.text(), "the agent uploads task-01", 180
        )
        sent = proxy.sent[UP]
        wait_until(lambda: proxy.sent[UP] > sent + 50_000, "part of the upload went through", 60)
        first.kill()
        proxy.cut_all()  # what the killed process had in flight is lost with it
        upload_id = re.findall(r"uploading task-01 \(\d+ bytes, upload (\w+)\)", first.text())[-1]
        with Connection(server.target, admin) as conn:
            assert [j.task_key for j in conn.status().jobs] == ["task-00"], (
                "killed before the upload completed"
            )
        proxy.rate[UP] = None

        agents.append(second := AgentProcess(proxy.target, token, stream, work, tmp_path / "agent-2.log"))
        wait_until(lambda: second.done(2), "the killed task is finished after the restart", 180)
        resumed = second.text().split("uploaded")[0]
        assert "trained small model" not in resumed and f"upload {upload_id}" in resumed, second.text()

        # the first folder grows: a new round of it, learning the new examples only
        with (stream / "task-00" / "train.jsonl").open("a") as fh:
            fh.write("".join(train_a[half:]))
        with (stream / "task-00" / "test.jsonl").open("a") as fh:
            fh.write("".join(test_a[half_test:]))
        (stream / "task-00" / READY_FILE).touch()
        wait_until(lambda: second.done(3), "the grown folder is learned as a new round", 180)

        # the server publishes a newer personalised head (a rollback republishes v1 as v4): the agent follows
        out = subprocess.run(
            [sys.executable, "-m", "fcl_server.cli", "rollback", "--state-dir", str(tmp_path / "server"),
             "--client", CLIENT, "--personal-version", "1", "--json"],
            capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        published = json.loads(out.stdout)["version"]
        assert published == 4
        wait_until(
            lambda: second.alive() and health(second.port)["personal_head_version"] == 4, "head v4", 60
        )
        text = get(second.port, "/metrics")[1]
        with Connection(server.target, admin) as conn:
            status = conn.status()
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=60) == 0, second.text()
    finally:
        for agent in agents:
            agent.kill()

    # no task repeated or skipped: one job per task, in order; the killed upload kept its id
    jobs = sorted(status.jobs, key=lambda j: j.job_id)
    assert [(j.task_key, j.task_index) for j in jobs] == [("task-00", 0), ("task-01", 1), ("task-00.r2", 2)]
    assert jobs[1].upload_id == upload_id and all(j.state == 3 for j in jobs)  # JOB_STATE_DONE
    size, resumed = accepted(tmp_path / "server.log")[upload_id]
    assert resumed < size, "the restarted agent sent (the rest of) the same package"
    (me,) = [c for c in status.clients if c.client_id == CLIENT]
    assert me.personal_version == 4
    records = json.loads((work / "metrics.json").read_text())
    assert [(r["task_index"], r["task"]) for r in records] == [
        (0, "task-00"),
        (1, "task-01"),
        (2, "task-00.r2"),
    ]
    ledger = LedgerStore(work).load()
    assert [(e.folder, e.round, e.train_examples) for e in ledger.entries] == [
        ("task-00", 1, half),
        ("task-01", 1, len(train_b)),
        ("task-00", 2, len(train_a) - half),
    ]
    progress, learner = CheckpointStore(work).load()
    assert progress.task_index == 3 and learner is not None and learner.personal_version == 4
    # what /metrics said before the stop
    assert metric(text, "fcl_client_agent_tasks_done") == 3
    assert metric(text, "fcl_client_agent_tasks_pending") == 0
    assert metric(text, "fcl_client_agent_personal_head_version") == 4
    assert metric(text, "fcl_client_agent_server_personal_head_version") == 4
    assert started < metric(text, "fcl_client_agent_last_upload_timestamp_seconds") <= time.time()
    assert metric(text, 'fcl_client_agent_errors_total{kind="fatal"}') == 0
    assert "agent stopped: 3 tasks done" in second.text()


@pytest.mark.slow
def test_agent_waits_out_a_server_outage_and_carries_on(
    tmp_path: Path, small_split: Path, running: tuple[ServerProcess, FaultProxy, str, str]
) -> None:
    """The server is killed while the agent idles and comes back on another port: the agent never exits."""
    server, proxy, token, _ = running
    source = small_split / "clients" / "client-1"
    stream, work = tmp_path / "stream", tmp_path / "work"
    write_folder(stream / "task-00", jsonl(source / "task-00" / "train.jsonl")[:100], ready=True)
    agent = AgentProcess(proxy.target, token, stream, work, tmp_path / "agent.log")
    try:
        wait_until(lambda: agent.done(1), "task 1 is learned", 180)
        server.kill()
        wait_until(lambda: agent.alive() and "trying again" in agent.text(), "the agent backs off", 180)
        assert health(agent.port)["state"] == "backoff"
        write_folder(stream / "task-01", jsonl(source / "task-01" / "train.jsonl")[:100])
        restarted = serve(tmp_path / "server", tmp_path / "server-2.log", tmp_path)
        server.proc, server.port = restarted.proc, restarted.port  # the fixture stops this one
        proxy.upstream_port = restarted.port
        wait_until(lambda: agent.done(2), "the agent carries on with the server back", 240)
        text = get(agent.port, "/metrics")[1]
        assert metric(text, 'fcl_client_agent_errors_total{kind="server_unavailable"}') >= 1
        # SIGTERM while a call is being retried against a dead server: a clean stop all the same
        server.kill()
        retries = agent.text().count("retrying in")
        wait_until(lambda: agent.alive() and agent.text().count("retrying in") > retries, "a retry", 60)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=60) == 0, agent.text()
        assert "agent stopped: 2 tasks done" in agent.text()
        again = serve(tmp_path / "server", tmp_path / "server-3.log", tmp_path)  # for the fixture to stop
        server.proc, server.port = again.proc, again.port
    finally:
        agent.kill()


def test_a_stop_request_ends_a_long_step_at_its_next_progress_call() -> None:

    states: list[str] = []
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise Stopping

    bars = StopBars(Bars(enabled=False), states.append, check)
    with bars.bar("training task-00", unit="epoch") as on_epoch:
        on_epoch(1, 3)
        stop.set()
        with pytest.raises(Stopping):
            on_epoch(2, 3)
    with bars.bar("FM features", unit="text"):
        pass
    assert states == ["training", "encoding"]
