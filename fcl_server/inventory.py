"""Which blobs the database references and why: what backups copy and what gc may delete.

Every function reads through the connection it is given, so it sees that connection's snapshot: a
backup's copy of SQLite, the exported snapshot of a pg_dump, or the live database.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from fcl_server.schema import collected_blobs, heads, jobs, kv, metadata
from fcl_server.state import GLOBAL, JobState

DIGEST = re.compile(r"^[0-9a-f]{64}$")
UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.PERSONALIZING.value)


def referenced(db: sa.Connection) -> dict[str, set[str]]:
    """digest → what names it: global-head, personal-head, package, bank, or kv:KEY (FM archive, bank)."""
    refs: dict[str, set[str]] = defaultdict(set)
    for scope, blob in db.execute(sa.select(heads.c.scope, heads.c.blob)):
        refs[blob].add(f"{scope}-head")
    for blob, bank in db.execute(sa.select(jobs.c.blob, jobs.c.bank_blob)):
        refs[blob].add("package")
        if bank:
            refs[bank].add("bank")
    for key, value in db.execute(sa.select(kv.c.key, kv.c.value)):
        if DIGEST.match(value):  # any value shaped like a digest: kv keys are added without telling gc
            refs[value].add(f"kv:{key}")
    return {d: k for d, k in refs.items() if DIGEST.match(d)}


def collected(db: sa.Connection) -> set[str]:
    """Digests `fcl-server gc` deleted (a reference to one of them is expected to find no file)."""
    return {str(d) for d in db.execute(sa.select(collected_blobs.c.digest)).scalars()}


def row_counts(db: sa.Connection) -> dict[str, int]:
    """Rows of each fcl table the database has (one of an older revision has fewer)."""
    present = set(sa.inspect(db).get_table_names())
    return {
        name: int(db.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
        for name, table in sorted(metadata.tables.items())
        if name in present
    }


def job_states(db: sa.Connection) -> dict[str, int]:
    rows = db.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state))
    return {str(state): int(n) for state, n in rows}


def live_heads(db: sa.Connection) -> dict[str, int]:
    """'global' → G's live version, 'personal/CLIENT' → each client's; 0 / absent: none yet."""
    query = sa.select(heads.c.scope, heads.c.client_id, sa.func.max(heads.c.version)).group_by(
        heads.c.scope, heads.c.client_id
    )
    return {
        (GLOBAL if scope == GLOBAL else f"{scope}/{client}"): int(v) for scope, client, v in db.execute(query)
    }


@dataclass
class Plan:
    """What gc keeps (digest → why) and may delete (digest → what it was); every digest is in one."""

    keep: dict[str, str] = field(default_factory=dict)
    drop: dict[str, str] = field(default_factory=dict)


def plan(db: sa.Connection, keep_versions: int) -> Plan:
    """Which referenced blobs are still needed, on the connection's snapshot.

    Kept: every blob a kv value names (the live statistics bank, the FM archive); per head series (G,
    each client's personalised head) the newest `keep_versions` versions, and always the live one; the
    G version each unfinished job's personal step is fitted on; an unfinished job's package and bank;
    and the package and bank of each job that made a kept version (so a rollback to a kept version
    gets its bank back). Everything else that heads and jobs name may be deleted.
    """
    out = Plan()

    def keep(digest: str, why: str) -> None:
        if digest:
            out.keep.setdefault(digest, why)

    for key, value in db.execute(sa.select(kv.c.key, kv.c.value)):
        if DIGEST.match(value):
            keep(value, f"kv:{key}")

    h = heads.c
    rank = (
        sa.func.row_number()
        .over(partition_by=(h.scope, h.client_id), order_by=h.version.desc())
        .label("rank")
    )
    rows = db.execute(sa.select(h.scope, h.client_id, h.version, h.blob, h.job_id, h.rollback_of, rank)).all()
    pinned_global = {
        int(v)
        for v in db.execute(
            sa.select(jobs.c.global_version).where(jobs.c.state.in_(UNFINISHED), jobs.c.global_version > 0)
        ).scalars()
    }
    by_version = {int(r.version): r for r in rows if r.scope == GLOBAL}
    kept_jobs: set[int] = set()
    for r in rows:
        live = r.rank == 1
        if live or r.rank <= keep_versions or (r.scope == GLOBAL and int(r.version) in pinned_global):
            what = "live" if live else f"newest {keep_versions}" if r.rank <= keep_versions else "job"
            keep(r.blob, f"{r.scope}-head v{r.version} ({what})")
            # a kept rollback version keeps what made the version it republishes (its bank, above all)
            source: sa.Row[Any] | None = r
            seen: set[int] = set()
            while source is not None and source.rollback_of and source.version not in seen:
                seen.add(source.version)
                source = by_version.get(int(source.rollback_of)) if r.scope == GLOBAL else None
            if source is not None and source.job_id:
                kept_jobs.add(int(source.job_id))
            if r.job_id:
                kept_jobs.add(int(r.job_id))
    j = jobs.c
    for job_id, state, blob, bank in db.execute(sa.select(j.job_id, j.state, j.blob, j.bank_blob)):
        if state in UNFINISHED:
            keep(blob, f"package of unfinished job {job_id}")
            keep(bank, f"bank of unfinished job {job_id}")
        elif int(job_id) in kept_jobs:
            keep(blob, f"package of job {job_id} (made a kept version)")
            keep(bank, f"bank of job {job_id} (made a kept version)")

    for digest, kinds in referenced(db).items():
        if digest not in out.keep:
            out.drop[digest] = "+".join(sorted(kinds))
    return out


def still_needed(db: sa.Connection, digest: str) -> bool:
    """Whether the live database needs `digest` now, whatever an older plan said: an unfinished job's
    package or bank, a kv value, or the blob of a live head (a rollback or a job made a reference)."""
    j, h = jobs.c, heads.c
    newer = heads.alias("newer")
    top = sa.select(sa.func.max(newer.c.version)).where(
        newer.c.scope == h.scope, newer.c.client_id == h.client_id
    )
    checks = [
        sa.select(j.job_id).where(j.state.in_(UNFINISHED), sa.or_(j.blob == digest, j.bank_blob == digest)),
        sa.select(kv.c.key).where(kv.c.value == digest),
        sa.select(h.version).where(h.blob == digest, h.version == top.scalar_subquery()),
    ]
    return any(db.execute(q.limit(1)).first() is not None for q in checks)
