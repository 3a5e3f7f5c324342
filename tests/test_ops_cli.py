"""Operator commands: status, clients, jobs and heads views; rollback; gc. On SQLite and PostgreSQL.

The views are read from the database and over gRPC with an admin token; a rollback publishes an old
version as a new one while a job runs (the G compare-and-set drops and re-runs that job); gc keeps
what the queue, the live heads and the newest K versions use, and never deletes a blob that a
concurrent writer touched or referenced while it ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from common.algorithms.stats import StatsBank
from common.fm import FoundationModel
from common.package import decode_package, decode_stats
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server import gc as gcmod
from fcl_server import worker as worker_module
from fcl_server.blobs import BlobStore
from fcl_server.cli import main as server_cli
from fcl_server.errors import NotFound
from fcl_server.fm_host import FMHost
from fcl_server.service import FclService
from fcl_server.state import GLOBAL, PERSONAL, JobState, LeaseLost, Principal, State, _lock_head
from tests.servers import enroll, inprocess_server, package_bytes

OLD = 2 * 3600.0  # blobs made by a test are aged this much, past gc's grace period


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = server_cli(list(argv))
    return code, out.getvalue().strip(), err.getvalue().strip()


def cli_json(*argv: str) -> Any:
    code, out, err = cli(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


@dataclass
class Store:
    state: State
    blobs: BlobStore
    db: list[str]  # how the commands find the database
    blob: list[str]  # ... and the blob dir (beside db)
    n: int = 0

    def put(self, what: str) -> str:
        return self.blobs.put_bytes(what.encode())

    def job(self, client: str, labels: list[str], bank: bool = True) -> tuple[int, int, int]:
        """One upload of `client` run to the end by worker "w": (job id, G version, personal version)."""
        self.n += 1
        package = self.put(f"package {self.n} of {client}")
        job_id, _ = self.state.add_upload_and_job(client, f"u{self.n}", f"task-{self.n}", self.n, 10, package)
        job = self.state.claim_next_job("w")
        assert job is not None and job.job_id == job_id
        g = self.state.head(GLOBAL, "")
        gv = self.state.complete_global(
            job,
            self.put(f"G after job {job_id}"),
            len(labels),
            labels,
            self.put(f"bank after job {job_id}") if bank else None,
            "w",
            based_on=g.version if g else 0,
        )
        running = self.state.job(job_id)
        assert running is not None
        pv = self.state.complete_personal(running, self.put(f"P of {client} after job {job_id}"), 1, "w")
        return job_id, gv, pv

    def queue(self, client: str) -> int:
        self.n += 1
        package = self.put(f"package {self.n} of {client}")
        return self.state.add_upload_and_job(client, f"u{self.n}", f"task-{self.n}", self.n, 10, package)[0]

    def age(self) -> None:
        """Every blob so far was written OLD seconds ago."""
        then = time.time() - OLD
        for path in self.blobs.root.glob("??/*"):
            os.utime(path, (then, then))

    def exists(self, digest: str) -> bool:
        return self.blobs.exists(digest)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        state_dir = tmp_path / "state"
        st = State(state_dir / "state.sqlite3")
        blobs = BlobStore(state_dir / "blobs")
        db, blob = ["--state-dir", str(state_dir)], []
    else:
        url = request.getfixturevalue("postgres_url")
        st = State(url, upgrade=True)
        blobs = BlobStore(tmp_path / "shared" / "blobs")
        db, blob = ["--database", url], ["--blob-dir", str(tmp_path / "shared")]
    blobs.bind(st.set_kv_once)
    yield Store(st, blobs, db, blob)
    blobs.close()
    st.close()


# -- views ---------------------------------------------------------------------------------------------
def test_views_read_the_database_as_tables_and_json(store: Store) -> None:
    s = store
    s.job("edge-a", ["x", "y"])
    s.job("edge-b", ["z"])
    queued = s.queue("edge-a")
    s.state.put_metrics("edge-a", "task-1", 1, {"small/acc": 0.75})

    status = cli_json("status", *s.db)
    assert status["global_head"]["version"] == 2 and status["global_head"]["num_labels"] == 1
    assert status["labels"] == 3 and status["clients"] == 2 and status["personal_heads"] == 2
    assert status["queue_depth"] == 1 and status["jobs"]["done"] == 2 and status["jobs"]["queued"] == 1
    assert status["schema_revision"].endswith("(head)")
    code, text, _ = cli("status", *s.db)
    assert code == 0 and "global head  v2, 1 labels" in text and "1 queued, 2 done" in text

    clients = cli_json("clients", *s.db)
    assert [(c["client_id"], c["uploads"], c["personal_version"]) for c in clients] == [
        ("edge-a", 2, 1),
        ("edge-b", 1, 1),
    ]
    assert clients[0]["last_metrics"] == {"small/acc": 0.75}
    text = cli("clients", *s.db)[1].splitlines()
    assert text[0].split() == ["CLIENT", "LAST", "SEEN", "UPLOADS", "PERSONAL", "LAST", "METRICS"]
    assert text[1].split()[0] == "edge-a" and text[1].endswith("small/acc=0.750")

    jobs = cli_json("jobs", *s.db)
    assert [j["job_id"] for j in jobs] == [queued, 2, 1]  # newest first
    assert [j["job_id"] for j in cli_json("jobs", *s.db, "--state", "queued")] == [queued]
    done_a = cli_json("jobs", *s.db, "--state", "done", "--client", "edge-a")
    assert [(j["job_id"], j["global_version"], j["worker"], j["attempts"]) for j in done_a] == [
        (1, 1, "w", 1)
    ]
    assert len(cli_json("jobs", *s.db, "--limit", "1")) == 1

    heads = cli_json("heads", *s.db)
    assert [(h["scope"], h["client_id"], h["version"], h["live"]) for h in heads] == [
        (GLOBAL, "", 2, True),
        (GLOBAL, "", 1, False),
        (PERSONAL, "edge-a", 1, True),
        (PERSONAL, "edge-b", 1, True),
    ]
    assert [h["version"] for h in cli_json("heads", *s.db, "--client", "edge-b")] == [1]
    text = cli("heads", *s.db)[1].splitlines()
    assert text[0].split()[:3] == ["SCOPE", "CLIENT", "VERSION"] and text[1].split()[-1] == "live"


def test_views_say_what_is_wrong(tmp_path: Path) -> None:
    code, _, err = cli("status", "--state-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "no state database at" in err and "--state-dir" in err
    assert not (tmp_path / "nowhere").exists()  # a read never creates a database
    code, _, err = cli("status")
    assert code == 2 and "pass --state-dir" in err
    State(tmp_path / "s" / "state.sqlite3").close()
    code, _, err = cli("status", "--state-dir", str(tmp_path / "s"), "--token", "fcl_x")
    assert code == 2 and "are for --server" in err
    code, _, err = cli("jobs", "--state-dir", str(tmp_path / "s"), "--limit", "0")
    assert code == 2 and "--limit must be >= 1" in err


def test_views_over_grpc_with_an_admin_token(tmp_path: Path, fm: FoundationModel) -> None:
    server = inprocess_server(tmp_path, fm)
    try:
        state_dir = tmp_path / "state"
        client, admin = enroll(state_dir, "edge-1"), enroll(state_dir, "ops", admin=True)
        with Connection(f"127.0.0.1:{server.port}", client) as conn:
            conn.register("edge-1", fm.digest)
            job_id = conn.upload(
                package_bytes(fm, ["open_door", "close_door"]), "u1", "task-00", 0, fm.digest
            ).job_id
            assert conn.watch_job(job_id).state == pb.JOB_STATE_DONE
        token_file = tmp_path / "admin.token"
        token_file.write_text(admin)
        remote = ["--server", f"127.0.0.1:{server.port}", "--token-file", str(token_file)]

        status = cli_json("status", *remote)
        assert status["global_head"] == {"version": 1} and status["labels"] == 2
        assert status["fm"]["digest"] == fm.digest and status["jobs"] == {"done": 1}
        assert [w["worker_id"].split("@")[0] for w in status["workers"]] == ["serve"]
        # the same clients and jobs over gRPC as in the database (less what GetStatus does not carry)
        direct = ["--state-dir", str(state_dir)]
        assert cli_json("clients", *remote) == cli_json("clients", *direct)
        over_grpc = cli_json("jobs", *remote)
        from_db = [
            {k: v for k, v in j.items() if k not in ("attempts", "worker")} for j in cli_json("jobs", *direct)
        ]
        assert [j["job_id"] for j in over_grpc] == [job_id]
        assert {k: v for k, v in over_grpc[0].items() if k != "duration_s"} == {
            k: v for k, v in from_db[0].items() if k != "duration_s"
        }
        code, text, _ = cli("jobs", *remote)
        assert code == 0 and text.splitlines()[0].split()[:4] == ["JOB", "CLIENT", "TASK", "STATE"]

        code, _, err = cli("heads", *remote)
        assert code == 2 and "not their history" in err and "--state-dir" in err
        code, _, err = cli("jobs", *remote, "--state", "personalizing")
        assert code == 2 and "reads the database only" in err
        code, _, err = cli("status", "--server", f"127.0.0.1:{server.port}", "--token", client)
        assert code == 2 and "PERMISSION_DENIED" in err and "admin token" in err
    finally:
        server.stop()


# -- rollback ------------------------------------------------------------------------------------------
def test_rollback_republishes_an_old_version_and_never_rewrites_history(store: Store) -> None:
    s = store
    j1, _, _ = s.job("edge-a", ["x"])
    s.job("edge-b", ["y"])
    j3, _, _ = s.job("edge-a", ["z"])
    before = s.state.head_history()
    v1 = s.state.head(GLOBAL, "", 1)
    job1 = s.state.job(j1)
    assert v1 is not None and job1 is not None and job1.bank_blob

    result = cli_json("rollback", *s.db, *s.blob, "--global-version", "1")
    assert (result["version"], result["rollback_of"], result["blob"]) == (4, 1, v1.blob)
    assert result["bank"] == job1.bank_blob and s.state.get_kv("stats_bank") == job1.bank_blob
    g = s.state.head(GLOBAL, "")
    assert g is not None and (g.version, g.blob, g.rollback_of, g.job_id, g.num_labels) == (
        4,
        v1.blob,
        1,
        0,
        1,
    )
    assert s.state.head_history()[1:] == before  # v1-v3 and the personal heads exactly as they were
    code, text, _ = cli("heads", *s.db, "--scope", "global")
    assert code == 0 and "rollback to v1" in text.splitlines()[1]

    # a rollback of a rollback republishes the same blob and the bank of the version it names
    assert cli_json("rollback", *s.db, *s.blob, "--global-version", "3")["version"] == 5
    assert cli_json("rollback", *s.db, *s.blob, "--global-version", "4")["bank"] == job1.bank_blob

    code, _, err = cli("rollback", *s.db, *s.blob, "--global-version", "6")
    assert code == 2 and "already the live version" in err
    code, _, err = cli("rollback", *s.db, *s.blob, "--global-version", "9")
    assert code == 2 and "has no version 9: its versions are 1-6" in err
    code, _, err = cli("rollback", *s.db, *s.blob, "--global-version", "1", "--client", "edge-a")
    assert code == 2 and "not both" in err

    # personalised heads: the client's own series; a queued job of its will publish over it
    p1 = s.state.head(PERSONAL, "edge-a", 1)
    assert p1 is not None and s.state.head(PERSONAL, "edge-a") != p1
    queued = s.queue("edge-a")
    code, out, _ = cli("rollback", *s.db, *s.blob, "--client", "edge-a", "--personal-version", "1")
    assert code == 0 and out.startswith("published personalised head of edge-a v3: the blob of v1")
    assert f"job {queued} of edge-a is queued" in out
    p = s.state.head(PERSONAL, "edge-a")
    assert p is not None and (p.version, p.blob, p.rollback_of) == (3, p1.blob, 1)
    assert s.state.job(j3) is not None and s.state.head(PERSONAL, "edge-b") is not None


def test_a_global_step_running_during_a_rollback_is_dropped_and_runs_again(store: Store) -> None:
    s = store
    s.job("edge-a", ["x"])
    s.job("edge-b", ["y"])
    s.queue("edge-c")
    job = s.state.claim_next_job("w")
    assert job is not None and job.state is JobState.RUNNING  # its global step starts from G v2

    new, _ = s.state.rollback_head(GLOBAL, "", 1)
    assert new.version == 3
    with pytest.raises(LeaseLost, match="started from G v2, but G is at v3"):
        s.state.complete_global(job, s.put("G from v2"), 2, ["z"], None, "w", based_on=2)
    g = s.state.head(GLOBAL, "")
    assert g is not None and g.version == 3 and s.state.label_count() == 2  # nothing of it was written

    assert s.state.requeue_job(job.job_id, "w", job.attempts)  # what the worker does on LeaseLost
    again = s.state.claim_next_job("w")
    assert again is not None and again.job_id == job.job_id and again.attempts == 2
    assert s.state.complete_global(again, s.put("G from v3"), 2, ["z"], None, "w", based_on=3) == 4
    assert [h.version for h in s.state.head_history(GLOBAL)] == [4, 3, 2, 1]


def test_rollback_waits_for_a_publication_in_flight(store: Store) -> None:
    """Two writers of one head series (a job in one process, a rollback in another) never collide on a
    version number: the second waits for the first (PostgreSQL: the advisory lock) and goes after it."""
    s = store
    s.job("edge-a", ["x"])
    s.job("edge-b", ["y"])
    other = State(s.state.engine.url.render_as_string(hide_password=False), upgrade=False)
    locked, release = threading.Event(), threading.Event()

    def publish() -> None:
        from fcl_server.schema import heads

        with other.tx() as db:
            _lock_head(db, GLOBAL, "")
            db.execute(
                heads.insert().values(
                    scope=GLOBAL,
                    client_id="",
                    version=3,
                    blob=s.put("G v3"),
                    job_id=0,
                    num_labels=1,
                    created=0.0,
                )
            )
            locked.set()
            release.wait(10)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        assert locked.wait(10)
        threading.Timer(0.5, release.set).start()
        new, _ = s.state.rollback_head(GLOBAL, "", 1)  # waits for the other transaction's commit
    finally:
        release.set()
        thread.join()
        other.close()
    assert new.version == 4 and new.rollback_of == 1


def test_the_worker_runs_a_job_again_on_the_head_an_operator_rolled_back_to(
    tmp_path: Path, fm: FoundationModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, gate = threading.Event(), threading.Event()
    gate.set()
    starts: list[list[str]] = []
    real_step = worker_module.global_step

    def gated_step(current: Any, *args: Any, **kwargs: Any) -> Any:
        starts.append(list(current.labels) if current is not None else [])
        entered.set()
        assert gate.wait(60)
        return real_step(current, *args, **kwargs)

    monkeypatch.setattr(worker_module, "global_step", gated_step)
    # a long lease: the dropped run must go back to the queue at once, not when its lease runs out
    server = inprocess_server(tmp_path, fm, lease_s=400.0)
    state_dir = tmp_path / "state"
    try:
        token = enroll(state_dir, "edge-1")
        with Connection(f"127.0.0.1:{server.port}", token) as conn:
            conn.register("edge-1", fm.digest)

            def upload(n: int, labels: list[str]) -> int:
                return conn.upload(package_bytes(fm, labels), f"u{n}", f"task-{n:02d}", n, fm.digest).job_id

            for n, labels in enumerate([["open_door", "close_door"], ["play_song", "stop_song"]]):
                assert conn.watch_job(upload(n, labels)).state == pb.JOB_STATE_DONE
            v1 = server.state.head(GLOBAL, "", 1)
            job1 = server.state.job(1)
            assert v1 is not None and job1 is not None
            gate.clear()
            entered.clear()
            third = upload(2, ["turn_on_light", "dim_light"])
            assert entered.wait(60)  # its global step runs, from G v2 (four labels)
            assert starts[-1] == ["open_door", "close_door", "play_song", "stop_song"]

            code, out, err = cli("rollback", "--state-dir", str(state_dir), "--global-version", "1")
            assert code == 0, err
            assert out.splitlines()[0] == "published global head v3: the blob of v1 (2 labels)"
            assert f"job {third} (edge-1) was running its global step" in out
            released = time.monotonic()
            gate.set()
            done = conn.watch_job(third)
        assert done.state == pb.JOB_STATE_DONE and done.global_version == 4
        assert time.monotonic() - released < 300, "the dropped run waited for its lease"
        assert starts[-1] == ["open_door", "close_door"]  # run again, from the republished v1
        job = server.state.job(third)
        assert job is not None and job.attempts == 2
        g = server.state.head(GLOBAL, "")
        assert g is not None and g.version == 4
        assert decode_package(server.service.blobs.read(g.blob)).labels == [
            "open_door", "close_door", "turn_on_light", "dim_light"
        ]  # fmt: skip
        # the bank went back to v1's with it: the rolled-back upload's labels are gone from it too
        bank = decode_stats(server.service.blobs.read(job.bank_blob))
        assert isinstance(bank, StatsBank)
        assert bank.labels() == sorted(["open_door", "close_door", "turn_on_light", "dim_light"])
    finally:
        gate.set()
        server.stop()


# -- gc ------------------------------------------------------------------------------------------------
def test_gc_frees_old_versions_and_finished_packages_and_keeps_what_is_used(store: Store) -> None:
    s = store
    jobs = [
        s.job(client, [f"label-{i}"]) for i, client in enumerate(["edge-a", "edge-b", "edge-a", "edge-b"])
    ]
    queued = s.queue("edge-c")
    s.age()
    st = s.state

    def blob(scope: str, client: str, version: int) -> str:
        found = st.head(scope, client, version)
        assert found is not None
        return found.blob

    def job_blobs(job_id: int) -> tuple[str, str]:
        found = st.job(job_id)
        assert found is not None
        return found.blob, found.bank_blob

    # keep 1: the live heads, the queued package, and what made the kept versions (jobs 3 and 4)
    kept = {blob(GLOBAL, "", 4), blob(PERSONAL, "edge-a", 2), blob(PERSONAL, "edge-b", 2)}
    kept |= {*job_blobs(3), *job_blobs(4), job_blobs(queued)[0]}
    dropped = {blob(GLOBAL, "", v) for v in (1, 2, 3)} | {blob(PERSONAL, c, 1) for c in ("edge-a", "edge-b")}
    dropped |= {*job_blobs(1), *job_blobs(2)}
    assert len(dropped) == 9 and not kept & dropped
    size = sum(s.blobs.size(d) for d in dropped)

    dry = cli_json("gc", *s.db, *s.blob, "--keep-versions", "1", "--grace-s", "60", "--dry-run")
    assert dry["freed"]["count"] == 9 and dry["freed"]["bytes"] == size
    assert all(s.exists(d) for d in dropped)

    code, out, err = cli("gc", *s.db, *s.blob, "--keep-versions", "1", "--grace-s", "60")
    assert code == 0, err
    assert (
        out.splitlines()[0]
        == f"freed 9 blobs, {size} bytes (bank 2, global-head 3, package 2, personal-head 2)"
    )
    assert not any(s.exists(d) for d in dropped) and all(s.exists(d) for d in kept)
    assert st.collected(dropped).keys() == dropped
    assert cli_json("gc", *s.db, *s.blob, "--keep-versions", "1", "--grace-s", "60")["freed"]["count"] == 0

    # history stays; collected versions read as such, and cannot be rolled back to
    heads = cli_json("heads", *s.db, "--scope", "global")
    assert [(h["version"], bool(h["collected"])) for h in heads] == [
        (4, False),
        (3, True),
        (2, True),
        (1, True),
    ]
    code, _, err = cli("rollback", *s.db, *s.blob, "--global-version", "2")
    assert code == 2 and "was deleted by fcl-server gc" in err
    service = FclService(st, s.blobs, cast(FMHost, None))  # GetKnowledge's domain call; no FM needed
    try:
        ops = Principal("ops", True)
        with pytest.raises(NotFound, match="version 2 was deleted by `fcl-server gc`"):
            service.head(ops, GLOBAL, "", 2)
        assert service.head(ops, GLOBAL, "", 4)[1].exists()
    finally:
        service.close()
    live = st.head(GLOBAL, "")
    assert jobs[-1][1] == 4 and live is not None and live.version == 4 and s.exists(live.blob)


def test_gc_keeps_the_newest_k_versions_and_what_unfinished_jobs_use(store: Store) -> None:
    s = store
    for i in range(3):
        s.job("edge-a", [f"l{i}"])
    # a job whose G is published and whose personal step is still to run keeps its G version
    s.queue("edge-b")
    pending = s.state.claim_next_job("w")
    assert pending is not None
    g = s.state.head(GLOBAL, "")
    assert g is not None
    s.state.complete_global(pending, s.put("G v4"), 1, ["b"], s.put("bank 4"), "w", based_on=g.version)
    s.job("edge-a", ["l4"])  # G v5 (the personal step of job 4 is still to run)
    rollback, _ = s.state.rollback_head(GLOBAL, "", 1)  # v6: v1's blob, and v1's job keeps its bank
    s.age()
    report = cli_json("gc", *s.db, *s.blob, "--keep-versions", "2", "--grace-s", "60")
    assert report["freed"]["count"] > 0
    present = {h.version for h in s.state.head_history(GLOBAL) if s.exists(h.blob)}
    assert present == {6, 5, 4, 1}  # live (= v1's blob), newest 2, the one job 4 personalises on
    job1 = s.state.job(1)
    assert job1 is not None and s.exists(job1.bank_blob) and rollback.rollback_of == 1
    assert s.exists(pending.blob)  # the unfinished job's package


def test_gc_leaves_blobs_younger_than_its_grace_period(store: Store) -> None:
    s = store
    for client in ("edge-a", "edge-a", "edge-a"):
        s.job(client, ["x"])
    report = cli_json("gc", *s.db, *s.blob, "--keep-versions", "1")  # default grace: an hour
    assert report["freed"]["count"] == 0 and report["skipped_recent"] > 0


def test_gc_puts_back_a_blob_that_a_writer_touched_or_referenced_during_its_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store
    s.job("edge-a", ["x"])
    s.job("edge-a", ["y"])
    s.age()
    v1 = s.state.head(GLOBAL, "", 1)
    p1 = s.state.head(PERSONAL, "edge-a", 1)
    assert v1 is not None and p1 is not None
    real_rename = os.rename
    raced: dict[str, str] = {}

    def racing_rename(src: Any, dst: Any) -> None:
        digest = Path(src).parent.name + Path(src).name
        if digest == v1.blob:  # an upload of the same bytes found the blob and touched it, just now
            assert s.blobs.touch(digest)
            raced[digest] = "touched"
        elif digest == p1.blob:  # a new job names the blob (a writer that did not touch it)
            s.state.add_upload_and_job("edge-z", "late", "task-9", 9, 10, digest)
            raced[digest] = "referenced"
        real_rename(src, dst)

    monkeypatch.setattr(gcmod.os, "rename", racing_rename)
    report = gcmod.collect(s.state, s.blobs, keep_versions=1, grace_s=60)
    assert raced == {v1.blob: "touched", p1.blob: "referenced"}
    assert report.in_use == 2 and s.exists(v1.blob) and s.exists(p1.blob)
    assert not s.state.collected({v1.blob, p1.blob})  # put back: not recorded as collected
    assert report.freed_count > 0  # the rest went


def test_gc_orphans_deletes_old_blobs_no_row_names_and_only_when_asked(store: Store) -> None:
    s = store
    s.job("edge-a", ["x"])
    orphan = s.put("a head whose worker crashed before its commit")
    s.age()
    young = s.put("an upload whose commit is on its way")
    named = {d for d in s.blobs.digests() if d not in {orphan, young}}
    args = (*s.db, *s.blob, "--keep-versions", "1", "--grace-s", "60")
    assert cli_json("gc", *args)["freed"]["count"] == 0 and s.exists(orphan)  # not without --orphans
    dry = cli_json("gc", *args, "--orphans", "--dry-run")
    assert dry["freed"]["by_kind"] == {"orphan": 1} and s.exists(orphan)
    code, out, err = cli("gc", *args, "--orphans")
    assert code == 0, err
    assert out.splitlines()[0].startswith("freed 1 blobs") and "(orphan 1)" in out.splitlines()[0]
    assert not s.exists(orphan) and s.exists(young) and all(s.exists(d) for d in named)
    assert s.state.collected({orphan}).keys() == {orphan}


def test_writing_bytes_the_store_has_touches_the_blob(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put_bytes(b"same bytes")
    then = time.time() - OLD
    os.utime(blobs.path(digest), (then, then))
    assert blobs.put_bytes(b"same bytes") == digest
    assert time.time() - blobs.path(digest).stat().st_mtime < 60
    os.utime(blobs.path(digest), (then, then))
    tmp = blobs.new_temp()
    tmp.write_bytes(b"same bytes")
    blobs.put_file(tmp, digest)
    assert not tmp.exists() and time.time() - blobs.path(digest).stat().st_mtime < 60
    blobs.path(digest).unlink()  # gc took it after the writer looked: the writer writes it again
    assert not blobs.touch(digest) and blobs.put_bytes(b"same bytes") == digest and blobs.exists(digest)
    blobs.close()
