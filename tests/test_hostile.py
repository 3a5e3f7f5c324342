"""Availability under hostile clients (issue 12), against a real `fcl-server serve` process.

Idle streams of every kind (KINDS) held open by a hostile client must not stall an honest client's
calls; an fcl.v1 stream without a token is refused before it may wait; state-dir growth per call stays
bounded. TestStreamOptions runs a second server with small stream bounds (--stream-idle-s,
--max-streams-per-client, --max-anonymous-streams) and checks that each one bites.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from benchmarks.cluster import ServerProcess
from benchmarks.perf.hostile import (
    KINDS,
    Honest,
    IdleStreams,
    bearer,
    dir_bytes,
    fake_header,
    fresh_channel,
    hostile_clients,
    open_kind,
    prepare,
    queue_watched_job,
    serving,
)
from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_client.connection import Connection
from tests.servers import enroll, package_bytes, serve

WORKERS = 4
STREAMS = 4 * WORKERS  # idle streams of one kind a hostile client opens
CALL_TIMEOUT_S = 5.0  # each honest call: an idle server answers in milliseconds
HONEST = ("check", "register", "upload", "status")
# kinds whose streams stay open for the whole test on any server (a refusal or an early end would make
# the test prove nothing): at least one of them must still be open when the honest calls are done
STAY_OPEN = {"health_watch", "reflection", "upload_header", "fm_unread"}
MIB = 1024 * 1024


@dataclass
class Setup:
    server: ServerProcess
    state: Path
    tokens: dict[str, str]
    admin: str
    package: bytes = field(repr=False)
    fm_digest: str

    @property
    def target(self) -> str:
        return self.server.target


def stop(server: ServerProcess) -> None:
    code = server.stop(timeout=60)
    assert code == 0, f"fcl-server exited {code}:\n{server.log_tail()}"


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[Setup]:
    """One server (--max-workers 4) for the module; hostile-0 has a personalised head to stream."""
    tmp = tmp_path_factory.mktemp("hostile")
    state = tmp / "state"
    tokens = {name: enroll(state, name) for name in ("honest", "metrics", "bounds")}
    tokens.update(hostile_clients(state))
    admin = enroll(state, "ops", admin=True)
    package = package_bytes(fm, ["open_door", "close_door"])
    server = serve(state, tmp / "server.log", tmp, "--max-workers", str(WORKERS))
    try:
        prepare(server.target, tokens, package, fm.digest)
        yield Setup(server, state, tokens, admin, package, fm.digest)
    finally:
        stop(server)


def honest_round(setup: Setup) -> dict[str, tuple[float, str]]:
    """Health Check, Register, an upload and GetStatus at once, each with its own deadline."""
    token = setup.tokens["honest"]
    honest = Honest(
        setup.target, token, "honest", setup.admin, setup.package, setup.fm_digest, CALL_TIMEOUT_S
    )
    try:
        with ThreadPoolExecutor(len(HONEST)) as pool:
            return dict(zip(HONEST, pool.map(honest.call, HONEST), strict=True))
    finally:
        honest.close()


# -- idle streams ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_idle_streams_leave_every_other_call_served(hostile_server: Setup, kind: str) -> None:
    setup = hostile_server
    assert serving(setup.target, 60), f"the server does not answer health Check before the test:\n{kind}"
    job_id = 0
    if kind == "watch_job":
        job_id = queue_watched_job(setup.target, setup.tokens, setup.package, setup.fm_digest)
    streams = IdleStreams(setup.target)
    try:
        open_kind(streams, kind, STREAMS, setup.tokens, setup.fm_digest, job_id)
        time.sleep(0.5)  # not an assertion: the server takes the streams in before the honest calls
        results = honest_round(setup)
        outcomes = streams.outcomes()[kind]
    finally:
        streams.close()
    failed = {
        what: f"{outcome} after {took:.1f}s" for what, (took, outcome) in results.items() if outcome != "OK"
    }
    assert not failed, (
        f"with {STREAMS} idle {kind} streams open (--max-workers {WORKERS}; the streams: {outcomes}), "
        f"honest calls failed: {failed}"
    )
    if kind in STAY_OPEN:
        assert outcomes.get("open", 0) > 0, f"no {kind} stream stayed open, so nothing was tested: {outcomes}"
    assert serving(setup.target, 60), "the server does not answer health Check after the streams closed"


# -- authentication before any message -----------------------------------------------------------------
def _nothing(release: threading.Event) -> Iterator[pb.UploadKnowledgeRequest]:
    """A request stream that sends no message until `release` is set."""
    release.wait(30)
    yield from ()


STREAMS_WITH_AUTH: dict[str, Callable[[fcl_pb2_grpc.FclServiceStub, Any, threading.Event], Any]] = {
    "upload_no_message": lambda stub, md, release: stub.UploadKnowledge.future(
        _nothing(release), timeout=30, metadata=md
    ),
    "watch_job": lambda stub, md, _: stub.WatchJob(pb.WatchJobRequest(job_id=1), timeout=30, metadata=md),
    "get_fm": lambda stub, md, _: stub.GetFoundationModel(
        pb.GetFoundationModelRequest(), timeout=30, metadata=md
    ),
    "get_knowledge": lambda stub, md, _: stub.GetKnowledge(pb.GetKnowledgeRequest(), timeout=30, metadata=md),
}


@pytest.mark.parametrize("token", ["", "fcl_not-a-token"], ids=["no_token", "unknown_token"])
@pytest.mark.parametrize("rpc", list(STREAMS_WITH_AUTH))
def test_a_stream_without_a_valid_token_is_refused_at_once(
    hostile_server: Setup, rpc: str, token: str
) -> None:
    release = threading.Event()
    with fresh_channel(hostile_server.target) as channel:
        call = STREAMS_WITH_AUTH[rpc](fcl_pb2_grpc.FclServiceStub(channel), bearer(token), release)
        try:
            ended = call.exception(timeout=5.0)
        except grpc.FutureTimeoutError:
            ended = None
        finally:
            release.set()
            call.cancel()
    assert ended is not None, f"{rpc} with {token or 'no token'} was not refused within 5 s"
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED, (rpc, ended.code())


# -- state-dir growth -------------------------------------------------------------------------------------
def _quiet(setup: Setup, timeout: float = 180.0) -> None:
    """Wait until no job is queued or running, so the worker writes no heads while growth is measured."""
    deadline = time.monotonic() + timeout
    with Connection(setup.target, setup.admin) as conn:
        while (left := conn.status(max_jobs=1000)).queue_depth or any(
            j.state == pb.JOB_STATE_RUNNING for j in left.jobs
        ):
            assert time.monotonic() < deadline, f"jobs still queued after {timeout:.0f}s: {left.queue_depth}"
            time.sleep(0.2)


def test_many_reports_with_huge_fields_grow_the_state_dir_boundedly(hostile_server: Setup) -> None:
    setup = hostile_server
    _quiet(setup)
    before = dir_bytes(setup.state)
    codes: dict[str, int] = {}
    with fresh_channel(setup.target) as channel:
        stub = fcl_pb2_grpc.FclServiceStub(channel)
        for i in range(64):
            request = pb.ReportMetricsRequest(task_key="k" * MIB, task_index=i, metrics={"small/acc": 0.5})
            try:
                stub.ReportMetrics(request, timeout=30, metadata=bearer(setup.tokens["metrics"]))
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1
    grown = dir_bytes(setup.state) - before
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
    assert grown <= 8 * MIB, (
        f"64 reports with a 1 MiB task_key ({codes}) grew the state dir by {grown:,} bytes"
    )


def _oversized(setup: Setup) -> dict[str, Callable[[fcl_pb2_grpc.FclServiceStub], Any]]:
    big, token = "x" * MIB, bearer(setup.tokens["bounds"])
    header = fake_header(setup.fm_digest, 1000)
    header.upload_id = big

    def upload(stub: fcl_pb2_grpc.FclServiceStub) -> Any:
        return stub.UploadKnowledge(
            iter([pb.UploadKnowledgeRequest(header=header)]), timeout=5, metadata=token
        )

    return {
        "register_client_id": lambda s: s.Register(
            pb.RegisterRequest(client_id=big), timeout=5, metadata=token
        ),
        "register_spec": lambda s: s.Register(
            pb.RegisterRequest(client_id="bounds", model_spec_json=big), timeout=5, metadata=token
        ),
        "fm_sha": lambda s: next(
            s.GetFoundationModel(pb.GetFoundationModelRequest(archive_sha256=big), timeout=5, metadata=token)
        ),
        "upload_id": upload,
        "upload_status": lambda s: s.GetUploadStatus(
            pb.GetUploadStatusRequest(upload_id=big), timeout=5, metadata=token
        ),
        "knowledge_client": lambda s: next(
            s.GetKnowledge(pb.GetKnowledgeRequest(client_id=big), timeout=5, metadata=token)
        ),
        "metric_name": lambda s: s.ReportMetrics(
            pb.ReportMetricsRequest(task_key="t", metrics={big: 1.0}), timeout=5, metadata=token
        ),
    }


OVERSIZED = (
    "register_client_id",
    "register_spec",
    "fm_sha",
    "upload_id",
    "upload_status",
    "knowledge_client",
    "metric_name",
)


@pytest.mark.parametrize("what", OVERSIZED)
def test_a_1_mib_field_gets_a_clear_answer(hostile_server: Setup, what: str) -> None:
    """Light process-level check (tests/test_bounds.py has the in-process bounds): a prompt, deliberate
    answer, never a crash, a hang or an internal error, and the server keeps serving."""
    with fresh_channel(hostile_server.target) as channel:
        try:
            _oversized(hostile_server)[what](fcl_pb2_grpc.FclServiceStub(channel))
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    bad = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert code not in bad | {grpc.StatusCode.UNAVAILABLE}, f"a 1 MiB {what}: {code}"
    assert serving(hostile_server.target, 30), f"the server stopped answering after a 1 MiB {what}"


# -- the serve options of issue 12 -----------------------------------------------------------------------
IDLE_S = 3
OPTIONS = ("--stream-idle-s", str(IDLE_S), "--max-streams-per-client", "2", "--max-anonymous-streams", "4")


@pytest.fixture(scope="class")
def options_server(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("hostile-options")
    state = tmp / "state"
    tokens = {name: enroll(state, name) for name in ("idle", "busy", "capped")}
    try:
        server = serve(state, tmp / "server.log", tmp, "--max-workers", str(WORKERS), *OPTIONS)
    except RuntimeError as exc:
        pytest.fail(f"fcl-server serve {' '.join(OPTIONS)} did not start (options of issue 12): {exc}"[:2000])
    try:
        yield Setup(server, state, tokens, "", package_bytes(fm, ["open_door", "close_door"]), fm.digest)
    finally:
        stop(server)


class TestStreamOptions:
    """Needs --stream-idle-s, --max-streams-per-client and --max-anonymous-streams (issue 12)."""

    def test_an_idle_stream_is_ended_and_a_slow_moving_one_is_not(self, options_server: Setup) -> None:
        setup = options_server
        data = setup.package
        step = len(data) // 5 + 1

        def slow() -> Iterator[pb.UploadKnowledgeRequest]:  # a message every IDLE_S / 3 s, 5 chunks
            header = fake_header(setup.fm_digest, len(data))
            header.sha256 = hashlib.sha256(data).hexdigest()
            yield pb.UploadKnowledgeRequest(header=header)
            for start in range(0, len(data), step):
                time.sleep(IDLE_S / 3)
                yield pb.UploadKnowledgeRequest(chunk=data[start : start + step])

        with IdleStreams(setup.target) as streams, fresh_channel(setup.target) as channel:
            streams.open("upload_header", 1, setup.tokens["idle"], fm_digest=setup.fm_digest)
            (_, idle), started = streams.calls[0], time.monotonic()
            moving = fcl_pb2_grpc.FclServiceStub(channel).UploadKnowledge.future(
                slow(), timeout=60, metadata=bearer(setup.tokens["busy"])
            )
            failed = moving.exception(timeout=60)
            assert failed is None, f"an upload sending a message every {IDLE_S / 3:.0f}s failed: {failed}"
            assert moving.result().size == len(data)
            try:
                ended = idle.exception(timeout=max(0.0, started + IDLE_S + 7 - time.monotonic()))
            except grpc.FutureTimeoutError:
                pytest.fail(f"a header-only upload stream was still open after {IDLE_S + 7}s")
            took = idle_ended - started if (idle_ended := streams.ended_at.get(0)) else None
        assert ended is not None and ended.code() != grpc.StatusCode.OK
        assert took is not None and took >= IDLE_S * 0.8, f"ended after {took}s, before --stream-idle-s"

    def _refused_first(self, streams: IdleStreams, over: int) -> list[tuple[float, str]]:
        deadline = time.monotonic() + IDLE_S + 10
        while len(streams.ended_at) < len(streams.calls) and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = streams.ended_in_order()
        assert len(ended) == len(streams.calls), f"still open after {IDLE_S + 10}s: {streams.outcomes()}"
        # refused at once, not ended by the idle timer: the first to end, well before --stream-idle-s
        first = ended[:over]
        assert [code for _, code in first] == ["RESOURCE_EXHAUSTED"] * over, ended
        assert all(at < IDLE_S * 0.8 for at, _ in first), f"refused only after {first}s: {ended}"
        return ended

    def test_streams_over_the_per_client_cap_are_refused(self, options_server: Setup) -> None:
        setup = options_server
        with IdleStreams(setup.target) as streams:
            streams.open("upload_header", 3, setup.tokens["capped"], fm_digest=setup.fm_digest)
            self._refused_first(streams, over=1)

    def test_anonymous_streams_over_the_cap_are_refused_and_slots_come_back(
        self, options_server: Setup
    ) -> None:
        setup = options_server
        with IdleStreams(setup.target) as streams:
            streams.open("health_watch", 2)
            for _, call in streams.calls:  # a client sees a stream end only once it read what came before
                assert next(call).status == health_pb2.HealthCheckResponse.SERVING
            streams.open("reflection", 3)
            self._refused_first(streams, over=1)
        deadline = time.monotonic() + 10  # the server may take a moment to count the ended streams out
        with ThreadPoolExecutor(4) as pool:
            while True:
                with IdleStreams(setup.target) as again:
                    again.open("health_watch", 4)
                    answers = [pool.submit(next, call) for _, call in again.calls]
                    try:  # each Watch answers its first status at once
                        firsts = [answer.result(timeout=5).status for answer in answers]
                        break
                    except grpc.RpcError as exc:
                        assert time.monotonic() < deadline, f"anonymous slots did not come back: {exc.code()}"
                    except TimeoutError:
                        pytest.fail("a health Watch within the anonymous cap sent no first answer in 5 s")
                time.sleep(0.2)
        assert len(firsts) == 4
