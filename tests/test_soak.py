"""Soak: 50 clients x 20 uploads through a proxy that keeps cutting connections; no job lost or doubled."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.algorithms.stats import StatsBank
from common.fm import FoundationModel
from common.package import KnowledgePackage, encode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.zoo import SmallModel, parse_spec
from fcl_client.connection import Connection
from tests.faultproxy import UP, FaultProxy
from tests.servers import accepted, enroll, held_parts, serve

CLIENTS, UPLOADS = 50, 20
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
SUPERSEDED_BY = re.compile(r"superseded by job (\d+) of the same client")


def packages(fm: FoundationModel, client: int) -> list[bytes]:
    """A client's 20 tiny packages (linear, 6 labels, with statistics: 29 KB), each different (counts)."""
    torch.manual_seed(client)
    labels = [f"c{client:02d}_{j}" for j in range(6)]
    model = SmallModel(parse_spec("linear"), fm.feature_dim, len(labels))
    bank = StatsBank(fm.feature_dim)
    bank.add_features(torch.randn(48, fm.feature_dim) + client, [y for y in labels for _ in range(8)])
    counts = lambda u: [8 + u] + [8] * (len(labels) - 1)  # noqa: E731
    return [
        encode_package(KnowledgePackage.from_model(model, labels, fm.digest, "small", counts(u), bank))
        for u in range(UPLOADS)
    ]


def wait_for_drain(conn: Connection, timeout: float) -> pb.ServerStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = conn.status(max_jobs=10 * CLIENTS * UPLOADS)
        if not any(j.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING) for j in status.jobs):
            return status
        time.sleep(1.0)
    raise AssertionError("the job queue did not drain in time")


@pytest.mark.slow
def test_soak_many_clients_random_disconnects_no_lost_or_duplicated_jobs(
    tmp_path: Path, fm: FoundationModel
) -> None:
    state = tmp_path / "state"
    names = [f"soak-{i:02d}" for i in range(CLIENTS)]
    tokens = {name: enroll(state, name) for name in names}
    admin = enroll(state, "ops", admin=True)
    data = {name: packages(fm, i) for i, name in enumerate(names)}
    server = serve(state, tmp_path / "server.log", tmp_path, "--upload-mb-per-hour", "0")
    proxy = FaultProxy(server.port, seed=0)
    proxy.chaos = (8 * 1024, 128 * 1024)  # every connection is cut after carrying 8-128 KB
    # a trickle of 2 KB blocks at 64 KB/s per connection: the server takes chunks in as they come, so
    # a cut leaves part of a package on the server (an instant cut on loopback drops it all unread)
    proxy.block, proxy.rate[UP] = 2048, 64 * 1024
    receipts: dict[str, pb.UploadReceipt] = {}  # upload id → receipt
    errors: list[str] = []
    lock = threading.Lock()

    def client(name: str) -> None:
        # 4 KiB chunks: a 29 KB package is 8 chunks, so cuts land mid-stream and resumes matter; a
        # connection of its own (gRPC would share one between channels to the same target), as if each
        # client ran on its own node
        with Connection(
            proxy.target,
            tokens[name],
            timeout=30,
            retries=10,
            backoff=0.05,
            chunk_size=4096,
            channel_options=OWN_CONNECTION,
        ) as conn:
            for u, package in enumerate(data[name]):
                upload_id = f"{name}-u{u:02d}"
                try:
                    receipt = conn.upload(package, upload_id, f"task-{u:02d}", u, fm.digest)
                except Exception as exc:  # counted: the test fails on any lost upload
                    with lock:
                        errors.append(f"{upload_id}: {exc!r}")
                    continue
                with lock:
                    receipts[upload_id] = receipt

    try:
        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=1800)
        upload_s = time.monotonic() - started
        cuts, connections = proxy.cuts, proxy.connections
        with Connection(server.target, admin) as conn:
            status = wait_for_drain(conn, timeout=1800)
        total_s = time.monotonic() - started
    finally:
        proxy.close()
        assert server.stop() == 0, server.log_tail()

    jobs = {j.upload_id: j for j in status.jobs}
    states = Counter(pb.JobState.Name(j.state) for j in status.jobs)
    resumed = sum(1 for _, r in accepted(tmp_path / "server.log").values() if r > 0)
    recovered = sum(r.duplicate for r in receipts.values())
    print(
        f"\nsoak: {CLIENTS} clients x {UPLOADS} uploads, {connections} connections, {cuts} cut by the proxy; "
        f"{len(receipts)} receipts ({recovered} recovered after a lost reply), {resumed} uploads resumed "
        f"mid-package; jobs {dict(states)}; global head v{status.global_version}; "
        f"uploads took {upload_s:.1f}s, until the queue drained {total_s:.1f}s"
    )
    assert not errors, errors[:5]
    assert len(receipts) == CLIENTS * UPLOADS
    # nothing lost, nothing doubled: exactly one job per accepted upload, and the receipts name it
    assert len(status.jobs) == len(jobs) == CLIENTS * UPLOADS
    assert all(jobs[uid].job_id == r.job_id for uid, r in receipts.items())
    assert set(states) <= {"JOB_STATE_DONE", "JOB_STATE_SUPERSEDED"}, states
    # each job either distilled once (one global head version per DONE job) or superseded by a newer
    # job of its own client
    assert status.global_version == states["JOB_STATE_DONE"]
    by_id = {j.job_id: j for j in status.jobs}
    for job in status.jobs:
        if job.state == pb.JOB_STATE_SUPERSEDED:
            newer = by_id[int(SUPERSEDED_BY.fullmatch(job.message)[1])]  # type: ignore[index]
            assert newer.client_id == job.client_id and newer.job_id > job.job_id, job
    done_per_client = Counter(j.client_id for j in status.jobs if j.state == pb.JOB_STATE_DONE)
    assert {c.client_id: c.personal_version for c in status.clients} == dict(done_per_client)
    assert all(jobs[f"{name}-u{UPLOADS - 1:02d}"].state == pb.JOB_STATE_DONE for name in names)
    assert all(held_parts(state, name) == {} for name in names)  # no unfinished upload left behind
    assert cuts > CLIENTS  # the proxy really did break connections
