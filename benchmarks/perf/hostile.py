"""Availability under hostile clients (issue 12): honest calls while many idle streams are held open.

One `fcl-server serve` process. Honest latency (health Check, Register, a 1 MB upload) is measured on
an idle server, then again while a hostile client holds 4 x max-workers idle streams of each kind in
KINDS open at once; every failed honest call is counted (never raised). Then the most state-dir growth
one call can cause: a ReportMetrics with the largest fields the server accepts, and an upload stream
that sends a header and one chunk of the largest size, then breaks. The stream machinery (IdleStreams,
Honest) is shared with tests/test_hostile.py.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from benchmarks.cluster import ServerProcess, start_server
from benchmarks.cluster import issue_token as enroll
from benchmarks.perf.harness import package_of_size
from benchmarks.perf.util import MB, MIB, code_of, percentile
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_client.connection import Connection

# idle streams a hostile client can hold open, and what it sends on each
KINDS: dict[str, str] = {
    "health_watch": "grpc.health.v1.Health/Watch, no token (the first answer is read by no one)",
    "reflection": "ServerReflectionInfo, no token, no request sent",
    "watch_job": "WatchJob of the caller's queued job (the last of three queued), with its token",
    "upload_header": "UploadKnowledge sending only its header, with a token",
    "upload_header_anonymous": "UploadKnowledge sending only its header, no token",
    "fm_unread": "GetFoundationModel, with a token, never read",
    "knowledge_unread": "GetKnowledge of the caller's head, with a token, never read",
}
HONEST_CALLS = ("check", "register", "upload")
FAILED_EARLY = "failed_early"  # a call type that failed `give_up_after` times in a row is not tried again
HOLD_S = 600.0  # deadline of every hostile stream: none outlives a crashed benchmark by more than this
MAX_CHUNK_BYTES = 4 * MIB  # the largest upload chunk the server accepts (ServerLimits.max_chunk_bytes)
MAX_UPLOAD_BYTES = 64 * MIB  # the largest package size a header may announce (its default)


def fresh_channel(target: str) -> grpc.Channel:
    """A channel on a TCP connection of its own (gRPC shares one between equal channels otherwise)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def bearer(token: str) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def dir_bytes(root: Path) -> int:
    """Bytes of every file under `root` (files may vanish meanwhile: the server sweeps and renames)."""
    total = 0
    for path in root.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            continue
    return total


def serving(target: str, timeout: float) -> bool:
    """Whether health Check answers SERVING within `timeout` seconds (tried every 0.2 s, 2 s per try)."""
    deadline = time.monotonic() + timeout
    with fresh_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


class IdleStreams:
    """A hostile client's idle streams, `per_channel` on each of its own channels, held until close()."""

    def __init__(self, target: str, per_channel: int = 4) -> None:
        self.target = target
        self.per_channel = per_channel
        self.release = threading.Event()  # request iterators block on it: they send nothing more
        self.calls: list[tuple[str, Any]] = []
        self.ended_at: dict[int, float] = {}  # index in `calls` → monotonic time its call ended
        self._channels: list[grpc.Channel] = []
        self._on_channel = per_channel
        self.started = time.monotonic()

    def _channel(self) -> grpc.Channel:
        if self._on_channel >= self.per_channel:
            self._channels.append(fresh_channel(self.target))
            self._on_channel = 0
        self._on_channel += 1
        return self._channels[-1]

    def _hold(self, *first: Any) -> Iterator[Any]:
        yield from first
        self.release.wait(HOLD_S)

    def open(self, kind: str, count: int, token: str = "", job_id: int = 0, fm_digest: str = "") -> None:
        """Start `count` streams of `kind` (KINDS) and return at once: none of them is ever read."""
        for _ in range(count):
            call = self._start(kind, self._channel(), bearer(token), job_id, fm_digest)
            index = len(self.calls)
            self.calls.append((kind, call))
            call.add_done_callback(lambda _, i=index: self.ended_at.setdefault(i, time.monotonic()))

    def _start(self, kind: str, channel: grpc.Channel, metadata: Any, job_id: int, fm_digest: str) -> Any:
        fcl = fcl_pb2_grpc.FclServiceStub(channel)
        if kind == "health_watch":
            return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=HOLD_S)
        if kind == "reflection":
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            return stub.ServerReflectionInfo(self._hold(), timeout=HOLD_S)
        if kind == "watch_job":
            return fcl.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=HOLD_S, metadata=metadata)
        if kind in ("upload_header", "upload_header_anonymous"):
            first = pb.UploadKnowledgeRequest(header=fake_header(fm_digest, MB))
            anonymous = None if kind == "upload_header_anonymous" else metadata
            return fcl.UploadKnowledge.future(self._hold(first), timeout=HOLD_S, metadata=anonymous)
        if kind == "fm_unread":
            return fcl.GetFoundationModel(pb.GetFoundationModelRequest(), timeout=HOLD_S, metadata=metadata)
        if kind == "knowledge_unread":
            return fcl.GetKnowledge(pb.GetKnowledgeRequest(), timeout=HOLD_S, metadata=metadata)
        raise ValueError(f"unknown idle stream kind {kind!r}; known: {', '.join(KINDS)}")

    def outcomes(self) -> dict[str, dict[str, int]]:
        """Per kind: how many streams are still open, and how many ended with each status code."""
        counts: dict[str, Counter[str]] = {}
        for kind, call in self.calls:
            state = call.code().name if call.done() else "open"
            counts.setdefault(kind, Counter())[state] += 1
        return {kind: dict(c) for kind, c in counts.items()}

    def ended_in_order(self) -> list[tuple[float, str]]:
        """(seconds after the first stream started, status code) of the ended streams, first ended first."""
        ended = self.ended_at.items()
        return sorted((at - self.started, self.calls[i][1].code().name) for i, at in ended)

    def close(self) -> None:
        self.release.set()
        for _, call in self.calls:
            call.cancel()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> IdleStreams:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def fake_header(fm_digest: str, size: int, task_key: str = "task-0") -> pb.UploadHeader:
    """A header that passes every check of the header alone (its package is never sent)."""
    return pb.UploadHeader(
        upload_id=f"hostile-{uuid.uuid4().hex}",
        task_key=task_key,
        fm_digest=fm_digest,
        size=size,
        sha256=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
    )


@dataclass
class Honest:
    """An honest client on channels of its own: each call returns (seconds, "OK" or its status code)."""

    target: str
    token: str
    client_id: str
    admin_token: str
    package: bytes
    fm_digest: str
    timeout: float = 10.0
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        channel = fresh_channel(self.target)
        self._closers.append(channel.close)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.stub = fcl_pb2_grpc.FclServiceStub(channel)
        # Connection.upload's deadline is 5 x its timeout; no retries: a failure is measured, not hidden
        self.uploader = Connection(self.target, self.token, timeout=self.timeout / 5, retries=0)
        self._closers.append(self.uploader.close)

    def close(self) -> None:
        for close in self._closers:
            close()

    def call(self, what: str) -> tuple[float, str]:
        started = time.perf_counter()
        try:
            if what == "check":
                self.health.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
            elif what == "register":
                register = pb.RegisterRequest(client_id=self.client_id, fm_digest=self.fm_digest)
                self.stub.Register(register, timeout=self.timeout, metadata=bearer(self.token))
            elif what == "upload":
                self.uploader.upload(self.package, uuid.uuid4().hex, "task-0", 0, self.fm_digest, fresh=True)
            elif what == "status":
                status = pb.GetStatusRequest(max_jobs=1)
                self.stub.GetStatus(status, timeout=self.timeout, metadata=bearer(self.admin_token))
            else:
                raise ValueError(f"unknown honest call {what!r}")
            outcome = "OK"
        except Exception as exc:  # every failure is an outcome, never a crash of the caller
            outcome = code_of(exc)
        return time.perf_counter() - started, outcome


def queue_jobs(target: str, tokens: Sequence[str], package: bytes, fm_digest: str) -> int:
    """Each token uploads `package` once (jobs pile up in the queue); the last job's id."""
    job_id = 0
    for token in tokens:
        with Connection(target, token, timeout=30, retries=2) as conn:
            job_id = conn.upload(package, uuid.uuid4().hex, "task-0", 0, fm_digest, fresh=True).job_id
    return job_id


# the hostile client that opens each kind of stream (its token); the anonymous kinds send none.
# One client per kind: a per-client stream cap then refuses what is over it for that kind alone.
OPENER = {
    "watch_job": "hostile-watch-2",  # the owner of the last of three queued jobs
    "upload_header": "hostile-upload",
    "fm_unread": "hostile-fm",
    "knowledge_unread": "hostile-knowledge",  # has a personalised head to stream
}
WATCH_QUEUE = ("hostile-watch-0", "hostile-watch-1", "hostile-watch-2")


def hostile_clients(state: Path) -> dict[str, str]:
    """name → token of every hostile client (OPENER, WATCH_QUEUE)."""
    return {name: enroll(state, name) for name in sorted({*OPENER.values(), *WATCH_QUEUE})}


def prepare(target: str, tokens: dict[str, str], package: bytes, fm_digest: str) -> None:
    """Give the GetKnowledge opener a personalised head (its job done)."""
    token = tokens[OPENER["knowledge_unread"]]
    job_id = queue_jobs(target, [token], package, fm_digest)
    with Connection(target, token, timeout=30) as conn:
        event = conn.watch_job(job_id, timeout=300)
    if event.state != pb.JOB_STATE_DONE:
        raise RuntimeError(f"the hostile client's job ended {pb.JobState.Name(event.state)}: {event.message}")


def queue_watched_job(target: str, tokens: dict[str, str], package: bytes, fm_digest: str) -> int:
    """Three jobs queued behind each other; the last (the WatchJob opener's) waits for the other two."""
    return queue_jobs(target, [tokens[name] for name in WATCH_QUEUE], package, fm_digest)


def open_kind(
    streams: IdleStreams, kind: str, count: int, tokens: dict[str, str], fm_digest: str, job_id: int = 0
) -> None:
    """`count` streams of `kind`, each by its OPENER; WatchJob streams watch `job_id`."""
    token = tokens[OPENER[kind]] if kind in OPENER else ""
    streams.open(kind, count, token=token, job_id=job_id, fm_digest=fm_digest)


# -- the benchmark part ----------------------------------------------------------------------------------
def _series(
    honest: Honest, what: str, calls: int, give_up_after: int, seconds: list[float], outcomes: Counter[str]
) -> None:
    """`calls` sequential calls, added to `seconds` and `outcomes`; a failed call counts with the time it
    took (its deadline, when stalled)."""
    in_a_row = 0
    for done in range(calls):
        took, outcome = honest.call(what)
        seconds.append(took)
        outcomes[outcome] += 1
        in_a_row = 0 if outcome == "OK" else in_a_row + 1
        if in_a_row >= give_up_after:
            outcomes[FAILED_EARLY] += calls - done - 1
            break


class _Phase:
    """The honest calls of one condition (idle or attacked), gathered over several rounds."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {what: [] for what in HONEST_CALLS}
        self.outcomes: dict[str, Counter[str]] = {what: Counter() for what in HONEST_CALLS}

    def measure(self, honest: Honest, calls: int, give_up_after: int) -> None:
        for what in HONEST_CALLS:
            _series(honest, what, calls, give_up_after, self.seconds[what], self.outcomes[what])

    def summary(self) -> dict[str, Any]:
        out = {}
        for what in HONEST_CALLS:
            seconds, outcomes = self.seconds[what], self.outcomes[what]
            out[what] = {
                "calls": len(seconds),
                "p50_s": percentile(seconds, 50),
                "p99_s": percentile(seconds, 99),
                "max_s": max(seconds),
                "errors": sum(n for k, n in outcomes.items() if k not in ("OK", FAILED_EARLY)),
                "outcomes": dict(outcomes),
            }
        return out


def metrics_growth(target: str, token: str, state: Path) -> dict[str, Any]:
    """State-dir growth of one ReportMetrics call with the largest fields the server accepts.

    Requests are tried from the largest down (task_key length x number of metrics x metric-name
    length, each on a new task_index); the first one accepted is measured, the refused ones counted.
    """
    sizes = (4 * MIB - 64 * 1024, MIB, 64 * 1024, 4096, 128)
    counts = (256, 16, 1)
    names = (128, 64, 32)
    tries = sorted(
        ((s, c, n) for s in sizes for c in counts for n in names), key=lambda t: -t[1] * (t[0] + t[2])
    )
    refused: Counter[str] = Counter()
    with fresh_channel(target) as channel:
        stub = fcl_pb2_grpc.FclServiceStub(channel)
        for index, (size, count, name_chars) in enumerate(tries):
            metrics = {f"{'m' * (name_chars - 8)}{i:08d}": 0.5 for i in range(count)}
            request = pb.ReportMetricsRequest(task_key="k" * size, task_index=1_000 + index, metrics=metrics)
            before = dir_bytes(state)
            try:
                stub.ReportMetrics(request, timeout=120, metadata=bearer(token))
            except grpc.RpcError as exc:
                refused[code_of(exc)] += 1
                continue
            return {
                "task_key_chars": size,
                "metrics": count,
                "metric_name_chars": name_chars,
                "request_bytes": request.ByteSize(),
                "growth_bytes": dir_bytes(state) - before,
                "larger_refused": dict(refused),
            }
    return {"growth_bytes": 0, "larger_refused": dict(refused)}


def broken_upload_growth(target: str, token: str, fm_digest: str, state: Path) -> dict[str, Any]:
    """State-dir growth of one upload stream: a header of the largest size, one largest chunk, then cut."""
    release = threading.Event()
    header = fake_header(fm_digest, MAX_UPLOAD_BYTES)

    def messages() -> Iterator[pb.UploadKnowledgeRequest]:
        yield pb.UploadKnowledgeRequest(header=header)
        yield pb.UploadKnowledgeRequest(chunk=bytes(MAX_CHUNK_BYTES))
        release.wait(60)

    before = dir_bytes(state)
    with fresh_channel(target) as channel:
        call = fcl_pb2_grpc.FclServiceStub(channel).UploadKnowledge.future(
            messages(), timeout=60, metadata=bearer(token)
        )
        deadline = time.monotonic() + 30
        while not call.done() and dir_bytes(state) - before < MAX_CHUNK_BYTES and time.monotonic() < deadline:
            time.sleep(0.05)
        code = call.code().name if call.done() else "open"
        release.set()
        call.cancel()
    last, stable_since = dir_bytes(state), time.monotonic()
    deadline = time.monotonic() + 10  # until the server has seen the stream end (its size stops moving)
    while time.monotonic() < deadline and time.monotonic() - stable_since < 1.0:
        time.sleep(0.1)
        now = dir_bytes(state)
        if now != last:
            last, stable_since = now, time.monotonic()
    return {"chunk_bytes": MAX_CHUNK_BYTES, "code_before_cut": code, "growth_bytes": last - before}


def run(
    calls: int,
    max_workers: int = 8,
    streams_per_worker: int = 4,
    timeout_s: float = 10.0,
    give_up_after: int = 3,
    extra_args: Sequence[str] = (),
    rounds: int = 5,
) -> dict[str, Any]:
    """The part: honest latency idle and under attack, then growth per call; one server process."""
    streams_each = streams_per_worker * max_workers
    with tempfile.TemporaryDirectory(prefix="fcl-perf-hostile-") as tmp_dir:
        tmp = Path(tmp_dir)
        state = tmp / "state"
        honest_token, admin = enroll(state, "honest"), enroll(state, "perf-admin", admin=True)
        hostile = hostile_clients(state)
        corpus = tmp / "public.txt"
        corpus.write_text("\n".join(f"public sentence number {i} about topic {i % 7}" for i in range(64)))
        args = ["--public-corpus", str(corpus), "--uploads-per-minute", "0", "--upload-mb-per-hour", "0"]
        server: ServerProcess = start_server(
            state, tmp / "server.log", *args, "--max-workers", str(max_workers), *extra_args
        )
        honest: Honest | None = None
        try:
            target = server.target
            with Connection(target, honest_token, timeout=30) as conn:
                digest = conn.register("honest", "").foundation_model.digest
            honest = Honest(
                target, honest_token, "honest", admin, package_of_size(digest, MB), digest, timeout_s
            )
            small = package_of_size(digest, 200_000, seed=1)
            prepare(target, hostile, small, digest)
            # idle and attacked blocks alternate, so both see the same background (the distillation
            # worker runs the jobs of the honest uploads throughout)
            idle, attacked = _Phase(), _Phase()
            at_start: dict[str, Any] = {}
            at_end: dict[str, Any] = {}
            for _ in range(rounds):
                idle.measure(honest, calls // rounds, give_up_after)
                job_id = queue_watched_job(target, hostile, small, digest)
                with IdleStreams(target) as streams:
                    for kind in KINDS:
                        open_kind(streams, kind, streams_each, hostile, digest, job_id)
                    time.sleep(1.0)  # the server takes the streams in before the honest calls arrive
                    at_start = at_start or streams.outcomes()
                    attacked.measure(honest, calls // rounds, give_up_after)
                    at_end = streams.outcomes()
            recovered = serving(target, 120)
            growth = {
                "report_metrics": metrics_growth(target, honest_token, state),
                "broken_upload": broken_upload_growth(target, honest_token, digest, state),
            }
        finally:
            if honest is not None:
                honest.close()
            server.stop(timeout=60)

    idle_s, attacked_s = idle.summary(), attacked.summary()

    def ratio(what: str) -> float | None:
        a, b = attacked_s[what]["p99_s"], idle_s[what]["p99_s"]
        return a / b if a is not None and b else None

    return {
        "what": (
            f"one fcl-server serve process (--max-workers {max_workers}, no upload rate limits); an "
            f"honest client on its own channels makes {calls} sequential calls of each kind (health "
            "Check, Register, Connection.upload of a new 1 MB package, no retries; "
            f"{timeout_s:.0f} s deadlines) on the idle server, and as many while a hostile client holds "
            f"{streams_each} idle streams of each of {len(KINDS)} kinds open at once (4 per channel), in "
            f"{rounds} alternating blocks of each (the attack re-opened for each block); a "
            "failed call counts in the latencies with the time it took and in the errors; after "
            f"{give_up_after} failures in a row a call kind is not tried again (outcomes.failed_early); "
            "growth: state-dir bytes added by one ReportMetrics with the largest fields accepted, and "
            "by one upload stream (header, one 4 MiB chunk, then cut)"
        ),
        "kinds": KINDS,
        "max_workers": max_workers,
        "streams_per_kind": streams_each,
        "rounds": rounds,
        "idle": idle_s,
        "attacked": attacked_s,
        "streams_at_start": at_start,
        "streams_at_end": at_end,
        "recovered_after_attack": recovered,
        "growth": growth,
        "hostile_check_p99_s": attacked_s["check"]["p99_s"],
        "hostile_register_p99_ratio": ratio("register"),
        "hostile_upload_p99_ratio": ratio("upload"),
        "hostile_errors": sum(s["errors"] for phase in (idle_s, attacked_s) for s in phase.values()),
        "hostile_max_growth_per_call_bytes": max(g["growth_bytes"] for g in growth.values()),
    }
