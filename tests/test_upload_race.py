"""Two different packages raced under one upload id: one binds the id, and every receipt names its bytes."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_server.app import RunningServer
from tests.servers import enroll, inprocess_server, package_bytes

DELAYS_S = [0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[RunningServer]:
    running = inprocess_server(tmp_path_factory.mktemp("race"), fm, uploads_per_minute=0)
    try:
        yield running
    finally:
        running.stop(grace=1)


def _requests(data: bytes, upload_id: str, digest: str) -> Iterator[pb.UploadKnowledgeRequest]:
    sha = hashlib.sha256(data).hexdigest()
    header = pb.UploadHeader(
        upload_id=upload_id, task_key="task-00", fm_digest=digest, size=len(data), sha256=sha
    )
    yield pb.UploadKnowledgeRequest(header=header)
    for at in range(0, len(data), CHUNK):
        yield pb.UploadKnowledgeRequest(chunk=data[at : at + CHUNK])


class _Upload(threading.Thread):
    def __init__(
        self, stub: fcl_pb2_grpc.FclServiceStub, token: str, data: bytes, upload_id: str, digest: str
    ):
        super().__init__(daemon=True)
        self.stub, self.token, self.data, self.upload_id, self.digest = stub, token, data, upload_id, digest
        self.receipt: pb.UploadReceipt | None = None
        self.code: grpc.StatusCode | None = None

    def run(self) -> None:
        try:
            self.receipt = self.stub.UploadKnowledge(
                _requests(self.data, self.upload_id, self.digest),
                metadata=(("authorization", f"Bearer {self.token}"),),
                timeout=60,
            )
        except grpc.RpcError as exc:
            self.code = exc.code()


def test_racing_payloads_under_one_id_bind_it_to_one_package(
    server: RunningServer, fm: FoundationModel
) -> None:
    token = enroll(server.state_dir, "racer")
    first = package_bytes(fm, [f"label_{i}" for i in range(120)], spec="mlp:512")
    second = package_bytes(fm, [f"other_{i}" for i in range(120)], spec="mlp:512")
    assert hashlib.sha256(first).digest() != hashlib.sha256(second).digest()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = fcl_pb2_grpc.FclServiceStub(channel)
        for i, delay in enumerate(DELAYS_S):
            upload_id = f"race-{i}"
            a = _Upload(stub, token, first, upload_id, fm.digest)
            b = _Upload(stub, token, second, upload_id, fm.digest)
            a.start()
            time.sleep(delay)
            b.start()
            a.join(60)
            b.join(60)
            stored = server.state.find_upload("racer", upload_id)
            assert stored is not None, f"delay {delay}: neither upload was accepted ({a.code}, {b.code})"
            job = server.state.job(int(stored["job_id"]))
            assert job is not None and job.blob == stored["sha256"]
            winners = [u for u in (a, b) if u.receipt is not None]
            assert len(winners) == 1, f"delay {delay}: both packages got receipts for one id"
            for u in winners:
                assert u.receipt is not None
                assert (u.receipt.sha256, u.receipt.size, u.receipt.job_id) == (
                    stored["sha256"],
                    stored["size"],
                    stored["job_id"],
                ), f"delay {delay}: a receipt names bytes the job does not use"
            loser = b if winners[0] is a else a
            assert loser.code == grpc.StatusCode.FAILED_PRECONDITION, f"delay {delay}: {loser.code}"
            assert hashlib.sha256(winners[0].data).hexdigest() == stored["sha256"]
