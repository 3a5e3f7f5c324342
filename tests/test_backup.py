"""`fcl-server backup` / `restore`, on SQLite and PostgreSQL.

Under load: a real server process takes uploads from three clients and runs their jobs while the backup
runs (never stopped); the backup restores into a new state dir (and a new database); a server started
on it serves the same heads and queue as the snapshot, and then works the restored queue off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import pg
from common.datasets.streams import load_task_stream
from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client import FclClient
from fcl_client.connection import Connection
from fcl_client.runner import ClientRunner
from fcl_server.backup import MANIFEST
from fcl_server.blobs import BlobStore
from fcl_server.cli import main as server_cli
from fcl_server.state import GLOBAL, PERSONAL, HeadVersion, Job, JobState, State
from tests.servers import enroll, inprocess_server, package_bytes, serve, wait_until
from tests.test_sdk import FAST, learn

CLIENTS = {
    "edge-0": ["open_door", "close_door"],
    "edge-1": ["turn_on_light", "dim_light"],
    "edge-2": ["play_song", "stop_song"],
}
PB_STATE = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.PERSONALIZING: pb.JOB_STATE_RUNNING,
    JobState.DONE: pb.JOB_STATE_DONE,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.SUPERSEDED: pb.JOB_STATE_SUPERSEDED,
}


def fcl_server(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real `fcl-server` command, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "fcl_server.cli", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = server_cli(list(argv))
    return code, out.getvalue().strip(), err.getvalue().strip()


@dataclass
class Backend:
    name: str
    live: str | None  # database URL (None: SQLite in the state dir)
    restored: str | None

    def db(self, url: str | None) -> list[str]:
        return ["--database", url] if url else []


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", None, None)
    cluster: pg.Cluster = request.getfixturevalue("postgres")
    return Backend("postgresql", cluster.new_database(), cluster.new_database())


class Uploads:
    """Three clients upload packages in turn, until stopped, over real gRPC."""

    def __init__(self, target: str, tokens: dict[str, str], fm: FoundationModel) -> None:
        self.target, self.tokens, self.fm = target, tokens, fm
        self.packages = {c: package_bytes(fm, labels) for c, labels in CLIENTS.items()}
        self.sent = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Uploads:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        conns = {c: Connection(self.target, t) for c, t in self.tokens.items()}
        try:
            for conn, client in zip(conns.values(), conns, strict=True):
                conn.register(client, self.fm.digest)
            n = 0
            while not self._stop.is_set():
                for client, conn in conns.items():
                    conn.upload(self.packages[client], f"{client}-{n}", f"task-{n:02d}", n, self.fm.digest)
                    self.sent += 1
                n += 1
                self._stop.wait(0.5)
        except BaseException as exc:  # the test reports it
            self.errors.append(exc)
        finally:
            for conn in conns.values():
                conn.close()


def _history(state: State) -> dict[tuple[str, str], list[HeadVersion]]:
    out: dict[tuple[str, str], list[HeadVersion]] = {}
    for h in state.head_history():
        out.setdefault((h.scope, h.client_id), []).append(h)
    return out


def _jobs(state: State) -> dict[int, Job]:
    return {j.job_id: j for j in state.jobs(100_000)}


def test_a_backup_taken_under_load_restores_the_same_heads_and_queue(
    backend: Backend, tmp_path: Path, fm: FoundationModel
) -> None:
    live_dir, backup_dir, restored_dir = tmp_path / "live", tmp_path / "backup", tmp_path / "restored"
    if backend.live:
        State(backend.live, upgrade=True).close()  # `fcl-server db upgrade`: serve never migrates PostgreSQL
    tokens = {c: enroll(live_dir, c, database=backend.live) for c in CLIENTS}
    admin = enroll(live_dir, "ops", admin=True, database=backend.live)
    server = serve(live_dir, tmp_path / "live.log", tmp_path, *backend.db(backend.live))
    live = State(backend.live or live_dir / "state.sqlite3", upgrade=False)
    try:
        with Uploads(server.target, tokens, fm) as load:
            # under load: a head published, a job running or personalising, more waiting
            def busy() -> bool:
                counts = live.job_counts()
                active = counts[JobState.RUNNING] + counts[JobState.PERSONALIZING]
                return counts[JobState.DONE] >= 1 and active >= 1 and counts[JobState.QUEUED] >= 1

            wait_until(busy, "jobs run and wait", timeout=600)
            sent_before = load.sent
            done = fcl_server(
                "backup", str(backup_dir), "--state-dir", str(live_dir), *backend.db(backend.live), "--json"
            )
            assert done.returncode == 0, done.stderr
            sent_after = load.sent
            assert sent_after > sent_before  # uploads went on while the backup ran
            wait_until(lambda: load.sent >= sent_after + 3, "uploads go on after the backup", timeout=300)
        assert not load.errors, load.errors
        assert server.proc.poll() is None  # the server was never stopped
    finally:
        assert server.stop() == 0, server.log_tail()
    summary = json.loads(done.stdout)
    manifest = json.loads((backup_dir / MANIFEST).read_text())
    assert summary["blobs"] == manifest["blobs"] and manifest["database"]["backend"] == backend.name
    assert manifest["blobs"]["count"] == len(manifest["blob_list"]) and not manifest["blobs"]["missing"]
    snapshot_jobs = manifest["jobs"]
    assert snapshot_jobs.get("queued", 0) >= 1 and snapshot_jobs.get("done", 0) >= 1, snapshot_jobs
    live_history, live_jobs = _history(live), _jobs(live)
    live.close()
    assert len(live_jobs) > manifest["rows"]["jobs"]  # the server took uploads after the snapshot

    done = fcl_server(
        "restore", str(backup_dir), "--state-dir", str(restored_dir), *backend.db(backend.restored)
    )
    assert done.returncode == 0, done.stderr
    assert "next: fcl-server serve --state-dir" in done.stdout

    # the restored state is the live state as it was at one moment: every series a prefix of the live one
    restored = State(backend.restored or restored_dir / "state.sqlite3", upgrade=False)
    try:
        restored_history, restored_jobs = _history(restored), _jobs(restored)
        queue = sorted(j.job_id for j in restored_jobs.values() if j.state is JobState.QUEUED)
    finally:
        restored.close()
    assert {k: v[0].version for k, v in restored_history.items()} == {
        (GLOBAL if k == GLOBAL else PERSONAL, "" if k == GLOBAL else k.split("/", 1)[1]): v
        for k, v in manifest["heads"].items()
    }
    for series, versions in restored_history.items():
        assert versions == live_history[series][-len(versions) :]
    for job_id, job in restored_jobs.items():
        then = live_jobs[job_id]
        assert (job.client_id, job.upload_id, job.blob, job.created) == (
            then.client_id, then.upload_id, then.blob, then.created
        )  # fmt: skip
    assert queue and len(queue) == snapshot_jobs["queued"]

    # a server on the restored state (no worker yet: the queue stays as it was) serves the same heads
    restored_admin = admin  # the tokens table was restored too
    front = serve(
        restored_dir, tmp_path / "restored.log", tmp_path, "--no-worker", *backend.db(backend.restored)
    )
    try:
        with Connection(front.target, restored_admin) as conn:
            status = conn.status(10_000)
            assert status.global_version == manifest["heads"]["global"]
            assert {c.client_id: c.personal_version for c in status.clients if c.personal_version} == {
                k.split("/", 1)[1]: v for k, v in manifest["heads"].items() if k != GLOBAL
            }
            assert sorted(j.job_id for j in status.jobs if j.state == pb.JOB_STATE_QUEUED) == queue
            assert {j.job_id: j.state for j in status.jobs} == {
                i: PB_STATE[j.state] for i, j in restored_jobs.items()
            }
            for (scope, client), versions in restored_history.items():
                for h in versions:
                    which = pb.HEAD_SCOPE_GLOBAL if scope == GLOBAL else pb.HEAD_SCOPE_PERSONAL
                    header, data = conn.get_knowledge(which, h.version, client)
                    assert header.version == h.version and hashlib.sha256(data).hexdigest() == h.blob
    finally:
        assert front.stop() == 0, front.log_tail()

    # and with its worker it works the restored queue off: packages and banks came back whole
    server = serve(restored_dir, tmp_path / "restored2.log", tmp_path, *backend.db(backend.restored))
    try:
        with Connection(server.target, admin) as conn:

            def drained() -> bool:
                active = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
                return not any(j.state in active for j in conn.status(10_000).jobs)

            wait_until(drained, "the restored queue is worked off", timeout=600)
            status = conn.status(10_000)
            assert not [j for j in status.jobs if j.state == pb.JOB_STATE_FAILED], status.jobs
            assert status.global_version > manifest["heads"]["global"]
    finally:
        assert server.stop() == 0, server.log_tail()


# -- refusals and damage ----------------------------------------------------------------------------------
@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """A state dir with one finished job (G v1, a personal head), written through the state layer."""
    state_dir = tmp_path / "state"
    st = State(state_dir / "state.sqlite3")
    blobs = BlobStore(state_dir / "blobs")
    blobs.bind(st.set_kv_once)
    package = blobs.put_bytes(b"a package")
    st.add_upload_and_job("edge-a", "u1", "task-1", 1, 9, package)
    job = st.claim_next_job("w")
    assert job is not None
    g, p, bank = (blobs.put_bytes(b) for b in (b"G v1", b"P v1", b"bank v1"))
    st.complete_job(job, g, p, 1, ["x"], bank, "w")
    blobs.close()
    st.close()
    yield state_dir


def test_backup_and_restore_refuse_what_they_must_and_say_what_to_do(
    small_state: Path, tmp_path: Path
) -> None:
    state = ["--state-dir", str(small_state)]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    code, _, err = cli("backup", str(taken), *state)
    assert code == 2 and "is not empty: give a new (or empty) directory" in err

    code, out, err = cli("backup", str(tmp_path / "linked"), *state)
    assert code == 0, err
    assert "blobs: 4 (" in out and "4 hard-linked, 0 copied" in out and "every sha256 checked" in out
    assert "heads: global v1, personal/edge-a v1" in out
    backup = tmp_path / "backup"
    code, out, err = cli("backup", str(backup), *state, "--copy", "--json")
    assert code == 0, err
    assert (json.loads(out)["blobs"]["copied"], json.loads(out)["blobs"]["linked"]) == (4, 0)

    code, _, err = cli("restore", str(backup), "--state-dir", str(taken))
    assert code == 2 and "state dir" in err and "is not empty" in err
    code, _, err = cli(
        "restore", str(backup), "--state-dir", str(tmp_path / "r0"), "--database", "postgresql://x"
    )
    assert code == 2 and "backup of a SQLite database" in err
    code, out, err = cli("restore", str(backup), "--state-dir", str(tmp_path / "r1"))
    assert code == 0, err
    assert json.loads((backup / MANIFEST).read_text())["rows"]["heads"] == 2
    st = State(tmp_path / "r1" / "state.sqlite3", upgrade=False)
    try:
        g = st.head(GLOBAL, "")
        assert g is not None and (tmp_path / "r1" / "blobs" / g.blob[:2] / g.blob[2:]).read_bytes() == b"G v1"
        restored_blobs = BlobStore(tmp_path / "r1" / "blobs")
        restored_blobs.bind(st.set_kv_once)  # what a server does at start: the blob dir is the database's
        restored_blobs.close()
    finally:
        st.close()

    # damage is found before anything is written
    blob = next((backup / "blobs").glob("??/*"))
    os.chmod(blob, 0o644)
    blob.write_bytes(b"not what it was")
    code, _, err = cli("restore", str(backup), "--state-dir", str(tmp_path / "r2"))
    assert code == 2 and "missing or damaged" in err and not (tmp_path / "r2").exists()
    (backup / MANIFEST).unlink()
    code, _, err = cli("restore", str(backup), "--state-dir", str(tmp_path / "r3"))
    assert code == 2 and "has no manifest.json" in err and "incomplete" in err


def test_a_missing_blob_fails_the_backup_unless_allowed_and_a_collected_one_is_expected(
    small_state: Path, tmp_path: Path
) -> None:
    state = ["--state-dir", str(small_state)]
    st = State(small_state / "state.sqlite3", upgrade=False)
    job = st.job(1)
    assert job is not None
    st.close()
    path = small_state / "blobs" / job.blob[:2] / job.blob[2:]
    path.unlink()  # the package is lost (not deleted by gc)
    code, _, err = cli("backup", str(tmp_path / "b1"), *state)
    assert code == 2 and "missing from" in err and "--allow-missing" in err
    assert not (tmp_path / "b1").exists()  # nothing half-written is left behind
    code, out, err = cli("backup", str(tmp_path / "b2"), *state, "--allow-missing", "--json")
    assert code == 0, err
    assert json.loads(out)["blobs"]["missing"] == [job.blob]

    st = State(small_state / "state.sqlite3", upgrade=False)
    st.record_collected(job.blob, 9, "package")  # what gc records when it deletes a blob
    st.close()
    code, out, err = cli("backup", str(tmp_path / "b3"), *state, "--json")
    assert code == 0, err
    assert json.loads(out)["blobs"]["collected"] == 1 and json.loads(out)["blobs"]["missing"] == []


def test_a_postgresql_backup_restores_only_into_an_empty_database(
    postgres: pg.Cluster, tmp_path: Path
) -> None:
    url = postgres.new_database()
    st = State(url, upgrade=True)
    blobs = BlobStore(tmp_path / "shared" / "blobs")
    blobs.bind(st.set_kv_once)
    st.add_upload_and_job("edge-a", "u1", "task-1", 1, 9, blobs.put_bytes(b"a package"))
    blobs.close()
    st.close()
    args = ["--database", url, "--blob-dir", str(tmp_path / "shared")]
    code, out, err = cli("backup", str(tmp_path / "b"), *args)
    assert code == 0, err
    assert "postgresql snapshot database.dump" in out
    code, _, err = cli("restore", str(tmp_path / "b"), "--state-dir", str(tmp_path / "r"), "--database", url)
    assert code == 2 and "is not empty" in err and "new database" in err
    code, _, err = cli("restore", str(tmp_path / "b"), "--state-dir", str(tmp_path / "r"))
    assert code == 2 and "give --database URL of a new, empty database" in err
    target = postgres.new_database()
    code, out, err = cli(
        "restore", str(tmp_path / "b"), "--state-dir", str(tmp_path / "r"), "--database", target
    )
    assert code == 0, err
    st = State(target, upgrade=False)
    try:
        assert [j.job_id for j in st.jobs(states=[JobState.QUEUED])] == [1]
        assert st.get_kv("blob_dir_token") == (tmp_path / "r" / "blobs" / ".fcl-blob-dir").read_text()
    finally:
        st.close()


def test_a_client_waiting_on_a_job_the_restored_server_never_saw_uploads_its_task_again(
    tmp_path: Path, fm: FoundationModel, small_split: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restoring rewinds the server: a client killed while it waited on a later job resumes that task
    by uploading it again, instead of stopping on a job id the server does not know (or another's)."""
    stream = load_task_stream(small_split / "clients" / "client-0")
    corpus = small_split / "public.txt"
    first = inprocess_server(tmp_path / "a", fm, public_corpus=corpus)
    first.state.add_token("tok-0", "client-0", False)
    work, said = tmp_path / "work", []
    try:
        target = f"127.0.0.1:{first.port}"
        with FclClient(target, "client-0", "tok-0", work, "linear", fm=fm, smcf=FAST) as client:
            learn(client, stream[0])
        code, _, err = cli("backup", str(tmp_path / "bk"), "--state-dir", str(tmp_path / "a" / "state"))
        assert code == 0, err

        def killed(*_: object, **__: object) -> int:  # the client dies while it waits on task 1's job
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(ClientRunner, "_await_head", killed)
            client = FclClient(target, "client-0", "tok-0", work, "linear", fm=fm, smcf=FAST)
            with client, pytest.raises(KeyboardInterrupt):
                learn(client, stream[1])
        lost_job = json.loads((work / "progress.json").read_text())["job_id"]
        assert lost_job == 2
    finally:
        first.stop(grace=1)
    restored = tmp_path / "b" / "state"
    code, _, err = cli("restore", str(tmp_path / "bk"), "--state-dir", str(restored))
    assert code == 0, err
    second = inprocess_server(tmp_path / "b", fm, public_corpus=corpus)
    try:
        assert [j.job_id for j in second.state.jobs()] == [1]  # the backup was taken before job 2
        target = f"127.0.0.1:{second.port}"
        with FclClient(
            target, "client-0", "tok-0", work, "linear", fm=fm, smcf=FAST, on_message=said.append
        ) as client:
            result = learn(client, stream[1])
        assert any("does not know upload" in line and "uploading the package again" in line for line in said)
        jobs = {j.job_id: j for j in second.state.jobs()}
        assert jobs.keys() == {1, 2} and jobs[2].task_key == stream[1].name
        assert jobs[2].state == JobState.DONE and result.personal_version == 2
    finally:
        second.stop(grace=1)
