"""Faults with real processes: kill -9 of the server or a client mid-upload, connections cut mid-stream."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.cluster import start_client
from common.fm import FoundationModel, file_sha256
from common.package import decode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.checkpoint import CheckpointStore
from fcl_client.connection import CHUNK_SIZE, Connection
from tests.faultproxy import DOWN, UP, FaultProxy
from tests.servers import accepted, enroll, held_parts, package_bytes, serve, wait_until

KB = 1024


def spy(conn: Connection, rpc: str, offset_of: Callable[[Any], int]) -> list[int]:
    """Record the offset each call of `rpc` asks for (UploadHeader.offset, GetFoundationModel offset)."""
    offsets: list[int] = []
    real = getattr(conn.stub, rpc)

    def call(request: Any, **kwargs: Any) -> Any:
        if rpc == "UploadKnowledge":
            request = iter(request)
            first = next(request)
            offsets.append(offset_of(first))
            return real(_chain(first, request), **kwargs)
        offsets.append(offset_of(request))
        return real(request, **kwargs)

    setattr(conn.stub, rpc, call)
    return offsets


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def check_heads_intact(
    conn: Connection, scope: pb.HeadScope.ValueType, versions: int, jobs: list[int]
) -> None:
    """Every version 1..n downloads (size and sha256 verified), decodes, and names the job that made it."""
    for version, job_id in zip(range(1, versions + 1), jobs, strict=True):
        header, blob = conn.get_knowledge(scope, version)
        assert header.version == version and header.job_id == job_id, header
        assert decode_package(blob).kind == "head"


def test_server_killed_mid_upload_restarts_and_the_upload_completes_once(
    tmp_path: Path, fm: FoundationModel
) -> None:
    state = tmp_path / "state"
    token, admin = enroll(state, "client-0"), enroll(state, "ops", admin=True)
    data = [package_bytes(fm, [f"label_{i}" for i in range(8)], "mlp:512"), package_bytes(fm, ["x_1", "x_2"])]
    server = serve(state, tmp_path / "server-1.log", tmp_path)
    proxy = FaultProxy(server.port)
    proxy.rate[UP] = 256 * KB  # bytes/s: ~3 s for the 0.8 MB package, so the kill lands mid-stream
    receipts: list[pb.UploadReceipt] = []

    def upload() -> None:
        with Connection(proxy.target, token, chunk_size=64 * KB, retries=8) as conn:
            receipts.append(conn.upload(data[0], "upload-1", "task-00", 0, fm.digest))

    uploader = threading.Thread(target=upload)
    try:
        uploader.start()
        wait_until(lambda: held_parts(state, "client-0").get("upload-1", 0) >= 128 * KB, "bytes arrive")
        server.kill()
        held = held_parts(state, "client-0")["upload-1"]  # what survived the kill -9
        assert 0 < held < len(data[0])
        server = serve(state, tmp_path / "server-2.log", tmp_path)
        proxy.upstream_port, proxy.rate[UP] = server.port, None
        uploader.join(timeout=180)
        assert receipts, "the upload did not complete after the restart"
        with Connection(server.target, token) as conn:
            first = conn.watch_job(receipts[0].job_id, timeout=300)
            receipts.append(conn.upload(data[1], "upload-2", "task-01", 1, fm.digest))
            second = conn.watch_job(receipts[1].job_id, timeout=300)
            check_heads_intact(conn, pb.HEAD_SCOPE_PERSONAL, 2, [r.job_id for r in receipts])
        with Connection(server.target, admin) as conn:
            status = conn.status()
            check_heads_intact(conn, pb.HEAD_SCOPE_GLOBAL, 2, [r.job_id for r in receipts])
    finally:
        proxy.close()
        assert server.stop() == 0, server.log_tail()
    assert receipts[0].size == len(data[0]) and receipts[0].sha256 == hashlib.sha256(data[0]).hexdigest()
    assert accepted(tmp_path / "server-2.log")["upload-1"] == (len(data[0]), held)  # resumed, not restarted
    assert first.state == second.state == pb.JOB_STATE_DONE, (first, second)
    assert sorted((j.upload_id, j.state) for j in status.jobs) == [
        ("upload-1", pb.JOB_STATE_DONE),
        ("upload-2", pb.JOB_STATE_DONE),
    ]  # one job per accepted upload, each distilled once
    assert status.global_version == 2 and (first.global_version, second.global_version) == (1, 2)
    assert held_parts(state, "client-0") == {}  # nothing half-received is left behind


def test_client_killed_mid_upload_resumes_without_repeating_or_skipping_a_task(
    tmp_path: Path, small_split: Path
) -> None:
    state = tmp_path / "state"
    token, admin = enroll(state, "client-0"), enroll(state, "ops", admin=True)
    server = serve(state, tmp_path / "server.log", tmp_path)
    proxy = FaultProxy(server.port)
    # the ~1.9 MB package (mlp:1024 and statistics) is two upload chunks; the first takes ~8 s to pass,
    # the second ~7 s more, so the kill lands after the server holds one chunk and before it has all
    proxy.rate[UP] = 128 * KB
    work, stream = tmp_path / "work", small_split / "clients" / "client-0"
    args = (proxy.target, "client-0", token, stream, "mlp:1024", work)
    try:
        first = start_client(*args, tmp_path / "client-1.log", "--epochs", "1")
        try:
            wait_until(
                lambda: max(held_parts(state, "client-0").values(), default=0) >= CHUNK_SIZE, "mid-upload"
            )
        finally:
            # the node goes down, and its link with it (else the kernel would still deliver what the
            # killed process had written to its socket, and the upload might complete without it)
            proxy.cut_all()
            first.kill()
            first.wait()
        wait_until(
            lambda: "stream ended holding" in (tmp_path / "server.log").read_text(), "the server saw it"
        )
        ((upload_id, held),) = held_parts(state, "client-0").items()
        proxy.rate[UP] = None
        second = start_client(*args, tmp_path / "client-2.log", "--epochs", "1")
        assert second.wait(timeout=600) == 0, (tmp_path / "client-2.log").read_text()
        with Connection(server.target, admin) as conn:
            status = conn.status()
    finally:
        proxy.close()
        assert server.stop() == 0, server.log_tail()
    jobs = sorted(status.jobs, key=lambda j: j.task_index)
    assert [(j.task_index, j.state) for j in jobs] == [(0, pb.JOB_STATE_DONE), (1, pb.JOB_STATE_DONE)]
    assert jobs[0].upload_id == upload_id  # the restarted client finished the upload it had begun
    size, resumed = accepted(tmp_path / "server.log")[upload_id]
    assert resumed == held > 0 and size > held  # ... from the bytes the server held, not from 0
    log_1, log_2 = ((tmp_path / f"client-{i}.log").read_text() for i in (1, 2))
    assert log_1.count("trained small model") == 1 and "uploaded" not in log_1
    assert log_2.count("trained small model") == 1  # task 0 was not trained again, task 1 was
    assert log_2.count("uploaded") == 2 and "finished 2 tasks" in log_2
    progress, _ = CheckpointStore(work).load()
    records = json.loads((work / "metrics.json").read_text())
    assert progress.task_index == 2 and [r["task_index"] for r in records] == [0, 1]


def test_cut_connections_resume_the_upload_and_the_fm_download_from_their_offsets(
    tmp_path: Path, fm: FoundationModel
) -> None:
    state = tmp_path / "state"
    token = enroll(state, "client-0")
    server = serve(state, tmp_path / "server.log", tmp_path)
    data = package_bytes(fm, [f"label_{i}" for i in range(8)], "mlp:1024")  # ~1.6 MB
    cut_up = 600 * KB
    try:
        with FaultProxy(server.port) as proxy, Connection(proxy.target, token, chunk_size=64 * KB) as conn:
            uploads = spy(conn, "UploadKnowledge", lambda first: first.header.offset)
            # a link of 2 MB/s: the server takes chunks in as they come (an instant cut on loopback would
            # drop them all unread in gRPC's buffers, and leave nothing to resume from)
            proxy.rate[UP] = 2048 * KB
            proxy.cut_after(UP, cut_up)
            receipt = conn.upload(data, "upload-1", "task-00", 0, fm.digest)
            up_bytes, up_cuts = proxy.sent[UP], proxy.cuts

            downloads = spy(conn, "GetFoundationModel", lambda request: request.offset)
            archive_size = conn.register("client-0", "").foundation_model.archive_size
            before = proxy.sent[DOWN]
            proxy.cut_after(DOWN, archive_size // 2)
            info = conn.download_fm(tmp_path / "fm.tar")
            down_bytes = proxy.sent[DOWN] - before
    finally:
        assert server.stop() == 0, server.log_tail()
    # upload: cut once, then resumed from what the server held; a restart from 0 would need cut + all
    assert up_cuts == 1 and len(uploads) == 2 and uploads[0] == 0 and 0 < uploads[1] <= cut_up, uploads
    assert up_bytes < cut_up + len(data), (up_bytes, len(data))
    assert accepted(tmp_path / "server.log")["upload-1"] == (len(data), uploads[1])
    assert receipt.size == len(data) and not receipt.duplicate
    # FM download: the second request starts where the first stopped
    assert len(downloads) == 2 and downloads[0] == 0 and 0 < downloads[1] <= archive_size // 2, downloads
    assert down_bytes < archive_size * 1.25, (down_bytes, archive_size)  # from 0 it would be ≥ 1.5 ×
    assert (tmp_path / "fm.tar").stat().st_size == archive_size
    assert file_sha256(tmp_path / "fm.tar") == info.archive_sha256


@pytest.mark.slow
def test_real_client_rides_out_a_server_killed_mid_upload(tmp_path: Path, small_split: Path) -> None:
    """`fcl-client run` keeps going through a kill -9 and restart of the server during its upload."""
    state = tmp_path / "state"
    token, admin = enroll(state, "client-0"), enroll(state, "ops", admin=True)
    server = serve(state, tmp_path / "server-1.log", tmp_path)
    proxy = FaultProxy(server.port)
    proxy.rate[UP] = 128 * KB  # mlp:1024: two upload chunks, so the kill lands between them
    stream = small_split / "clients" / "client-0"
    client = start_client(
        proxy.target, "client-0", token, stream, "mlp:1024", tmp_path / "w", tmp_path / "c.log"
    )
    try:
        wait_until(
            lambda: max(held_parts(state, "client-0").values(), default=0) >= CHUNK_SIZE, "mid-upload", 300
        )
        server.kill()
        ((upload_id, held),) = held_parts(state, "client-0").items()
        server = serve(state, tmp_path / "server-2.log", tmp_path)
        proxy.upstream_port, proxy.rate[UP] = server.port, None
        assert client.wait(timeout=600) == 0, (tmp_path / "c.log").read_text()
        with Connection(server.target, admin) as conn:
            status = conn.status()
    finally:
        client.kill()
        proxy.close()
        assert server.stop() == 0, server.log_tail()
    jobs = sorted(status.jobs, key=lambda j: j.task_index)
    assert [(j.task_index, j.state) for j in jobs] == [(0, pb.JOB_STATE_DONE), (1, pb.JOB_STATE_DONE)]
    assert jobs[0].upload_id == upload_id and accepted(tmp_path / "server-2.log")[upload_id][1] == held
    assert status.global_version == 2
