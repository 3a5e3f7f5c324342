"""Issue 13: 3 front-ends, 2 workers, 20 clients over cutting links, through kill -9s and a database restart.

One PostgreSQL; every client's link is a FaultProxy that cuts connections at random, so uploads resume
and retry under the same upload id. During the run a front-end is killed mid-upload (its clients move
to another one), a worker is killed mid-job (its lease runs out, the other takes the job back) and
PostgreSQL is restarted while uploads stream in. Afterwards the database must hold exactly one job per
accepted upload, each distilled once: G's versions 1..N, one per job, in job order, each on the one
before, and every personalised head built on the G of its own job.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import grpc

from benchmarks import pg
from common.fm import FoundationModel
from common.package import decode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import RETRYABLE, Connection
from fcl_server.blobs import BlobStore
from fcl_server.state import GLOBAL, PERSONAL, HeadVersion, Job, JobState
from tests.faultproxy import UP, FaultProxy
from tests.scale import Cluster, scale_cluster, wait_for
from tests.servers import accepted, enroll, held_parts, package_bytes

T = TypeVar("T")
KB = 1024
CLIENTS, TASKS, FRONTENDS, WORKERS = 20, 2, 3, 2
CHUNK = 2 * KB  # the ~10 KB packages go in 5 chunks: a cut stream leaves bytes held to resume from
CHAOS = (4 * KB, 24 * KB)  # bytes a connection carries before its proxy cuts it (a client sends ~25 KB)
SLOW = 4 * KB  # bytes/s per connection to the doomed front-end: its uploads are mid-stream when it dies
# a channel of its own for each client, as on 20 devices (gRPC shares one connection per target in a
# process), so each client's link is cut and throttled alone
OWN_LINK = [("grpc.use_local_subchannel_pool", 1)]
RUN_S = 600.0  # the clients give up after this (the run takes about a minute; far more on a loaded machine)
DB_DOWN_S = 1.5  # PostgreSQL stays stopped this long


def labels_of(client: int, task: int) -> list[str]:
    """Labels no other job has: each global step adds exactly these to G, which shows it applied once."""
    return [f"c{client:02d}_t{task}_{k}" for k in range(2)]


# -- the clients ------------------------------------------------------------------------------------------
@dataclass
class ClientRun:
    client: str
    receipts: list[pb.UploadReceipt] = field(default_factory=list)  # one per upload, in upload order
    finals: list[pb.JobEvent] = field(default_factory=list)  # the final event of each upload's job
    again: int = 0  # calls that outlasted Connection's own retries and were made again


def run_client(
    target: str, client: str, token: str, packages: list[bytes], digest: str, deadline: float
) -> ClientRun:
    run = ClientRun(client)
    with Connection(target, token, chunk_size=CHUNK, channel_options=OWN_LINK) as conn:
        _again(run, deadline, partial(conn.register, client, digest))
        for n, data in enumerate(packages):
            upload = partial(conn.upload, data, f"{client}-{n}", f"task-{n:02d}", n, digest)
            receipt = _again(run, deadline, upload)
            run.receipts.append(receipt)
            # the next upload waits for this job: a client's queued job is superseded by its newer one
            # (by design), and would then never be distilled
            run.finals.append(_again(run, deadline, partial(_watch, conn, receipt.job_id, deadline)))
    return run


def _watch(conn: Connection, job_id: int, deadline: float) -> pb.JobEvent:
    return conn.watch_job(job_id, timeout=max(1.0, deadline - time.monotonic()))


def _again(run: ClientRun, deadline: float, call: Callable[[], T]) -> T:
    """`call` until it succeeds: an outage longer than Connection's retries is retried too (for an
    upload, with the same upload id: the server must answer it with the job it already has)."""
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code not in RETRYABLE or time.monotonic() > deadline:
                raise
            run.again += 1
            time.sleep(1.0)


class RetryLog(logging.Handler):
    """Counts Connection's retries by RPC and status ("UploadKnowledge UNAVAILABLE")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.msg and isinstance(record.args, tuple) and len(record.args) >= 2:
            self.counts[f"{record.args[0]} {record.args[1]}"] += 1


@contextmanager
def retries_counted() -> Iterator[RetryLog]:
    logger = logging.getLogger("fcl_client.connection")
    handler = RetryLog()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# -- the faults -------------------------------------------------------------------------------------------
@dataclass
class Faults:
    held_at_kill: dict[str, int] = field(default_factory=dict)  # upload id → bytes held when its FE died
    held_at_db_stop: dict[str, int] = field(default_factory=dict)  # ... when PostgreSQL stopped
    proxies: list[FaultProxy] = field(default_factory=list)  # the clients' links, one per front-end
    db_up_at: float = 0.0
    jobs_done_before_db_restart: int = 0
    victim_job: Job | None = None  # the job its worker was running when killed


def mid_stream(c: Cluster, clients: list[str]) -> dict[str, int]:
    """upload id → bytes held of the clients' uploads the front-ends are receiving (in the shared dir)."""
    return {u: n for cl in clients for u, n in held_parts(c.blob_dir, cl).items() if n > 0}


@contextmanager
def trickling(proxies: list[FaultProxy]) -> Iterator[None]:
    """Uploads through these links take seconds (SLOW bytes/s in fine blocks): a fault lands mid-stream."""
    before = [(p.rate[UP], p.block) for p in proxies]
    for p in proxies:
        p.rate[UP], p.block = SLOW, 512
    try:
        yield
    finally:
        for p, (rate, block) in zip(proxies, before, strict=True):
            p.rate[UP], p.block = rate, block


def kill_frontend_mid_upload(c: Cluster, proxies: list[FaultProxy], clients: list[str]) -> dict[str, int]:
    """kill -9 front-end 0 while uploads stream through it; its proxy then leads to front-end 1."""
    doomed = proxies[0]
    with trickling([doomed]):
        wait_for(lambda: mid_stream(c, clients), "an upload mid-stream through front-end 0", timeout=120)
        c.frontends[0].kill()
        held = mid_stream(c, clients)  # what the shared dir kept of the uploads the kill interrupted
        doomed.upstream_port = c.frontends[1].port
    doomed.chaos = CHAOS  # from now on cut like the others
    return held


def restart_database_mid_upload(c: Cluster, postgres: pg.Cluster, clients: list[str], faults: Faults) -> None:
    """Stop PostgreSQL while uploads stream in, once some jobs are done (their clients upload their
    next tasks then), and start it again."""
    wait_for(lambda: _done(c) >= CLIENTS // 3, "the first jobs to be done")
    with trickling(faults.proxies):
        wait_for(lambda: mid_stream(c, clients), "an upload mid-stream", timeout=120)
        faults.jobs_done_before_db_restart = _done(c)
        faults.held_at_db_stop = mid_stream(c, clients)
        postgres.pause()
        try:
            time.sleep(DB_DOWN_S)
        finally:
            postgres.resume()
        faults.db_up_at = time.time()


def kill_worker_mid_job(c: Cluster, since: float) -> Job:
    """kill -9 the worker that runs a job's global step (RUNNING); the job waits out its lease."""

    def running() -> Job | None:
        live = {name for name, w in c.workers.items() if w.proc.poll() is None}
        # claimed since the last fault: a job the database outage interrupted stays RUNNING under the
        # worker that gave it up until that worker reaches the database again and re-queues it, and
        # killing the worker before would hit no job
        jobs = c.state.jobs(200)
        return next(
            (j for j in jobs if j.state is JobState.RUNNING and j.worker in live and j.started > since), None
        )

    wait_for(running, "a job running on a worker")
    job = running()
    assert job is not None
    c.workers[job.worker].proc.kill()
    c.workers[job.worker].proc.wait(timeout=30)
    return job


def _done(c: Cluster) -> int:
    return sum(j.state is JobState.DONE for j in c.state.jobs(200))


def run_with_faults(
    c: Cluster, postgres: pg.Cluster, tokens: dict[str, str], packages: dict[str, list[bytes]], digest: str
) -> tuple[list[ClientRun], Faults]:
    proxies = [FaultProxy(fe.port, seed=n) for n, fe in enumerate(c.frontends)]
    home = {client: n % FRONTENDS for n, client in enumerate(tokens)}  # spread over the front-ends
    for p in proxies[1:]:  # front-end 0's link is not cut before its kill: that must land mid-upload
        p.chaos = CHAOS
    faults = Faults(proxies=proxies)
    deadline = time.monotonic() + RUN_S
    try:
        with ThreadPoolExecutor(CLIENTS, thread_name_prefix="client") as pool:
            runs: list[Future[ClientRun]] = [
                pool.submit(run_client, proxies[home[cl]].target, cl, token, packages[cl], digest, deadline)
                for cl, token in tokens.items()
            ]
            faults.held_at_kill = kill_frontend_mid_upload(c, proxies, [cl for cl in tokens if home[cl] == 0])
            restart_database_mid_upload(c, postgres, list(tokens), faults)
            faults.victim_job = kill_worker_mid_job(c, since=faults.db_up_at)
        return [r.result() for r in runs], faults
    finally:
        for p in proxies:
            p.close()


# -- the audit --------------------------------------------------------------------------------------------
@dataclass
class Audit:
    counts: dict[str, int | str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def report(self) -> str:
        lines = [f"  {name}: {value}" for name, value in self.counts.items()]
        return "\n".join(["counts:", *lines, f"problems ({len(self.problems)}):", *self.problems])


def audit_uploads(audit: Audit, runs: list[ClientRun], jobs: list[Job]) -> None:
    """0 lost, 0 duplicated: exactly one job per (client, upload id) a client was told was accepted."""
    told = {(r.client, rc.upload_id): rc.job_id for r in runs for rc in r.receipts}
    per_upload = Counter((j.client_id, j.upload_id) for j in jobs)
    in_db = {(j.client_id, j.upload_id): j.job_id for j in jobs}
    lost = [u for u in told if u not in in_db]
    duplicated = [u for u, n in per_upload.items() if n > 1]
    unknown = [u for u in in_db if u not in told]  # a job whose client never got a receipt
    mismatched = [u for u, job_id in told.items() if in_db.get(u, job_id) != job_id]
    audit.counts |= {
        "uploads sent": CLIENTS * TASKS,
        "uploads accepted (receipts)": len(told),
        "receipts recovered after a cut (duplicate=True)": sum(
            rc.duplicate for r in runs for rc in r.receipts
        ),
        "jobs in the database": len(jobs),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "jobs no client was told of": len(unknown),
        "receipts naming another job": len(mismatched),
        "jobs done": sum(j.state is JobState.DONE for j in jobs),
        "jobs run more than once (taken back)": sum(j.attempts > 1 for j in jobs),
        "calls the clients made again": sum(r.again for r in runs),
    }
    audit.check(len(told) == CLIENTS * TASKS, f"only {len(told)} of {CLIENTS * TASKS} uploads accepted")
    audit.check(not lost, f"lost: {lost}")
    audit.check(not duplicated, f"duplicated: {duplicated}")
    audit.check(not unknown, f"jobs no client was told of: {unknown}")
    audit.check(not mismatched, f"receipts naming another job than the database: {mismatched}")
    not_done = [(j.job_id, j.state.value, j.message) for j in jobs if j.state is not JobState.DONE]
    audit.check(not not_done, f"jobs not done: {not_done}")
    finals = [e for r in runs for e in r.finals if e.state != pb.JOB_STATE_DONE]
    audit.check(not finals, f"clients saw jobs end other than done: {finals}")


def audit_global(audit: Audit, c: Cluster, blobs: BlobStore, jobs: list[Job]) -> None:
    """G v1..vN, one version per job, in job order (FIFO), each step applied once on the version before."""
    versions: list[HeadVersion] = []
    while (head := c.state.head(GLOBAL, "", version=len(versions) + 1)) is not None:
        versions.append(head)
    by_id = {j.job_id: j for j in jobs}
    order = [h.job_id for h in versions]
    audit.counts |= {
        "G versions": len(versions),
        "G head now": getattr(c.state.head(GLOBAL, ""), "version", 0),
    }
    audit.check(
        order == sorted(by_id), f"G versions were made by jobs {order}, not by jobs {sorted(by_id)} in order"
    )
    wrong = [
        (j.job_id, j.global_version)
        for j in jobs
        if order[j.global_version - 1 : j.global_version] != [j.job_id]
    ]
    audit.check(not wrong, f"jobs whose global_version is not the G version they made: {wrong}")
    before: set[str] = set()
    for head in versions:
        now = decode_package(blobs.read(head.blob)).labels
        job = by_id.get(head.job_id)
        added = set(decode_package(blobs.read(job.blob)).labels) if job else set()
        audit.check(
            len(now) == len(set(now)) == len(before) + len(added) and set(now) == before | added,
            f"G v{head.version} is not G v{head.version - 1} plus the labels of job {head.job_id}",
        )
        before = set(now)


def audit_personal(audit: Audit, c: Cluster, blobs: BlobStore, jobs: list[Job]) -> None:
    """Each client's P_c v1..vk, one per job of its own, in job order, each built on its job's G."""
    heads = 0
    for client in sorted({j.client_id for j in jobs}):
        mine = sorted((j for j in jobs if j.client_id == client), key=lambda j: j.job_id)
        versions: list[HeadVersion] = []
        while (head := c.state.head(PERSONAL, client, version=len(versions) + 1)) is not None:
            versions.append(head)
        heads += len(versions)
        made_by, own = [h.job_id for h in versions], [j.job_id for j in mine]
        audit.check(
            made_by == own and [j.personal_version for j in mine] == [h.version for h in versions],
            f"{client}: P_c versions were made by jobs {made_by}, its jobs are {own}",
        )
        for head, job in zip(versions, mine, strict=False):  # unequal lengths: reported just above
            base = c.state.head(GLOBAL, "", version=job.global_version)
            built_on = decode_package(blobs.read(head.blob)).labels
            audit.check(
                base is not None
                and base.job_id == job.job_id
                and built_on == decode_package(blobs.read(base.blob)).labels,
                f"{client}: P_c v{head.version} (job {job.job_id}) is not built on G v{job.global_version}",
            )
    audit.counts["P_c heads"] = heads


def audit_faults(audit: Audit, c: Cluster, faults: Faults, jobs: list[Job], retries: RetryLog) -> None:
    """The faults struck where they were meant to, and the run went through them."""
    survivors: dict[str, tuple[int, int]] = {}
    for fe in c.frontends[1:]:
        survivors |= accepted(fe.log_path)
    resumed = {u: survivors.get(u, (0, 0))[1] for u in faults.held_at_kill}
    victim = faults.victim_job
    final = next((j for j in jobs if victim and j.job_id == victim.job_id), None)
    audit.counts |= {
        "uploads mid-stream at the front-end kill": len(faults.held_at_kill),
        "... finished on another front-end from the bytes held": sum(
            resumed[u] >= held for u, held in faults.held_at_kill.items()
        ),
        "worker killed mid-job": f"{victim.worker} in job {victim.job_id}" if victim else "none",
        "... the job then done by": f"{final.worker}, attempt {final.attempts}" if final else "none",
        "jobs done before the database restart": faults.jobs_done_before_db_restart,
        "uploads mid-stream as the database was stopped": len(faults.held_at_db_stop),
        "uploads accepted after the database restart": sum(j.created > faults.db_up_at for j in jobs),
        "connections cut by the proxies": sum(p.cuts for p in faults.proxies),
        "client retries": ", ".join(f"{k} {n}" for k, n in sorted(retries.counts.items())) or "none",
    }
    audit.check(bool(faults.held_at_kill), "no upload was mid-stream when the front-end was killed")
    audit.check(
        all(resumed[u] >= held > 0 for u, held in faults.held_at_kill.items()),
        f"uploads cut by the front-end kill (bytes held {faults.held_at_kill}) resumed at {resumed}",
    )
    audit.check(
        final is not None
        and victim is not None
        and final.worker != victim.worker
        and final.attempts > victim.attempts,
        f"the killed worker's job was not taken back: {victim} → {final}",
    )
    audit.check(bool(faults.held_at_db_stop), "no upload was mid-stream when the database stopped")
    audit.check(
        any(j.created > faults.db_up_at for j in jobs), "no upload came in after the database restart"
    )
    audit.check(sum(p.cuts for p in faults.proxies) > 0, "the proxies cut no connection")


# -- the test ---------------------------------------------------------------------------------------------
def test_scale_out_loses_and_repeats_nothing_through_kills_cuts_and_a_database_restart(
    tmp_path: Path, postgres: pg.Cluster, postgres_url: str, fm: FoundationModel
) -> None:
    began = time.monotonic()
    clients = [f"edge-{i:02d}" for i in range(CLIENTS)]
    # built here, before the threads: package_bytes seeds torch's global generator
    packages = {
        cl: [package_bytes(fm, labels_of(i, n)) for n in range(TASKS)] for i, cl in enumerate(clients)
    }
    audit = Audit()
    cluster = scale_cluster(tmp_path, postgres_url, frontends=FRONTENDS, workers=WORKERS)
    with cluster as c, retries_counted() as retries:
        tokens = {cl: enroll(None, cl, database=c.url) for cl in clients}
        started = time.monotonic()
        runs, faults = run_with_faults(c, postgres, tokens, packages, fm.digest)
        audit.counts["seconds of fault run"] = round(time.monotonic() - started)
        jobs = c.state.jobs(limit=10 * CLIENTS * TASKS)
        blobs = BlobStore(c.blob_dir / "blobs")
        try:
            audit_uploads(audit, runs, jobs)
            audit_global(audit, c, blobs, jobs)
            audit_personal(audit, c, blobs, jobs)
            audit_faults(audit, c, faults, jobs, retries)
        finally:
            blobs.close()
    audit.counts["seconds in all"] = round(time.monotonic() - began)
    print(audit.report())
    assert not audit.problems, audit.report()
