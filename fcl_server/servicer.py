"""Thin asyncio gRPC transport: each RPC authenticates, converts (convert.py), calls the domain, maps errors.

The domain (FclService: SQLite, files, hashing) is blocking code; it runs on a thread pool, so a call
holds a thread only while it works, never while it waits for its client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc
from google.protobuf.message import Message

from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_server import convert
from fcl_server.classify import Classification
from fcl_server.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from fcl_server.interceptor import note_bytes, note_client
from fcl_server.job_events import JobChange
from fcl_server.partials import PartialWriter
from fcl_server.service import FclService, JobNotifier
from fcl_server.state import Principal
from fcl_server.streams import StreamLimits, StreamSlots

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}
F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=Message)
T = TypeVar("T")


def _status_for(exc: DomainError) -> grpc.StatusCode:
    for cls, code in _STATUS.items():
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def maps_domain_errors(method: F) -> F:
    """Turn a DomainError raised by the domain into the matching gRPC status (coroutines and streams)."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: FclServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for message in method(self, request, context):
                    yield message
            except DomainError as exc:
                await context.abort(_status_for(exc), str(exc))

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: FclServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except DomainError as exc:
            await context.abort(_status_for(exc), str(exc))

    return unary  # type: ignore[return-value]


def _noted(message: M) -> M:
    """A small streamed message, its size reported to the call's metrics (chunks report len(data))."""
    note_bytes(sent=message.ByteSize())
    return message


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


class JobTicks:
    """JobNotifier's changes for coroutines: a watcher awaits the next change that concerns its job,
    without a thread, and reads the database again only then.

    Every change wakes the waiting coroutines, but one that does not concern a watcher's job (another
    job's change; a job joining the queue behind a queued one) costs it only a comparison: in an upload
    burst each new job would otherwise send every watcher to the database.
    """

    def __init__(self, notifier: JobNotifier) -> None:
        self._changed = asyncio.Event()
        self._seen: dict[int, int] = {}  # per watched job: changes that concern it when not queued
        self._moves = 0  # changes that move queued jobs' places (or concern every job)
        self._watchers: collections.Counter[int] = collections.Counter()
        self._loop = asyncio.get_running_loop()
        notifier.subscribe(self._from_any_thread)

    def _from_any_thread(self, change: JobChange) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server stopped, nobody watches
            self._loop.call_soon_threadsafe(self._bump, change)

    def _bump(self, change: JobChange) -> None:
        if change.moves_places:
            self._moves += 1
        if not change.job_id:  # several jobs, or G: every watched job looks again
            for job_id in self._seen:
                self._seen[job_id] += 1
        elif change.job_id in self._seen:  # one job: a lookup, not a pass over every watcher
            self._seen[change.job_id] += 1
        self._changed.set()
        self._changed = asyncio.Event()

    @contextlib.contextmanager
    def watching(self, job_id: int) -> Iterator[None]:
        """Count the changes of `job_id` while a watcher holds it."""
        self._watchers[job_id] += 1
        self._seen.setdefault(job_id, 0)
        try:
            yield
        finally:
            self._watchers[job_id] -= 1
            if not self._watchers[job_id]:
                del self._watchers[job_id], self._seen[job_id]

    def mark(self, job_id: int) -> tuple[int, int]:
        """Where the changes stand now, for `wait` (take it before reading the job)."""
        return self._seen.get(job_id, 0), self._moves

    async def wait(self, job_id: int, waiting: bool, mark: tuple[int, int], timeout: float) -> None:
        """Return once a change since `mark` concerns `job_id` (`waiting`: jobs are ahead of it), or
        after `timeout`."""
        deadline = self._loop.time() + timeout
        while self._seen.get(job_id, 0) == mark[0] and not (waiting and self._moves != mark[1]):
            left = deadline - self._loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


class FclServicer(fcl_pb2_grpc.FclServiceServicer):
    """Built on the server's event loop (JobTicks binds to it)."""

    def __init__(
        self,
        service: FclService,
        executor: futures.Executor,
        streams: StreamLimits | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.service = service
        self.executor = executor
        self.chunk_size = chunk_size
        limits = streams or StreamLimits()
        self.idle_s = limits.idle_s
        self.client_streams = StreamSlots(limits.per_client, "client", "--max-streams-per-client")
        self.ticks = JobTicks(service.notifier)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking domain work, on the thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    async def _auth(self, context: grpc.aio.ServicerContext) -> Principal:
        principal = await self._run(self.service.authenticate, bearer_token(context))
        note_client(principal.name)  # the RPC's log line names its caller
        return principal

    @maps_domain_errors
    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        principal = await self._auth(context)
        reg = await self._run(
            self.service.register,
            principal,
            request.client_id,
            request.fm_digest,
            request.model_spec_json,
            request.client_version,
        )
        return convert.registration(reg)

    @maps_domain_errors
    async def GetFoundationModel(
        self, request: pb.GetFoundationModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FoundationModelChunk]:
        principal = await self._auth(context)
        with self.client_streams.hold(principal.name):
            info, path = await self._run(self.service.fm_archive, request.offset, request.archive_sha256)
            yield _noted(pb.FoundationModelChunk(info=convert.fm_info(info), offset=request.offset))
            async for offset, block in self._file_blocks(path, request.offset):
                note_bytes(sent=len(block))
                yield pb.FoundationModelChunk(offset=offset, data=block)

    async def _file_blocks(self, path: Path, offset: int) -> AsyncIterator[tuple[int, bytes]]:
        fh: IO[bytes] = await self._run(path.open, "rb")
        try:
            await self._run(fh.seek, offset)
            while block := await self._run(fh.read, self.chunk_size):
                yield offset, block
                offset += len(block)
        finally:
            fh.close()

    @maps_domain_errors
    async def UploadKnowledge(
        self, request_iterator: AsyncIterator[pb.UploadKnowledgeRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadReceipt:
        principal = await self._auth(context)  # before the stream may wait on anything
        with self.client_streams.hold(principal.name):
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("payload") != "header":
                raise InvalidArgument("the first UploadKnowledge message must be the header")
            note_bytes(received=first.ByteSize())
            header = convert.upload_header(first.header)
            earlier = await self._run(self.service.check_upload_header, principal, header)
            if earlier is not None:
                return convert.receipt(earlier)
            # bytes go to a resumable partial: if this stream breaks, the next one sends only the rest
            with self.service.uploads_in_flight.track():
                writer = await self._run(self.service.open_upload, principal, header)
                receipt = None
                try:
                    await self._receive_chunks(request_iterator, writer)
                    receipt = await self._run(self.service.finish_upload, principal, header, writer)
                    return convert.receipt(receipt)
                finally:
                    accepted = receipt is not None
                    await self._run(self.service.close_upload, principal, header, writer, accepted)

    async def _receive_chunks(
        self, requests: AsyncIterator[pb.UploadKnowledgeRequest], writer: PartialWriter
    ) -> None:
        async for msg in requests:
            if msg.WhichOneof("payload") != "chunk":
                writer.abandon()
                raise InvalidArgument("only chunks may follow the header")
            chunk = msg.chunk  # each read of a bytes field copies it: read it once
            note_bytes(received=len(chunk))
            if len(chunk) > self.service.limits.max_chunk_bytes:
                writer.abandon()
                raise ResourceExhausted(f"chunk over {self.service.limits.max_chunk_bytes} bytes")
            await self._run(writer.write, chunk)

    @maps_domain_errors
    async def GetUploadStatus(
        self, request: pb.GetUploadStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.UploadStatus:
        principal = await self._auth(context)
        progress = await self._run(self.service.upload_status, principal, request.upload_id)
        return convert.upload_status(progress)

    @maps_domain_errors
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        principal = await self._auth(context)
        last = None
        with (
            self.client_streams.hold(principal.name),
            self.service.watch_slot() as open_for,
            self.ticks.watching(request.job_id),
        ):
            # a watch ends (OK; the client watches again) well before the idle timer would cut it
            ends = time.monotonic() + min(open_for, self.idle_s / 2)
            while True:
                mark = self.ticks.mark(request.job_id)
                job, position = await self._run(self._job_and_position, principal, request.job_id)
                if (job.state, position) != last:
                    last = (job.state, position)
                    yield _noted(convert.job_event(job, position))
                left = ends - time.monotonic()
                if job.state.final or left <= 0:
                    return  # not final: the client watches again (see ServerLimits.max_watchers)
                waiting = position > 0  # jobs ahead: their changes move its place
                await self.ticks.wait(
                    request.job_id, waiting, mark, timeout=min(self.service.limits.watch_poll_s, left)
                )

    def _job_and_position(self, principal: Principal, job_id: int) -> tuple[Any, int]:
        job = self.service.job(principal, job_id)
        return job, (self.service.state.queue_position(job.job_id) if not job.state.final else 0)

    @maps_domain_errors
    async def GetKnowledge(
        self, request: pb.GetKnowledgeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.KnowledgeChunk]:
        principal = await self._auth(context)
        with self.client_streams.hold(principal.name):
            scope = convert.head_scope(request.scope)
            head, path = await self._run(
                self.service.head, principal, scope, request.client_id, request.version
            )
            size = await self._run(lambda: path.stat().st_size)
            yield _noted(pb.KnowledgeChunk(header=convert.knowledge_header(head, size)))
            async for _, block in self._file_blocks(path, 0):
                note_bytes(sent=len(block))
                yield pb.KnowledgeChunk(chunk=block)

    @maps_domain_errors
    async def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportMetricsResponse:
        principal = await self._auth(context)
        stored = await self._run(
            self.service.report_metrics,
            principal,
            request.task_key,
            request.task_index,
            dict(request.metrics),
        )
        return pb.ReportMetricsResponse(stored=stored)

    @maps_domain_errors
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        principal = await self._auth(context)
        query = convert.classify_query(request)
        classifier = self.service.classifier
        with classifier.admitted():  # a full house is refused here, before any work
            prepared = await self._run(classifier.prepare, principal, query)  # checks, head (cached)
            # the encode waits for the one encoder thread on the loop: no RPC thread is held meanwhile
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(classifier.executor, classifier.predict, prepared)
        return convert.classify_response(Classification(prepared.version, results, prepared.head.abstention))

    @maps_domain_errors
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerStatus:
        principal = await self._auth(context)
        return convert.server_status(await self._run(self.service.status, principal, request.max_jobs))
