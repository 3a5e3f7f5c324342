"""The state database: a 0.1.0 state dir upgrades in place, and State behaves alike on SQLite and PostgreSQL.

The PostgreSQL cases run on a throwaway cluster of the test session (benchmarks/pg.py), skipped only where
PostgreSQL is not installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server import database
from fcl_server.app import ServerConfig
from fcl_server.cli import main as server_cli
from fcl_server.database import DatabaseError
from fcl_server.schema import metadata
from fcl_server.state import GLOBAL, PERSONAL, Job, JobState, Record, State, StateClosed
from tests.servers import inprocess_server, package_bytes

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "state-0.1.0"
TABLES = ["tokens", "clients", "labels", "uploads", "jobs", "heads", "metrics", "kv", "upload_reservations"]
HEAD = database.head_revision()


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = server_cli(list(argv))
    return code, out.getvalue().strip(), err.getvalue().strip()


def rows_of(db: Path) -> dict[str, list[list[Any]]]:
    """Every row of every 0.1.0 table, its 0.1.0 columns, as tools/make_state_fixture.py dumped them."""
    conn = sqlite3.connect(db)
    try:
        return {
            t: [
                list(r)
                for r in conn.execute(f"SELECT {', '.join(database.V010_TABLES[t])} FROM {t} ORDER BY 1, 2")
            ]
            for t in TABLES
        }
    finally:
        conn.close()


def schema_of(db: Path) -> dict[str, Any]:
    """Columns (type, NOT NULL, default, key), indexes and AUTOINCREMENT of each table, as SQLite has them."""
    conn = sqlite3.connect(db)
    try:
        out: dict[str, Any] = {}
        for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='table'"
            " AND name NOT IN ('alembic_version', 'sqlite_sequence') ORDER BY name"
        ):
            indexes = []
            for _, index, unique, origin, _ in conn.execute(f"PRAGMA index_list('{name}')"):
                columns = tuple(r[2] for r in conn.execute(f"PRAGMA index_info('{index}')"))
                indexes.append((origin, index if origin == "c" else "", columns, unique))
            columns = conn.execute(f"PRAGMA table_info('{name}')").fetchall()
            out[name] = (columns, sorted(indexes), "AUTOINCREMENT" in sql.upper())
        return out
    finally:
        conn.close()


def schema_drift(url: str) -> list[Any]:
    """What Alembic finds different between the database and fcl_server.schema (nothing, ideally)."""
    engine = database.create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            diffs = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    # SQLite has no identity columns (job ids are its AUTOINCREMENT rowid): Alembic reports one anyway
    sqlite_identity = ("modify_default", None, "jobs", "job_id")
    return [d for d in diffs if not (url.startswith("sqlite") and tuple(d[0][:4]) == sqlite_identity)]


@pytest.fixture
def v010(tmp_path: Path) -> Path:
    """A state dir holding a copy of the committed database that fcl 0.1.0 wrote."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    shutil.copy(FIXTURE / "state.sqlite3", state_dir / "state.sqlite3")
    return state_dir


# -- 0.1.0 state dirs -------------------------------------------------------------------------------------
def test_fcl_server_db_upgrades_a_0_1_0_state_dir_in_place_with_every_row(v010: Path) -> None:
    assert HEAD == "0004"
    code, out, err = cli("db", "current", "--state-dir", str(v010))
    assert (code, out) == (1, "0001 (a 0.1.0 state database, not yet stamped; head is 0004)")
    assert err == f"database: sqlite:///{v010}/state.sqlite3"

    code, out, _ = cli("db", "upgrade", "--state-dir", str(v010))
    assert (code, out) == (
        0,
        "upgraded 0001 (a 0.1.0 state database, not yet stamped; head is 0004) -> 0004 (head)",
    )
    assert cli("db", "current", "--state-dir", str(v010))[:2] == (0, "0004 (head)")
    assert cli("db", "upgrade", "--state-dir", str(v010))[:2] == (0, "already at 0004 (head)")

    db = v010 / "state.sqlite3"
    assert rows_of(db) == json.loads((FIXTURE / "rows.json").read_text())
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0004",)]
        assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name='jobs'").fetchall() == [(6,)]
    assert schema_drift(database.sqlite_url(db)) == []


def test_serving_a_0_1_0_state_dir_upgrades_it_and_carries_on_where_it_stopped(v010: Path) -> None:
    st = State(v010 / "state.sqlite3")  # what `fcl-server serve` does: SQLite upgrades itself
    try:
        assert rows_of(v010 / "state.sqlite3") == json.loads((FIXTURE / "rows.json").read_text())
        ops, edge1 = st.principal_for("fcl_fixture-ops"), st.principal_for("fcl_fixture-edge-1")
        assert ops is not None and ops.is_admin and edge1 is not None and edge1.name == "edge-1"
        assert st.principal_for("fcl_fixture-edge-2") is None  # revoked in 0.1.0
        states = {j.job_id: j.state for j in st.jobs()}
        assert states == {
            1: JobState.DONE,
            2: JobState.FAILED,
            3: JobState.SUPERSEDED,
            4: JobState.DONE,
            5: JobState.RUNNING,
            6: JobState.QUEUED,
        }
        assert st.label_count() == 4 and st.client_count() == 2
        g, p = st.head(GLOBAL, ""), st.head(PERSONAL, "edge-1")
        assert g is not None and (g.version, g.blob, g.job_id, g.num_labels) == (2, "5" * 64, 4, 4)
        assert p is not None and (p.version, p.blob) == (2, "6" * 64)
        assert st.get_kv("stats_bank") == "d" * 64 and st.get_kv("public_digest") == "e" * 64
        assert st.last_metrics("edge-1") == {"small_acc": 0.75, "personal_acc": 0.875, "bytes_up": 4.5e5}
        assert [tuple(r) for r in st.clients()] == [("edge-1", 1700000017.0, 4), ("edge-2", 1700000013.0, 2)]
        upload = st.find_upload("edge-1", "u3")
        assert upload is not None and (upload["job_id"], upload["size"]) == (4, 1300)
        # the unfinished upload's binding survived: other bytes under its id are refused
        assert st.reserve_upload("edge-2", "u3", 99, "0" * 64, stale_before=0.0) == (2048, "8" * 64)

        assert st.requeue_running() == 1  # the job the "crash" left running
        five = claim(st)
        assert five.job_id == 5 and st.claim_next_job() is None  # one job at a time
        assert upload_job(st, "edge-1", "u9") == (7, False)  # job ids go on after 0.1.0's
        assert st.complete_job(five, "g", "p", 5, ["v"], None) == (3, 1)  # its client's first personal head
        assert st.label_count() == 5
        seven = claim(st)  # edge-1's newest upload supersedes its queued job 6
        assert seven.job_id == 7 and st.complete_job(seven, "g2", "p2", 5, [], None) == (4, 3)
        assert [j.state for j in st.jobs(limit=3)] == [JobState.DONE, JobState.SUPERSEDED, JobState.DONE]
    finally:
        st.close()


def test_revision_0001_creates_exactly_the_0_1_0_schema_and_head_is_one_schema(tmp_path: Path) -> None:
    engine = database.create_engine(database.sqlite_url(tmp_path / "r1.sqlite3"))
    try:
        assert database.upgrade(engine, "0001")[1].revision == "0001"
    finally:
        engine.dispose()
    assert schema_of(tmp_path / "r1.sqlite3") == schema_of(FIXTURE / "state.sqlite3")

    State(tmp_path / "fresh.sqlite3").close()
    upgraded = tmp_path / "upgraded.sqlite3"
    shutil.copy(FIXTURE / "state.sqlite3", upgraded)
    State(upgraded).close()
    assert schema_of(upgraded) == schema_of(tmp_path / "fresh.sqlite3")
    assert schema_drift(database.sqlite_url(tmp_path / "fresh.sqlite3")) == []


def test_databases_fcl_does_not_know_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE jobs (x INTEGER)")
    with pytest.raises(DatabaseError, match=r"not a 0\.1\.0 state database: table tokens is missing"):
        State(other)
    code, _, err = cli("db", "upgrade", "--database", database.sqlite_url(other))
    assert code == 2 and "table jobs has columns x" in err

    newer = tmp_path / "newer.sqlite3"
    State(newer).close()
    with contextlib.closing(sqlite3.connect(newer)) as conn:
        conn.execute("UPDATE alembic_version SET version_num='9999'")
        conn.commit()
    with pytest.raises(DatabaseError, match="9999, which this fcl-server does not know"):
        State(newer)
    assert cli("db", "current", "--database", database.sqlite_url(newer))[:2] == (
        1,
        "9999 (unknown to this fcl-server: written by a newer version?)",
    )


def test_database_urls_never_show_their_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://fcl:s3cr3t-pw@127.0.0.1:1/fcl"
    assert database.mask(url) == "postgresql+psycopg://fcl:***@127.0.0.1:1/fcl"
    assert "s3cr3t" not in repr(ServerConfig(state_dir=tmp_path, database=url))
    code, out, err = cli("db", "current", "--database", url)  # nothing listens on port 1
    assert code == 2 and "s3cr3t" not in out + err and "fcl:***@127.0.0.1:1" in err
    with pytest.raises(DatabaseError) as exc:
        State("mysql://fcl:s3cr3t-pw@127.0.0.1/fcl")
    assert "s3cr3t" not in str(exc.value) and "SQLite or PostgreSQL" in str(exc.value)


# -- one behaviour on both backends --------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[State]:
    if request.param == "sqlite":
        st = State(tmp_path / "state.sqlite3")
    else:
        st = State(request.getfixturevalue("postgres_url"), upgrade=True)
    assert st.dialect == request.param
    yield st
    st.close()


def upload_job(state: State, client: str, upload_id: str, task_index: int = 0) -> tuple[int, bool]:
    sha = f"{client}/{upload_id}".encode().hex().ljust(64, "0")[:64]
    return state.add_upload_and_job(
        client, upload_id, f"task-{task_index}", task_index, 100 + task_index, sha
    )


def claim(state: State) -> Job:
    job = state.claim_next_job()
    assert job is not None
    return job


def test_tokens_and_clients(state: State) -> None:
    state.add_token("tok-admin", "ops", True)
    state.add_token("tok-a1", "alice", False)
    state.add_token("tok-a2", "alice", False)
    admin = state.principal_for("tok-admin")
    assert admin is not None and admin.name == "ops" and admin.is_admin
    assert state.principal_for("nope") is None
    assert state.revoke_tokens("alice") == 2 and state.revoke_tokens("alice") == 0
    assert state.principal_for("tok-a1") is None

    state.touch_client("bob", fm_digest="f" * 64, model_spec='{"spec": "mlp"}')
    state.touch_client("Alice")
    state.touch_client("bob")  # keeps what it was told before
    upload_job(state, "bob", "u1")
    rows = state.clients()
    assert [r["client_id"] for r in rows] == ["Alice", "bob"]  # bytewise order on both backends
    assert isinstance(rows[1], Record) and rows[1]["uploads"] == 1 and rows[1][2] == 1
    assert dict(rows[1]).keys() == {"client_id", "last_seen", "uploads"}
    assert state.client_count() == 2
    with state.tx() as db:
        spec = db.execute(sa.text("SELECT model_spec FROM clients WHERE client_id = 'bob'")).scalar()
    assert spec == '{"spec": "mlp"}'


def test_uploads_queue_in_order_and_newer_uploads_supersede(state: State) -> None:
    a1, _ = upload_job(state, "a", "u1")
    b1, _ = upload_job(state, "b", "u1")
    a2, _ = upload_job(state, "a", "u2", 1)
    c1, _ = upload_job(state, "c", "u1")
    assert [a1, b1, a2, c1] == sorted([a1, b1, a2, c1]) and state.queue_depth() == 4
    assert upload_job(state, "a", "u1") == (a1, True)  # idempotent per (client, upload id)
    assert [state.queue_position(j) for j in (a1, b1, a2, c1)] == [0, 1, 2, 3]
    row = state.find_upload("a", "u2")
    assert row is not None and (row["job_id"], row["size"], row["task_index"]) == (a2, 101, 1)
    assert row.keys() == [
        "upload_id",
        "client_id",
        "task_key",
        "task_index",
        "size",
        "sha256",
        "received",
        "job_id",
    ]

    first = claim(state)  # a1 is superseded by a2; b1 is the oldest survivor
    assert first.job_id == b1 and first.state is JobState.RUNNING and first.started > 0
    old = state.job(a1)
    assert old is not None and old.state is JobState.SUPERSEDED and f"job {a2}" in old.message
    assert state.claim_next_job() is None  # one job runs at a time, across workers
    state.complete_job(first, "g1", "p1", 1, [], None)
    second = claim(state)
    assert second.job_id == a2
    state.complete_job(second, "g2", "p2", 1, [], None)
    assert claim(state).job_id == c1
    assert state.claim_next_job() is None and state.queue_depth() == 0
    assert [j.job_id for j in state.jobs(limit=2)] == [c1, a2]


def test_claim_requeue_and_fail(state: State) -> None:
    first, _ = upload_job(state, "a", "u1")
    second, _ = upload_job(state, "b", "u1")
    assert claim(state).job_id == first
    state.requeue_job(first)  # interrupted: back at its place
    assert claim(state).job_id == first
    assert state.requeue_running("worker@elsewhere:1") == 0  # another live worker's job stays
    assert state.requeue_running() == 1 and state.requeue_running() == 0  # this process's, restarted
    job = state.job(first)
    assert job is not None and job.state is JobState.QUEUED and job.started == 0
    assert claim(state).job_id == first
    state.fail_job(first, "boom " * 1000)
    failed = state.job(first)
    assert failed is not None and failed.state is JobState.FAILED and len(failed.message) == 2000
    assert failed.finished > 0 and state.job(999_999) is None
    taken = state.claim_next_job("w", lease_s=0.05)
    assert taken is not None and taken.job_id == second
    time.sleep(0.1)
    again = state.claim_next_job("w2")  # the lease ran out: another worker takes the job
    assert again is not None and again.job_id == second and again.state is JobState.RUNNING


def test_completed_jobs_publish_heads_labels_and_the_bank(state: State) -> None:
    upload_job(state, "a", "u1")
    assert state.complete_job(claim(state), "g1", "p1", 2, ["x", "y"], "bank-1") == (1, 1)
    upload_job(state, "b", "u1")
    assert state.complete_job(claim(state), "g2", "p2", 3, ["y", "z", "z"], None) == (2, 1)
    upload_job(state, "a", "u2")
    job = claim(state)
    assert state.complete_job(job, "g3", "p3", 3, [], None) == (3, 2)
    done = state.job(job.job_id)
    assert (
        done is not None
        and done.state is JobState.DONE
        and (done.global_version, done.personal_version) == (3, 2)
    )
    assert state.label_count() == 3 and state.get_kv("stats_bank") == "bank-1"
    g = state.head(GLOBAL, "")
    assert g is not None and (g.version, g.blob, g.job_id, g.num_labels) == (3, "g3", job.job_id, 3)
    old = state.head(GLOBAL, "", version=1)
    assert old is not None and old.blob == "g1"
    p = state.head(PERSONAL, "a")
    assert p is not None and (p.version, p.blob) == (2, "p3") and state.head(PERSONAL, "c") is None
    assert state.head_summary() == {GLOBAL: (3, 3), PERSONAL: (3, 2)}
    state.set_kv("stats_bank", "bank-2")
    assert state.get_kv("stats_bank") == "bank-2" and state.get_kv("missing") is None


def test_metrics_are_replaced_per_task_and_name(state: State) -> None:
    assert state.put_metrics("a", "task-0", 0, {"acc": 0.5, "loss": 1.0}) == 2
    state.put_metrics("a", "task-1", 1, {"acc": 0.6})
    state.put_metrics("a", "task-1", 1, {"acc": 0.7})  # a repeated report replaces its row
    state.put_metrics("B", "task-0", 0, {"acc": 0.1})
    assert state.last_metrics("a") == {"acc": 0.7} and state.last_metrics("nobody") == {}
    history = [(r["client_id"], r["task_index"], r["name"], r["value"]) for r in state.metric_history()]
    assert history == [
        ("B", 0, "acc", 0.1),
        ("a", 0, "acc", 0.5),
        ("a", 0, "loss", 1.0),
        ("a", 1, "acc", 0.7),
    ]
    assert state.metric_rows("a", 0) == (3, {"acc", "loss"})
    upload_job(state, "a", "u1")
    upload_job(state, "a", "u2", 1)
    assert state.client_storage("a") == (100 + 101, 3) and state.client_storage("nobody") == (0, 0)


def test_upload_reservations(state: State) -> None:
    assert state.reserve_upload("a", "u1", 10, "1" * 64, stale_before=0.0) is True
    assert state.reserve_upload("a", "u1", 10, "1" * 64, stale_before=0.0) is False  # renewed
    assert state.reserve_upload("a", "u1", 11, "2" * 64, stale_before=0.0) == (10, "1" * 64)
    assert state.reserve_upload("b", "u1", 11, "2" * 64, stale_before=0.0) is True  # another client
    # abandoned: a binding not renewed since stale_before gives way
    assert state.reserve_upload("a", "u1", 11, "2" * 64, stale_before=time.time() + 1) is True
    state.release_upload_id("a", "u1")
    assert state.reserve_upload("a", "u1", 12, "3" * 64, stale_before=0.0) is True
    job_id, _ = state.add_upload_and_job("a", "u1", "t", 0, 12, "3" * 64)  # the uploads row binds it now
    with state.tx() as db:
        left = db.execute(sa.text("SELECT COUNT(*) FROM upload_reservations WHERE client_id = 'a'")).scalar()
    assert left == 0
    assert state.reserve_upload("a", "u1", 13, "4" * 64, stale_before=0.0) == (12, "3" * 64)
    assert state.reserve_upload("a", "u1", 12, "3" * 64, stale_before=0.0) is False
    assert state.add_upload_and_job("a", "u1", "t", 0, 12, "3" * 64) == (job_id, True)


def test_times_keep_their_precision(state: State) -> None:
    before = time.time()
    job_id, _ = upload_job(state, "a", "u1")
    job = state.job(job_id)
    assert job is not None and before <= job.created <= time.time()  # PostgreSQL REAL would round minutes
    state.put_metrics("a", "t", 0, {"x": 0.123456789012345})
    assert state.last_metrics("a") == {"x": 0.123456789012345}


def test_many_threads_upload_at_once(state: State) -> None:
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(5):
            got = [upload_job(state, f"c{n}", f"u{i}"), upload_job(state, "shared", "same")]
            with lock:
                results.extend(got)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    own = [job_id for job_id, duplicate in results if not duplicate]
    assert len(own) == len(set(own)) == 6 * 5 + 1  # one job for the shared upload id
    assert sum(duplicate for _, duplicate in results) == 6 * 5 - 1
    assert state.queue_depth() == 31 and len(state.jobs(limit=100)) == 31


def test_a_closed_state_says_so(state: State) -> None:
    state.close()
    with pytest.raises(StateClosed):
        state.queue_depth()
    with pytest.raises(StateClosed):
        state.set_kv("k", "v")
    state.close()  # twice is fine


# -- PostgreSQL: the operator migrates; the server runs on it ------------------------------------------------
def test_postgresql_is_migrated_by_fcl_server_db_upgrade(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = sa.make_url(postgres_url).password
    assert password
    with pytest.raises(
        DatabaseError, match=r"no fcl schema yet: create it with `fcl-server db upgrade"
    ) as exc:
        State(postgres_url)
    assert password not in str(exc.value)
    monkeypatch.setenv("FCL_DATABASE", postgres_url)  # the URL with its password stays off the command line
    code, out, err = cli("db", "current")
    assert (code, out) == (1, f"empty (no fcl tables; `fcl-server db upgrade` creates revision {HEAD})")
    code, out, err = cli("db", "upgrade")
    assert (code, out) == (
        0,
        f"upgraded empty (no fcl tables; `fcl-server db upgrade` creates revision {HEAD}) -> {HEAD} (head)",
    )
    assert password not in out + err and ":***@" in err
    assert cli("db", "current")[:2] == (0, f"{HEAD} (head)")
    assert schema_drift(postgres_url) == []
    st = State(postgres_url)
    try:
        assert st.url == database.mask(postgres_url) and password not in st.url
    finally:
        st.close()
    code, token, _ = cli("enroll", "--database", postgres_url, "edge-1")
    assert code == 0 and token.startswith("fcl_")
    st = State(postgres_url)
    try:
        principal = st.principal_for(token)
        assert principal is not None and principal.name == "edge-1"
    finally:
        st.close()


def test_a_server_on_postgresql_accepts_an_upload_and_runs_its_job(
    tmp_path: Path,
    fm: FoundationModel,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
    one_torch_thread: None,
) -> None:
    assert cli("db", "upgrade", "--database", postgres_url)[0] == 0
    caplog.set_level(logging.INFO)
    running = inprocess_server(tmp_path, fm, database=postgres_url)
    try:
        token = cli("enroll", "--database", postgres_url, "alice")[1]
        data = package_bytes(fm, ["open_door", "close_door", "ring_bell"])
        with Connection(f"127.0.0.1:{running.port}", token) as conn:
            receipt = conn.upload(data, "upload-1", "task-00", 0, fm.digest)
            assert conn.upload(data, "upload-1", "task-00", 0, fm.digest).duplicate
            event = conn.watch_job(receipt.job_id, timeout=300)
            assert event.state == pb.JOB_STATE_DONE, event.message
            header, _ = conn.get_knowledge()
            assert header.version == event.personal_version == 1 and header.num_labels == 3
            conn.report_metrics("task-00", 0, {"small/acc": 0.5})
        assert not (running.state_dir / "state.sqlite3").exists()  # nothing went to SQLite
    finally:
        running.stop(grace=1)
    password = sa.make_url(postgres_url).password
    assert password and password not in caplog.text and database.mask(postgres_url) in caplog.text
    st = State(postgres_url)
    try:
        job = st.job(receipt.job_id)
        assert job is not None and job.state is JobState.DONE and job.personal_version == 1
        assert st.label_count() == 3 and st.last_metrics("alice") == {"small/acc": 0.5}
    finally:
        st.close()
