"""Thin asyncio gRPC transport: each RPC authenticates, converts (convert.py), calls the domain, maps errors.

The domain (FclService: SQLite, files, hashing) is blocking code; it runs on a thread pool, so a call
holds a thread only while it works, never while it waits for its client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
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
    """JobNotifier's ticks for coroutines: a watcher awaits the next job change without a thread."""

    def __init__(self, notifier: JobNotifier) -> None:
        self.tick = 0
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        notifier.subscribe(self._from_any_thread)

    def _from_any_thread(self) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server stopped, nobody watches
            self._loop.call_soon_threadsafe(self._bump)

    def _bump(self) -> None:
        self.tick += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, last_tick: int, timeout: float) -> int:
        if self.tick == last_tick:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.tick


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
                try:
                    await self._receive_chunks(request_iterator, writer)
                    receipt = await self._run(self.service.finish_upload, principal, header, writer)
                    return convert.receipt(receipt)
                finally:
                    await self._run(self.service.close_upload, principal, header, writer)

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
        tick, last = self.ticks.tick, None
        with self.client_streams.hold(principal.name), self.service.watch_slot() as open_for:
            # a watch ends (OK; the client watches again) well before the idle timer would cut it
            ends = time.monotonic() + min(open_for, self.idle_s / 2)
            while True:
                job, position = await self._run(self._job_and_position, principal, request.job_id)
                if (job.state, position) != last:
                    last = (job.state, position)
                    yield _noted(convert.job_event(job, position))
                left = ends - time.monotonic()
                if job.state.final or left <= 0:
                    return  # not final: the client watches again (see ServerLimits.max_watchers)
                tick = await self.ticks.wait(tick, timeout=min(self.service.limits.watch_poll_s, left))

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
