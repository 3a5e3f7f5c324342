"""gRPC server interceptor: per RPC one log line, and count, latency and bytes by method and status code."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.logs import fields
from fcl_server.metrics import ServerMetrics

log = logging.getLogger("fcl_server.rpc")
# probes and tooling call these often; their lines are DEBUG so they do not drown the RPCs of clients
QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
_SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
_current = threading.local()  # the call handled by this thread (grpc runs each RPC on one pool thread)


@dataclass
class CallRecord:
    service: str
    method: str
    started: float = field(default_factory=time.perf_counter)
    client_id: str = ""
    bytes_in: int = 0
    bytes_out: int = 0


def note_client(client_id: str) -> None:
    """Called by the servicer once the caller is authenticated: the RPC's log line names the client."""
    call: CallRecord | None = getattr(_current, "call", None)
    if call is not None:
        call.client_id = client_id


def note_bytes(received: int = 0, sent: int = 0) -> None:
    """Streaming handlers report the bytes they read and yield (sizing a 1 MB message re-encodes it)."""
    call: CallRecord | None = getattr(_current, "call", None)
    if call is not None:
        call.bytes_in += received
        call.bytes_out += sent


def _size(message: Any) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


class ObservingInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.strip("/").rpartition("/")
        wrap = _stream_response if handler.response_streaming else _unary_response
        behavior = (
            (handler.stream_stream if handler.request_streaming else handler.unary_stream)
            if handler.response_streaming
            else (handler.stream_unary if handler.request_streaming else handler.unary_unary)
        )
        wrapped = wrap(self, service, method, behavior, handler.request_streaming)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def start(self, service: str, method: str) -> CallRecord:
        call = CallRecord(service, method)
        _current.call = call
        self.metrics.rpc_in_flight.labels(method).inc()
        return call

    def finish(self, call: CallRecord, code: grpc.StatusCode) -> None:
        if getattr(_current, "call", None) is call:  # a stream closed by the garbage collector runs elsewhere
            _current.call = None
        seconds = time.perf_counter() - call.started
        m = self.metrics
        m.rpc_in_flight.labels(call.method).dec()
        m.rpc_handled.labels(call.service, call.method, code.name).inc()
        m.rpc_seconds.labels(call.service, call.method, code.name).observe(seconds)
        m.bytes_received.labels(call.method).inc(call.bytes_in)
        m.bytes_sent.labels(call.method).inc(call.bytes_out)
        level = logging.DEBUG if call.service in QUIET_SERVICES else logging.INFO
        if code in _SERVER_ERRORS:
            level = logging.WARNING
        log.log(
            level,
            "%s client=%s code=%s %.1f ms in=%d B out=%d B",
            call.method,
            call.client_id or "-",
            code.name,
            seconds * 1000,
            call.bytes_in,
            call.bytes_out,
            extra=fields(
                event="rpc",
                method=call.method,
                service=call.service,
                client_id=call.client_id or None,
                code=code.name,
                duration_ms=round(seconds * 1000, 3),
                bytes_in=call.bytes_in,
                bytes_out=call.bytes_out,
            ),
        )


def _code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    """The handler's outcome: the code it set (abort, set_code), else UNKNOWN if it raised, else OK.

    Like other gRPC interceptors, a handler that returns normally counts as OK even when its client
    has already gone; only a stream abandoned mid-way is CANCELLED (see _stream_response).
    """
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _begin(
    interceptor: ObservingInterceptor, service: str, method: str, request: Any, request_streaming: bool
) -> tuple[CallRecord, Any]:
    """Open the call's record; a request stream's bytes are reported by its handler (note_bytes)."""
    call = interceptor.start(service, method)
    if not request_streaming:
        call.bytes_in = _size(request)
    return call, request


def _unary_response(
    interceptor: ObservingInterceptor,
    service: str,
    method: str,
    behavior: Callable[[Any, grpc.ServicerContext], Any],
    request_streaming: bool,
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        call, request = _begin(interceptor, service, method, request, request_streaming)
        try:
            response = behavior(request, context)
        except BaseException:
            interceptor.finish(call, _code(context, failed=True))
            raise
        call.bytes_out = _size(response)
        interceptor.finish(call, _code(context, failed=False))
        return response

    return handle


def _stream_response(
    interceptor: ObservingInterceptor,
    service: str,
    method: str,
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
    request_streaming: bool,
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call, request = _begin(interceptor, service, method, request, request_streaming)
        try:
            yield from behavior(request, context)  # the handler reports its bytes (note_bytes)
        except GeneratorExit:  # the client went away mid-stream
            interceptor.finish(call, grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            interceptor.finish(call, _code(context, failed=True))
            raise
        interceptor.finish(call, _code(context, failed=False))

    return handle
