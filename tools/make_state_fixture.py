"""Write tests/fixtures/state-0.1.0/: a state DB as fcl 0.1.0 wrote it, with rows in every table.

The committed fixture was written by the 0.1.0 code (raw sqlite3 `State`, commit cd2d098) and is what
tests/test_storage.py upgrades in place. Do not regenerate it with a later version: that would test
nothing. The script is kept to show how it was made (it only uses State's public methods and a fixed
clock, so the rows are the same on every run):

    python tools/make_state_fixture.py tests/fixtures/state-0.1.0

rows.json beside the database lists every row of every table, as sqlite3 read them back.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import sys
from pathlib import Path

from fcl_server import state as state_module
from fcl_server.state import State

TABLES = ["tokens", "clients", "labels", "uploads", "jobs", "heads", "metrics", "kv", "upload_reservations"]


def build(db: Path) -> None:
    clock = itertools.count(1_700_000_000.0, 1.0)
    state_module.time.time = lambda: next(clock)  # type: ignore[assignment]  # fixed clock: stable rows
    st = State(db)
    st.add_token("fcl_fixture-ops", "ops", True)
    st.add_token("fcl_fixture-edge-1", "edge-1", False)
    st.add_token("fcl_fixture-edge-2", "edge-2", False)
    st.revoke_tokens("edge-2")
    st.touch_client("edge-1", fm_digest="f" * 64, model_spec='{"spec": "linear"}')
    st.touch_client("edge-2")

    st.add_upload_and_job("edge-1", "u1", "task-00", 0, 1000, "a" * 64)  # job 1: done
    job = st.claim_next_job()
    assert job is not None
    st.complete_job(job, "b" * 64, "c" * 64, 3, ["x", "y", "z"], "d" * 64)
    st.add_upload_and_job("edge-2", "u1", "task-00", 0, 1100, "1" * 64)  # job 2: failed
    job = st.claim_next_job()
    assert job is not None
    st.fail_job(job.job_id, "invalid package: no labels")
    st.add_upload_and_job("edge-1", "u2", "task-01", 1, 1200, "2" * 64)  # job 3: superseded by 4
    st.add_upload_and_job("edge-1", "u3", "task-02", 2, 1300, "3" * 64)  # job 4: done
    st.add_upload_and_job("edge-2", "u2", "task-01", 1, 1400, "4" * 64)  # job 5: running (a crash)
    job = st.claim_next_job()
    assert job is not None and job.job_id == 4
    st.complete_job(job, "5" * 64, "6" * 64, 4, ["y", "w"], None)
    assert st.claim_next_job() is not None
    st.add_upload_and_job("edge-1", "u4", "task-03", 3, 1500, "7" * 64)  # job 6: queued

    st.put_metrics("edge-1", "task-00", 0, {"small_acc": 0.8, "personal_acc": 0.9})
    st.put_metrics("edge-1", "task-02", 2, {"small_acc": 0.75, "personal_acc": 0.875, "bytes_up": 4.5e5})
    st.put_metrics("edge-2", "task-00", 0, {"small_acc": 0.5})
    st.set_kv("public_digest", "e" * 64)
    assert st.reserve_upload("edge-2", "u3", 2048, "8" * 64, stale_before=0.0) is True
    st.close()


def dump(db: Path) -> dict[str, list[list[object]]]:
    conn = sqlite3.connect(db)
    try:
        return {t: [list(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2")] for t in TABLES}
    finally:
        conn.close()


def main(out: str) -> int:
    folder = Path(out)
    db = folder / "state.sqlite3"
    if db.exists():
        raise SystemExit(f"{db} exists: the committed fixture is written once, by 0.1.0")
    folder.mkdir(parents=True, exist_ok=True)
    build(db)
    conn = sqlite3.connect(db)
    conn.execute("VACUUM")
    conn.close()
    rows = dump(db)
    (folder / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    print({t: len(r) for t, r in rows.items()}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/state-0.1.0"))
