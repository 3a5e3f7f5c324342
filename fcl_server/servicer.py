"""Thin gRPC transport: each RPC authenticates, converts (convert.py), calls the domain, maps errors."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from fcl_server import convert
from fcl_server.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from fcl_server.interceptor import note_bytes, note_client
from fcl_server.partials import PartialWriter
from fcl_server.service import FclService
from fcl_server.state import Principal

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
}
F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=Message)


def _status_for(exc: DomainError) -> grpc.StatusCode:
    for cls, code in _STATUS.items():
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def maps_domain_errors(method: F) -> F:
    """Turn a DomainError raised by the domain into the matching gRPC status, for unary and streams."""

    @functools.wraps(method)
    def wrapper(self: FclServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            result = method(self, request, context)
            if hasattr(result, "__next__"):
                return _guard_stream(result, context)
            return result
        except DomainError as exc:
            context.abort(_status_for(exc), str(exc))

    return wrapper  # type: ignore[return-value]


def _noted(message: M) -> M:
    """A small streamed message, its size reported to the call's metrics (chunks report len(data))."""
    note_bytes(sent=message.ByteSize())
    return message


def _guard_stream(stream: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    try:
        yield from stream
    except DomainError as exc:
        context.abort(_status_for(exc), str(exc))


def bearer_token(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def stream_file(path: Path, offset: int, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as fh:
        fh.seek(offset)
        while block := fh.read(chunk_size):
            yield offset, block
            offset += len(block)


class FclServicer(fcl_pb2_grpc.FclServiceServicer):
    def __init__(self, service: FclService, chunk_size: int = CHUNK_SIZE) -> None:
        self.service = service
        self.chunk_size = chunk_size

    def _auth(self, context: grpc.ServicerContext) -> Principal:
        principal = self.service.authenticate(bearer_token(context))
        note_client(principal.name)  # the RPC's log line names its caller
        return principal

    @maps_domain_errors
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        principal = self._auth(context)
        reg = self.service.register(principal, request.client_id, request.fm_digest, request.model_spec_json)
        return convert.registration(reg)

    @maps_domain_errors
    def GetFoundationModel(
        self, request: pb.GetFoundationModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FoundationModelChunk]:
        self._auth(context)
        info, path = self.service.fm_archive(request.offset, request.archive_sha256)
        yield _noted(pb.FoundationModelChunk(info=convert.fm_info(info), offset=request.offset))
        for offset, block in stream_file(path, request.offset, self.chunk_size):
            note_bytes(sent=len(block))
            yield pb.FoundationModelChunk(offset=offset, data=block)

    @maps_domain_errors
    def UploadKnowledge(
        self, request_iterator: Iterator[pb.UploadKnowledgeRequest], context: grpc.ServicerContext
    ) -> pb.UploadReceipt:
        principal = self._auth(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first UploadKnowledge message must be the header")
        note_bytes(received=first.ByteSize())
        header = convert.upload_header(first.header)
        earlier = self.service.check_upload_header(principal, header)
        if earlier is not None:
            return convert.receipt(earlier)
        # bytes go to a resumable partial: if this stream breaks, the next one sends only the rest
        with self.service.uploads_in_flight.track():
            writer = self.service.open_upload(principal, header)
            try:
                self._receive_chunks(request_iterator, writer)
                return convert.receipt(self.service.finish_upload(principal, header, writer))
            finally:
                self.service.close_upload(principal, header, writer)

    def _receive_chunks(self, requests: Iterator[pb.UploadKnowledgeRequest], writer: PartialWriter) -> None:
        for msg in requests:
            if msg.WhichOneof("payload") != "chunk":
                writer.abandon()
                raise InvalidArgument("only chunks may follow the header")
            chunk = msg.chunk  # each read of a bytes field copies it: read it once
            note_bytes(received=len(chunk))
            if len(chunk) > self.service.limits.max_chunk_bytes:
                writer.abandon()
                raise ResourceExhausted(f"chunk over {self.service.limits.max_chunk_bytes} bytes")
            writer.write(chunk)

    @maps_domain_errors
    def GetUploadStatus(
        self, request: pb.GetUploadStatusRequest, context: grpc.ServicerContext
    ) -> pb.UploadStatus:
        principal = self._auth(context)
        return convert.upload_status(self.service.upload_status(principal, request.upload_id))

    @maps_domain_errors
    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:
        principal = self._auth(context)
        tick, last = 0, None
        with self.service.watch_slot() as open_for:
            ends = time.monotonic() + open_for
            while context.is_active():
                job = self.service.job(principal, request.job_id)
                position = self.service.state.queue_position(job.job_id) if not job.state.final else 0
                key = (job.state, position)
                if key != last:
                    last = key
                    yield _noted(convert.job_event(job, position))
                left = ends - time.monotonic()
                if job.state.final or left <= 0:
                    return  # not final: the client watches again (see ServerLimits.max_watchers)
                tick = self.service.notifier.wait(tick, timeout=min(1.0, left))

    @maps_domain_errors
    def GetKnowledge(
        self, request: pb.GetKnowledgeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.KnowledgeChunk]:
        principal = self._auth(context)
        scope = convert.head_scope(request.scope)
        head, path = self.service.head(principal, scope, request.client_id, request.version)
        yield _noted(pb.KnowledgeChunk(header=convert.knowledge_header(head, path.stat().st_size)))
        for _, block in stream_file(path, 0, self.chunk_size):
            note_bytes(sent=len(block))
            yield pb.KnowledgeChunk(chunk=block)

    @maps_domain_errors
    def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext
    ) -> pb.ReportMetricsResponse:
        principal = self._auth(context)
        stored = self.service.report_metrics(
            principal, request.task_key, request.task_index, dict(request.metrics)
        )
        return pb.ReportMetricsResponse(stored=stored)

    @maps_domain_errors
    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.ServerStatus:
        principal = self._auth(context)
        return convert.server_status(self.service.status(principal, request.max_jobs))
