"""Stream bounds of the asyncio server: per-client and anonymous caps, idle timeouts, honest log codes."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_client.connection import Connection
from fcl_server.app import RunningServer
from tests.servers import enroll, inprocess_server, package_bytes


@pytest.fixture()
def server(tmp_path: Path, fm: FoundationModel) -> Iterator[RunningServer]:
    running = inprocess_server(
        tmp_path,
        fm,
        max_workers=2,
        max_watchers=8,
        max_streams_per_client=2,
        max_anonymous_streams=2,
        stream_idle_s=1.0,
    )
    try:
        yield running
    finally:
        running.stop(grace=1)


def _meta(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _queued_job(server: RunningServer, fm: FoundationModel, token: str) -> int:
    """A job that stays queued (the worker is stopped), so watching it keeps a stream open."""
    assert server.worker.stop(timeout=60)
    with Connection(f"127.0.0.1:{server.port}", token) as conn:
        return conn.upload(
            package_bytes(fm, ["open_door", "close_door"]), "up-1", "task-00", 0, fm.digest
        ).job_id


def _first_event(call: grpc.Future) -> None:
    """Wait until a server stream is established (its first message arrived)."""
    next(call)  # type: ignore[call-overload]


def _health_watch(channel: grpc.Channel) -> Iterator[health_pb2.HealthCheckResponse]:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)  # type: ignore[no-any-return]


def _code(fn: object) -> grpc.StatusCode:
    try:
        fn()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    raise AssertionError("the call succeeded")


def test_a_client_holds_at_most_its_streams_and_others_are_unaffected(
    server: RunningServer, fm: FoundationModel
) -> None:
    alice, bob = enroll(server.state_dir, "alice"), enroll(server.state_dir, "bob")
    job = _queued_job(server, fm, alice)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = fcl_pb2_grpc.FclServiceStub(channel)
        held = [
            stub.WatchJob(pb.WatchJobRequest(job_id=job), metadata=_meta(alice), timeout=30) for _ in range(2)
        ]
        for call in held:
            _first_event(call)
        third = stub.WatchJob(pb.WatchJobRequest(job_id=job), metadata=_meta(alice), timeout=30)
        assert _code(lambda: list(third)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams-per-client" in third.details()
        # another client is not charged for alice's streams; alice's unary calls still go through
        assert stub.Register(pb.RegisterRequest(), metadata=_meta(bob), timeout=5).client_id == "bob"
        assert stub.Register(pb.RegisterRequest(), metadata=_meta(alice), timeout=5).client_id == "alice"
        held[0].cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the slot is free once the server saw the cancel
            again = stub.WatchJob(pb.WatchJobRequest(job_id=job), metadata=_meta(alice), timeout=30)
            try:
                _first_event(again)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.05)
        else:
            raise AssertionError("the cancelled stream's slot was never released")
        for call in (held[1], again):
            call.cancel()


def test_open_service_streams_share_one_cap_and_health_check_still_answers(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watches = [_health_watch(channel) for _ in range(2)]
        for call in watches:
            assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        over = _health_watch(channel)
        assert _code(lambda: next(over)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        assert _code(lambda: list(reflect)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        for call in watches:
            call.cancel()


def _header_then_silence(fm: FoundationModel, stop: threading.Event) -> Iterator[pb.UploadKnowledgeRequest]:
    data = package_bytes(fm, ["a", "b"])
    header = pb.UploadHeader(
        upload_id="idle-1",
        task_key="task-00",
        fm_digest=fm.digest,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    yield pb.UploadKnowledgeRequest(header=header)
    stop.wait(30)


def test_an_upload_stream_that_goes_quiet_is_ended_by_the_server(
    server: RunningServer, fm: FoundationModel
) -> None:
    token = enroll(server.state_dir, "alice")
    stop = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = fcl_pb2_grpc.FclServiceStub(channel)
        started = time.monotonic()
        try:
            code = _code(
                lambda: stub.UploadKnowledge(
                    _header_then_silence(fm, stop), metadata=_meta(token), timeout=20
                )
            )
        finally:
            stop.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 10


def test_a_reflection_stream_that_sends_nothing_is_ended(server: RunningServer) -> None:
    stop = threading.Event()

    def silence() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        stop.wait(30)
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(silence(), timeout=20)
        try:
            assert _code(lambda: list(call)) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--stream-idle-s" in call.details()
        finally:
            stop.set()


def test_a_download_the_client_never_reads_is_ended(server: RunningServer) -> None:
    token = enroll(server.state_dir, "alice")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = fcl_pb2_grpc.FclServiceStub(channel).GetFoundationModel(
            pb.GetFoundationModelRequest(), metadata=_meta(token), timeout=60
        )
        time.sleep(4)  # the FM archive is far larger than the flow-control window: the server's writes stall
        assert _code(lambda: sum(1 for _ in call)) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_no_token_is_refused_before_the_stream_waits_on_anything(server: RunningServer) -> None:
    stop = threading.Event()

    def nothing() -> Iterator[pb.UploadKnowledgeRequest]:
        stop.wait(30)
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        started = time.monotonic()
        try:
            code = _code(lambda: fcl_pb2_grpc.FclServiceStub(channel).UploadKnowledge(nothing(), timeout=20))
        finally:
            stop.set()
    assert code == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - started < 0.9  # before the idle end


def test_a_stream_the_client_cancels_is_logged_and_counted_as_cancelled(
    server: RunningServer, fm: FoundationModel, caplog: pytest.LogCaptureFixture
) -> None:
    def cancel_it(call: grpc.Future) -> None:
        _first_event(call)
        call.cancel()

    lines = _logged_watch(server, fm, caplog, 30, cancel_it)
    assert [r.levelname for r in lines] == ["INFO"] and " code=CANCELLED " in lines[0].getMessage()
    assert "peer=ipv4:127.0.0.1:" in lines[0].getMessage()
    counted = {
        code: server.metrics.registry.get_sample_value(
            "fcl_rpc_handled_total", {"service": "fcl.v1.FclService", "method": "WatchJob", "code": code}
        )
        for code in ("CANCELLED", "UNKNOWN")
    }
    assert counted == {"CANCELLED": 1.0, "UNKNOWN": None}


def _logged_watch(
    server: RunningServer,
    fm: FoundationModel,
    caplog: pytest.LogCaptureFixture,
    timeout: float,
    end: Callable[[grpc.Future], None],
) -> list[logging.LogRecord]:
    """The server's log lines of one WatchJob call on a queued job, which `end` ends."""
    token = enroll(server.state_dir, "alice")
    job = _queued_job(server, fm, token)
    with (
        caplog.at_level(logging.DEBUG, logger="fcl_server.rpc"),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        end(
            fcl_pb2_grpc.FclServiceStub(channel).WatchJob(
                pb.WatchJobRequest(job_id=job), metadata=_meta(token), timeout=timeout
            )
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _watch_lines(caplog):
            time.sleep(0.05)
    return _watch_lines(caplog)


def _watch_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "fcl_server.rpc" and r.getMessage().startswith("WatchJob ")
    ]


def test_a_call_whose_deadline_passes_is_logged_as_deadline_exceeded(
    server: RunningServer, fm: FoundationModel, caplog: pytest.LogCaptureFixture
) -> None:
    def run_out(call: grpc.Future) -> None:
        assert _code(lambda: list(call)) == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[call-overload]

    # a deadline before the server would end this watch (half of --stream-idle-s, 0.5 s)
    lines = _logged_watch(server, fm, caplog, 0.25, run_out)
    assert len(lines) == 1 and " code=DEADLINE_EXCEEDED " in lines[0].getMessage(), lines
    assert lines[0].levelname == "INFO" and "client=alice" in lines[0].getMessage()
