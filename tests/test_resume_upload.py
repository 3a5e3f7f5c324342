"""Resumable uploads: the server keeps a broken stream's bytes, reports them, and takes only the rest."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_client.connection import Connection
from fcl_server.app import RunningServer
from fcl_server.blobs import BlobStore
from fcl_server.errors import Aborted
from fcl_server.partials import PartialMeta, PartialUploads, PartialWriter
from fcl_server.service import FclService
from fcl_server.servicer import FclServicer
from tests.servers import inprocess_server, package_bytes

CHUNK = 64 * 1024
MD = (("authorization", "Bearer tok-alice"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[RunningServer]:
    running = inprocess_server(tmp_path_factory.mktemp("resume"), fm, uploads_per_minute=0)
    running.worker.stop()  # jobs stay queued: these tests are about receiving bytes
    running.state.add_token("tok-alice", "alice", False)
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="module")
def data(fm: FoundationModel) -> bytes:
    return package_bytes(fm, [f"label_{i}" for i in range(4)], "mlp:512")  # ~0.8 MB: 13 chunks


@pytest.fixture
def stub(server: RunningServer) -> Iterator[fcl_pb2_grpc.FclServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield fcl_pb2_grpc.FclServiceStub(channel)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stream(
    data: bytes, upload_id: str, offset: int = 0, end: int | None = None, **header: Any
) -> Iterator[Any]:
    """Header (describing all of `data`), then the chunks of data[offset:end]."""
    fields: dict[str, Any] = dict(upload_id=upload_id, task_key="task-00", fm_digest="", offset=offset)
    fields.update(size=len(data), sha256=sha(data), **header)
    yield pb.UploadKnowledgeRequest(header=pb.UploadHeader(**fields))
    stop = len(data) if end is None else end
    for start in range(offset, stop, CHUNK):
        yield pb.UploadKnowledgeRequest(chunk=data[start : min(start + CHUNK, stop)])


def send(stub: fcl_pb2_grpc.FclServiceStub, messages: Iterator[Any], fm: FoundationModel) -> pb.UploadReceipt:
    def with_digest() -> Iterator[Any]:
        for msg in messages:
            if msg.HasField("header"):
                msg.header.fm_digest = fm.digest
            yield msg

    return stub.UploadKnowledge(with_digest(), metadata=MD, timeout=30)


def status(stub: fcl_pb2_grpc.FclServiceStub, upload_id: str) -> pb.UploadStatus:
    return stub.GetUploadStatus(pb.GetUploadStatusRequest(upload_id=upload_id), metadata=MD, timeout=30)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    assert isinstance(exc.value, grpc.Call)
    return exc.value.code()


def spy_offsets(conn: Connection) -> list[int]:
    """Record UploadHeader.offset of every UploadKnowledge call the connection makes."""
    offsets: list[int] = []
    real = conn.stub.UploadKnowledge

    def spy(requests: Iterator[Any], **kwargs: Any) -> Any:
        requests = iter(requests)
        first = next(requests)
        offsets.append(first.header.offset)
        return real(_chain(first, requests), **kwargs)

    conn.stub.UploadKnowledge = spy  # type: ignore[method-assign]
    return offsets


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def test_short_stream_is_kept_unaccepted_and_the_rest_completes_it(
    server: RunningServer, stub: fcl_pb2_grpc.FclServiceStub, fm: FoundationModel, data: bytes
) -> None:
    half = 5 * CHUNK
    assert (
        code_of(lambda: send(stub, stream(data, "short-1", end=half), fm)) == grpc.StatusCode.INVALID_ARGUMENT
    )
    held = status(stub, "short-1")
    assert (held.committed_size, held.size, held.sha256, held.complete) == (half, len(data), sha(data), False)
    assert server.state.find_upload("alice", "short-1") is None  # held bytes are never an accepted upload
    assert not any(j.upload_id == "short-1" for j in server.state.jobs())

    receipt = send(stub, stream(data, "short-1", offset=half), fm)
    assert not receipt.duplicate and receipt.size == len(data) and receipt.sha256 == sha(data)
    assert server.service.blobs.read(sha(data)) == data
    assert [j.job_id for j in server.state.jobs() if j.upload_id == "short-1"] == [receipt.job_id]
    done = status(stub, "short-1")
    assert done.complete and done.receipt.job_id == receipt.job_id
    assert not list(
        (server.state_dir / "partial-uploads" / "alice").glob("short-1.*")
    )  # dropped when complete


def test_broken_stream_resumes_from_what_the_server_holds(
    server: RunningServer, stub: fcl_pb2_grpc.FclServiceStub, fm: FoundationModel, data: bytes
) -> None:
    def breaks() -> Iterator[Any]:
        messages = stream(data, "broken-1", end=4 * CHUNK)
        yield from messages
        time.sleep(0.5)  # let the server take the chunks in, then the client side fails mid-stream
        raise ConnectionError("link down")

    code_of(lambda: send(stub, breaks(), fm))
    deadline = time.monotonic() + 10
    while status(stub, "broken-1").committed_size < 4 * CHUNK and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status(stub, "broken-1").committed_size == 4 * CHUNK

    with Connection(f"127.0.0.1:{server.port}", "tok-alice", chunk_size=CHUNK) as conn:
        offsets = spy_offsets(conn)
        receipt = conn.upload(data, "broken-1", "task-00", 0, fm.digest)
    assert offsets == [4 * CHUNK]  # only the rest was sent
    assert not receipt.duplicate and server.service.blobs.read(receipt.sha256) == data


def test_a_resume_must_continue_the_bytes_held(
    stub: fcl_pb2_grpc.FclServiceStub, fm: FoundationModel, data: bytes
) -> None:
    assert (
        code_of(lambda: send(stub, stream(data, "res-1", end=2 * CHUNK), fm))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    past = stream(data, "res-1", offset=3 * CHUNK)
    assert code_of(lambda: send(stub, past, fm)) == grpc.StatusCode.ABORTED
    other = data[:-1] + bytes([data[-1] ^ 1])
    # the id is bound to the package its first header named: other bytes are refused, resumed or not
    for offset in (CHUNK, 0):
        refused = stream(other, "res-1", offset=offset)
        assert code_of(lambda: send(stub, refused, fm)) == grpc.StatusCode.FAILED_PRECONDITION  # noqa: B023
    beyond = stream(data, "res-1", offset=len(data) + 1)
    assert code_of(lambda: send(stub, beyond, fm)) == grpc.StatusCode.INVALID_ARGUMENT
    assert status(stub, "res-1").committed_size == 2 * CHUNK  # refused resumes leave the bytes alone
    # offset 0 starts the same package over, dropping the bytes held
    assert (
        code_of(lambda: send(stub, stream(data, "res-1", end=CHUNK), fm)) == grpc.StatusCode.INVALID_ARGUMENT
    )
    held = status(stub, "res-1")
    assert (held.committed_size, held.sha256) == (CHUNK, sha(data))


def test_damaged_held_bytes_are_dropped_and_the_upload_starts_over(
    server: RunningServer, stub: fcl_pb2_grpc.FclServiceStub, fm: FoundationModel, data: bytes
) -> None:
    send_short = lambda: send(stub, stream(data, "dmg-1", end=3 * CHUNK), fm)  # noqa: E731
    assert code_of(send_short) == grpc.StatusCode.INVALID_ARGUMENT
    part = server.state_dir / "partial-uploads" / "alice" / "dmg-1.part"
    damaged = bytearray(part.read_bytes())
    damaged[100] ^= 0xFF  # e.g. a torn write after a power cut
    part.write_bytes(bytes(damaged))
    with Connection(f"127.0.0.1:{server.port}", "tok-alice", chunk_size=CHUNK, backoff=0.01) as conn:
        offsets = spy_offsets(conn)
        receipt = conn.upload(data, "dmg-1", "task-00", 0, fm.digest)
    assert offsets == [3 * CHUNK, 0]  # the resume was refused (ABORTED), the retry sent everything
    assert server.service.blobs.read(receipt.sha256) == data


def test_resuming_is_not_charged_as_a_new_upload(tmp_path: Path, fm: FoundationModel, data: bytes) -> None:
    running = inprocess_server(tmp_path, fm, uploads_per_minute=1)
    try:
        running.worker.stop()
        running.state.add_token("tok-alice", "alice", False)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = fcl_pb2_grpc.FclServiceStub(channel)
            short = stream(data, "rate-1", end=CHUNK)
            assert code_of(lambda: send(stub, short, fm)) == grpc.StatusCode.INVALID_ARGUMENT
            assert not send(stub, stream(data, "rate-1", offset=CHUNK), fm).duplicate
            fresh = stream(data, "rate-2")
            assert code_of(lambda: send(stub, fresh, fm)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(grace=1)


class _ServerWithoutResumption(FclServicer):
    """A server from before resumable uploads: GetUploadStatus is UNIMPLEMENTED."""

    GetUploadStatus = fcl_pb2_grpc.FclServiceServicer.GetUploadStatus  # type: ignore[assignment]


def test_client_uploads_to_a_server_without_resumption(
    server: RunningServer, fm: FoundationModel, data: bytes
) -> None:
    async def start_old() -> tuple[grpc.aio.Server, int]:  # on the server's loop, beside it
        old = grpc.aio.server()
        servicer = _ServerWithoutResumption(server.service, server.executor)
        fcl_pb2_grpc.add_FclServiceServicer_to_server(servicer, old)
        port = old.add_insecure_port("127.0.0.1:0")
        await old.start()
        return old, port

    old, port = server.loop.run(start_old())
    try:
        with Connection(f"127.0.0.1:{port}", "tok-alice", retries=0) as conn:
            offsets = spy_offsets(conn)
            receipt = conn.upload(data, "old-1", "task-00", 0, fm.digest)
            again = conn.upload(data, "old-1", "task-00", 0, fm.digest)
    finally:
        server.loop.run(old.stop(0))
    assert offsets == [0, 0] and not receipt.duplicate and again.duplicate


# -- the partial store itself --------------------------------------------------------------------------
META = PartialMeta(size=10, sha256="a" * 64, task_key="t", task_index=0)


def test_a_newer_stream_takes_over_and_the_older_one_stops(tmp_path: Path) -> None:
    store = PartialUploads(tmp_path)
    first = store.open("c", "u", META, 0)
    first.write(b"abcd")
    second = store.open("c", "u", META, 2)  # a retry, while the server still serves the first stream
    with pytest.raises(Aborted):
        first.write(b"XX")
    second.write(b"cdefghij")
    first.close()  # the old stream ending does not disturb the new one
    second.seal(tmp_path / "sealed")
    assert (tmp_path / "sealed").read_bytes() == b"abcdefghij" and store.held("c", "u") is None


def test_idle_partials_expire_and_each_client_keeps_a_few(tmp_path: Path) -> None:
    store = PartialUploads(tmp_path, ttl_s=100.0, max_per_client=2)
    for upload_id in ("u1", "u2", "u3"):
        writer = store.open("c", upload_id, META, 0)
        writer.write(b"x")
        writer.close()
        time.sleep(0.01)  # distinct modification times
    assert [store.held("c", u) is not None for u in ("u1", "u2", "u3")] == [False, True, True]
    writer = store.open("d", "u1", META, 0)  # being written: never swept
    assert store.sweep(now=time.time() + 50) == 0
    assert store.sweep(now=time.time() + 200) == 2
    assert store.held("c", "u3") is None and store.held("d", "u1") is not None
    writer.close()
    assert store.sweep(now=time.time() + 200) == 1


def test_a_fresh_upload_skips_the_status_call_and_a_retry_asks_again(
    server: RunningServer, fm: FoundationModel, data: bytes
) -> None:
    with Connection(f"127.0.0.1:{server.port}", "tok-alice", chunk_size=CHUNK, backoff=0.01) as conn:
        asked: list[str] = []
        real_status, real_upload = conn.stub.GetUploadStatus, conn.stub.UploadKnowledge
        attempts = iter([True, False])  # the first stream breaks after 4 chunks, the retry goes through

        def status_spy(request: Any, **kwargs: Any) -> Any:
            asked.append(request.upload_id)
            return real_status(request, **kwargs)

        def upload(requests: Iterator[Any], **kwargs: Any) -> Any:
            if next(attempts):
                list(zip(range(5), requests, strict=False))  # header and 4 chunks reach nobody
                raise _unavailable()
            return real_upload(requests, **kwargs)

        conn.stub.GetUploadStatus, conn.stub.UploadKnowledge = status_spy, upload
        receipt = conn.upload(data, "fresh-1", "task-00", 0, fm.digest, fresh=True)
        assert asked == ["fresh-1"]  # not before the first attempt; before the retry, yes
        assert server.service.blobs.read(receipt.sha256) == data
        # without `fresh` the first attempt asks first (it may resume an upload begun before a restart)
        conn.upload(data, "fresh-1", "task-00", 0, fm.digest)
        assert asked == ["fresh-1", "fresh-1"]


def _unavailable() -> grpc.RpcError:
    class Unavailable(grpc.RpcError, grpc.Call):  # type: ignore[misc]
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "link down"

    return Unavailable()


def test_an_upload_is_fsynced_while_validated_and_stored_only_once_both_are_done(
    server: RunningServer,
    stub: fcl_pb2_grpc.FclServiceStub,
    fm: FoundationModel,
    data: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[tuple[str, int]] = []
    real_sync, real_validate, real_put = (
        PartialWriter.sync,
        FclService._validate_package,
        BlobStore.put_file,
    )

    def sync(self: PartialWriter) -> None:
        events.append(("sync", threading.get_ident()))
        real_sync(self)
        assert not self.fh.closed  # the fsync went through the stream's own, still open, descriptor
        events.append(("synced", threading.get_ident()))

    def validate(self: FclService, path: Path) -> None:
        time.sleep(0.05)  # a slow validation: the fsync must not wait for it to start
        events.append(("validating", threading.get_ident()))
        real_validate(self, path)

    def put_file(self: BlobStore, tmp: Path, digest: str) -> str:
        events.append(("stored", threading.get_ident()))
        return real_put(self, tmp, digest)

    monkeypatch.setattr(PartialWriter, "sync", sync)
    monkeypatch.setattr(FclService, "_validate_package", validate)
    monkeypatch.setattr(BlobStore, "put_file", put_file)
    send(stub, stream(data, "durable-1"), fm)
    names = [name for name, _ in events]
    assert names == ["sync", "synced", "validating", "stored"]
    threads = dict(events)
    assert threads["validating"] != threads["sync"]  # validated on a helper while the handler fsyncs
    # a package that fails validation is still fsynced to the end (its descriptor closes only after)
    # and never stored
    events.clear()
    garbage = b"\x08" + bytes(len(data) - 1)
    assert code_of(lambda: send(stub, stream(garbage, "durable-2"), fm)) == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in events] == ["sync", "synced", "validating"]
