"""Tests for the server's durable job queue and head versions (fcl_server.state on a temp SQLite file)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcl_server.state import GLOBAL, PERSONAL, Job, JobState, LeaseLost, State


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "fcl.sqlite3"


@pytest.fixture
def state(db_path: Path) -> Iterator[State]:
    st = State(db_path)
    yield st
    st.close()


def upload(state: State, client: str, upload_id: str, task_index: int = 0) -> tuple[int, bool]:
    digest = hashlib.sha256(f"{client}/{upload_id}".encode()).hexdigest()
    return state.add_upload_and_job(client, upload_id, f"task-{task_index}", task_index, 123, digest)


def claim(state: State) -> Job:
    job = state.claim_next_job()
    assert job is not None
    return job


def state_of(state: State, job_id: int) -> JobState:
    job = state.job(job_id)
    assert job is not None
    return job.state


def complete(state: State, job: Job, labels: list[str], num_labels: int) -> tuple[int, int]:
    return state.complete_job(job, f"g-{job.job_id}", f"p-{job.job_id}", num_labels, labels, None)


def test_empty_queue_claims_nothing(state: State) -> None:
    assert state.claim_next_job() is None
    assert state.queue_depth() == 0


def test_jobs_are_claimed_fifo_by_job_id(state: State) -> None:
    ids = [upload(state, client, "u1")[0] for client in ("c3", "c1", "c2")]
    assert ids == sorted(ids)
    assert state.queue_depth() == 3
    assert [state.queue_position(i) for i in ids] == [0, 1, 2]

    first = claim(state)
    assert first.job_id == ids[0] and first.client_id == "c3"
    assert first.state is JobState.RUNNING
    assert first.started > 0
    # a running job still counts ahead of the queued ones
    assert state.queue_position(ids[2]) == 2
    assert state.queue_depth() == 2
    assert state.claim_next_job() is None  # one job runs at a time, across workers (OBOD is one-by-one)

    complete(state, first, [], 0)
    second = claim(state)
    assert second.job_id == ids[1]
    complete(state, second, [], 0)
    assert claim(state).job_id == ids[2]
    assert state.claim_next_job() is None


def test_claimed_job_carries_upload_details(state: State) -> None:
    job_id, duplicate = upload(state, "c1", "up-7", task_index=4)
    assert not duplicate
    job = claim(state)
    assert job.job_id == job_id
    assert (job.client_id, job.upload_id, job.task_key, job.task_index) == ("c1", "up-7", "task-4", 4)
    assert job.blob == hashlib.sha256(b"c1/up-7").hexdigest()
    row = state.find_upload("c1", "up-7")
    assert row is not None and int(row["job_id"]) == job_id and int(row["size"]) == 123


def test_newer_upload_supersedes_older_queued_one(state: State) -> None:
    old, _ = upload(state, "c1", "u1", 0)
    new, _ = upload(state, "c1", "u2", 1)
    job = claim(state)
    assert job.job_id == new
    superseded = state.job(old)
    assert superseded is not None
    assert superseded.state is JobState.SUPERSEDED
    assert superseded.state.final
    assert str(new) in superseded.message and "superseded" in superseded.message
    assert superseded.finished > 0
    assert state.claim_next_job() is None


def test_only_the_newest_of_many_survives(state: State) -> None:
    ids = [upload(state, "c1", f"u{i}", i)[0] for i in range(4)]
    assert claim(state).job_id == ids[-1]
    assert [state_of(state, i) for i in ids[:-1]] == [JobState.SUPERSEDED] * 3


def test_superseding_does_not_touch_other_clients_and_keeps_fifo(state: State) -> None:
    a1, _ = upload(state, "a", "u1")
    b1, _ = upload(state, "b", "u1")
    a2, _ = upload(state, "a", "u2")
    c1, _ = upload(state, "c", "u1")

    # a1 is superseded by a2; the oldest survivor is b1, then a2, then c1
    b = claim(state)
    assert b.job_id == b1
    assert state_of(state, a1) is JobState.SUPERSEDED
    assert state_of(state, a2) is JobState.QUEUED
    assert state_of(state, c1) is JobState.QUEUED
    complete(state, b, [], 0)
    a = claim(state)
    assert a.job_id == a2
    complete(state, a, [], 0)
    assert claim(state).job_id == c1


def test_running_job_is_not_superseded_by_a_new_upload(state: State) -> None:
    first, _ = upload(state, "c1", "u1")
    running = claim(state)
    assert running.job_id == first
    second, _ = upload(state, "c1", "u2")
    assert state.claim_next_job() is None and state_of(state, first) is JobState.RUNNING
    complete(state, running, [], 0)
    assert claim(state).job_id == second


def test_upload_is_idempotent_per_client_and_upload_id(state: State) -> None:
    job_id, duplicate = upload(state, "c1", "u1")
    assert not duplicate
    again, duplicate = upload(state, "c1", "u1")
    assert (again, duplicate) == (job_id, True)
    assert state.queue_depth() == 1
    assert len(state.jobs()) == 1

    # the same upload id from another client is a different upload
    other, duplicate = upload(state, "c2", "u1")
    assert not duplicate and other != job_id

    # still a duplicate after the job ran
    job = claim(state)
    complete(state, job, ["x"], 1)
    assert upload(state, "c1", "u1") == (job_id, True)
    assert state.queue_depth() == 1


def test_requeue_running_puts_jobs_back(state: State) -> None:
    first, _ = upload(state, "c1", "u1")
    second, _ = upload(state, "c2", "u1")
    third, _ = upload(state, "c3", "u1")
    assert state.claim_next_job("serve@a").job_id == first  # type: ignore[union-attr]
    # a starting process takes back only its own jobs (restarted) and those whose lease ran out
    assert state.requeue_running("worker@b:1") == 0
    assert state.requeue_running("serve@a") == 1
    for job_id in (first, second, third):
        assert state_of(state, job_id) is JobState.QUEUED
    job = state.job(first)
    assert job is not None and job.started == 0
    # FIFO order survives the requeue
    assert state.claim_next_job("serve@a", lease_s=0.05).job_id == first  # type: ignore[union-attr]
    time.sleep(0.1)
    assert state.requeue_running("worker@b:1") == 1  # the lease ran out
    assert state.requeue_running("worker@b:1") == 0


def test_requeue_job_releases_only_the_claim_it_names(state: State) -> None:
    job_id, _ = upload(state, "c1", "u1")
    assert state.claim_next_job("w", lease_s=0.05).attempts == 1  # type: ignore[union-attr]
    time.sleep(0.1)
    again = state.claim_next_job("w")  # the lease ran out: claimed again, by the same worker
    assert again is not None and again.job_id == job_id and again.attempts == 2
    assert not state.requeue_job(job_id, "w", attempt=1)  # a release of the old claim misses the new
    assert not state.requeue_job(job_id, "other", attempt=2)
    assert state_of(state, job_id) is JobState.RUNNING
    assert state.requeue_job(job_id, "w", attempt=2)
    assert state_of(state, job_id) is JobState.QUEUED


def test_complete_job_bumps_versions_and_registers_labels_once(state: State) -> None:
    assert state.head(GLOBAL, "") is None
    upload(state, "c1", "u1")
    job = claim(state)
    assert complete(state, job, ["a", "b"], 2) == (1, 1)
    done = state.job(job.job_id)
    assert done is not None
    assert done.state is JobState.DONE and (done.global_version, done.personal_version) == (1, 1)
    assert state.label_count() == 2

    upload(state, "c2", "u1")
    job2 = claim(state)
    # c2 repeats label b: registered once; global goes to 2, c2's first personal head is 1
    assert complete(state, job2, ["b", "c", "c"], 3) == (2, 1)
    assert state.label_count() == 3

    upload(state, "c1", "u2")
    job3 = claim(state)
    assert complete(state, job3, [], 3) == (3, 2)
    assert state.label_count() == 3

    g = state.head(GLOBAL, "")
    assert g is not None
    assert (g.version, g.blob, g.job_id, g.num_labels) == (3, f"g-{job3.job_id}", job3.job_id, 3)
    p1 = state.head(PERSONAL, "c1")
    assert p1 is not None and (p1.version, p1.blob) == (2, f"p-{job3.job_id}")
    p2 = state.head(PERSONAL, "c2")
    assert p2 is not None and (p2.version, p2.blob) == (1, f"p-{job2.job_id}")
    old = state.head(GLOBAL, "", version=1)
    assert old is not None and old.blob == f"g-{job.job_id}"
    assert state.head(PERSONAL, "c3") is None


def test_complete_job_stores_bank_blob(state: State) -> None:
    upload(state, "c1", "u1")
    job = claim(state)
    assert state.get_kv("stats_bank") is None
    state.complete_job(job, "g", "p", 1, ["a"], "bank-1")
    assert state.get_kv("stats_bank") == "bank-1"
    upload(state, "c1", "u2")
    state.complete_job(claim(state), "g2", "p2", 1, [], None)  # no bank: keep the last one
    assert state.get_kv("stats_bank") == "bank-1"


def test_fail_job(state: State) -> None:
    job_id, _ = upload(state, "c1", "u1")
    claim(state)
    state.fail_job(job_id, "boom " * 1000)
    job = state.job(job_id)
    assert job is not None and job.state is JobState.FAILED and job.state.final
    assert job.message.startswith("boom") and len(job.message) <= 2000
    assert state.claim_next_job() is None


def test_state_survives_reopening(db_path: Path) -> None:
    st = State(db_path)
    done_id, _ = upload(st, "c1", "u1")
    complete(st, claim(st), ["a", "b"], 2)
    running_id, _ = upload(st, "c2", "u1")
    claim(st)
    queued_id, _ = upload(st, "c3", "u1")
    st.set_kv("public_digest", "abc")
    st.close()

    st = State(db_path)
    try:
        assert state_of(st, done_id) is JobState.DONE
        assert state_of(st, running_id) is JobState.RUNNING  # until the server requeues after a crash
        assert state_of(st, queued_id) is JobState.QUEUED
        assert st.label_count() == 2
        g = st.head(GLOBAL, "")
        assert g is not None and g.version == 1
        assert st.get_kv("public_digest") == "abc"
        assert upload(st, "c1", "u1") == (done_id, True)

        assert st.requeue_running() == 1
        again = claim(st)
        assert again.job_id == running_id
        assert complete(st, again, ["c"], 3) == (2, 1)
        assert claim(st).job_id == queued_id
        # job ids keep growing after a restart
        new_id, _ = upload(st, "c4", "u1")
        assert new_id > queued_id
        assert st.label_count() == 3
    finally:
        st.close()


def test_a_lease_that_runs_out_lets_another_worker_take_the_job(state: State) -> None:
    job_id, _ = upload(state, "c1", "u1")
    later, _ = upload(state, "c2", "u1")
    dead = state.claim_next_job("worker@a:1", lease_s=0.2)
    assert dead is not None and dead.job_id == job_id
    assert state.claim_next_job("worker@b:2") is None  # a live lease holds every other worker back
    assert state.renew_lease(job_id, "worker@a:1", 0.2)  # a heartbeat keeps it
    assert not state.renew_lease(job_id, "worker@b:2", 30)  # only for its own worker
    time.sleep(0.3)
    taken = state.claim_next_job("worker@b:2")
    assert taken is not None and taken.job_id == job_id  # the same job again, before the later one
    assert not state.renew_lease(job_id, "worker@a:1", 30)  # the dead worker's beat finds it lost
    with pytest.raises(LeaseLost):  # and its late result is refused, nothing written
        state.complete_job(dead, "g-late", "p-late", 1, ["x"], None, worker="worker@a:1")
    assert state.head(GLOBAL, "") is None and state.label_count() == 0
    assert state.complete_job(taken, "g", "p", 1, ["x"], None, worker="worker@b:2", based_on=0) == (1, 1)
    assert state.claim_next_job("worker@b:2").job_id == later  # type: ignore[union-attr]


def test_a_result_computed_from_an_older_global_head_is_refused(state: State) -> None:
    upload(state, "c1", "u1")
    job = state.claim_next_job("w")
    assert job is not None
    with pytest.raises(LeaseLost, match="started from G v3"):
        state.complete_job(job, "g", "p", 1, [], None, worker="w", based_on=3)
    assert state.complete_job(job, "g", "p", 1, [], None, worker="w", based_on=0) == (1, 1)


def test_workers_report_their_heartbeat_and_job(state: State) -> None:
    state.worker_heartbeat("worker@a:1", "a", 1)
    state.worker_heartbeat("worker@b:2", "b", 2, job_id=7)
    seen = {row["worker_id"]: int(row["job_id"]) for row in state.workers()}
    assert seen == {"worker@a:1": 0, "worker@b:2": 7}
    state.drop_worker("worker@a:1")
    assert [row["worker_id"] for row in state.workers()] == ["worker@b:2"]
