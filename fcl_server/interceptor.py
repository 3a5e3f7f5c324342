"""gRPC server interceptor: per RPC one log line, and count, latency and bytes by method and status code."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.logs import fields
from fcl_server.errors import ResourceExhausted
from fcl_server.metrics import ServerMetrics
from fcl_server.streams import ActiveContext, Activity, StreamLimits, StreamSlots, noting, until_idle

log = logging.getLogger("fcl_server.rpc")
# probes and tooling call these often; their lines are DEBUG so they do not drown the RPCs of clients
QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
_SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
# refusals and client-side ends: logged at INFO with the peer, even for the quiet services
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
_current: ContextVar[CallRecord | None] = ContextVar("fcl_rpc_call", default=None)  # the RPC of this task
Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


@dataclass
class CallRecord:
    service: str
    method: str
    peer: str = ""
    started: float = field(default_factory=time.perf_counter)
    client_id: str = ""
    bytes_in: int = 0
    bytes_out: int = 0


def note_client(client_id: str) -> None:
    """Called by the servicer once the caller is authenticated: the RPC's log line names the client."""
    call = _current.get()
    if call is not None:
        call.client_id = client_id


def note_bytes(received: int = 0, sent: int = 0) -> None:
    """Streaming handlers report the bytes they read and yield (sizing a 1 MB message re-encodes it)."""
    call = _current.get()
    if call is not None:
        call.bytes_in += received
        call.bytes_out += sent


def _size(message: Any) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior]) -> grpc.RpcMethodHandler:
    """The same method handler, its behavior wrapped (the four handler kinds keep their kind)."""
    behavior = (
        (handler.stream_stream if handler.request_streaming else handler.unary_stream)
        if handler.response_streaming
        else (handler.stream_unary if handler.request_streaming else handler.unary_unary)
    )
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        wrap(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _drive(
    behavior: Behavior,
    request: Any,
    context: grpc.aio.ServicerContext,
    write: Callable[[Any], Awaitable[None]],
) -> Any:
    """Run a handler of any style: a coroutine (returns its response, or writes its own stream) or an
    async generator, whose messages go out through `write`."""
    result = behavior(request, context)
    if hasattr(result, "__aiter__"):
        async for message in result:
            await write(message)
        return None
    return await result if inspect.isawaitable(result) else result


def _method_of(details: grpc.HandlerCallDetails) -> tuple[str, str]:
    service, _, method = details.method.strip("/").rpartition("/")
    return service, method


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Bounds every stream: an idle timeout, and one cap on the streams of the open services.

    The servicer caps each authenticated client's streams (it knows the caller); health Watch and
    reflection take no token, so their streams share one cap here.
    """

    def __init__(self, limits: StreamLimits, capped_services: tuple[str, ...] = QUIET_SERVICES) -> None:
        self.limits = limits
        self.capped_services = capped_services
        self.anonymous = StreamSlots(
            limits.anonymous, "the open services (health, reflection)", "--max-anonymous-streams"
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        capped = _method_of(handler_call_details)[0] in self.capped_services
        return _rewrap(handler, lambda behavior: self._bounded(behavior, handler.request_streaming, capped))

    def _bounded(self, behavior: Behavior, request_streaming: bool, capped: bool) -> Behavior:
        idle = self.limits.idle_s

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            activity = Activity()
            if request_streaming:
                request = noting(request, activity)
            active = ActiveContext(context, activity)
            with ExitStack() as slot:
                if capped:
                    try:
                        slot.enter_context(self.anonymous.hold(""))
                    except ResourceExhausted as exc:
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                work = _drive(behavior, request, active, active.write)
                return await until_idle(work, activity, idle, context)

        return handle


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Per RPC one log line (with the peer), and count, latency and bytes by method and status code."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _method_of(handler_call_details)
        return _rewrap(handler, lambda behavior: self._observed(service, method, behavior, handler))

    def _observed(
        self, service: str, method: str, behavior: Behavior, handler: grpc.RpcMethodHandler
    ) -> Behavior:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = self.start(service, method, context.peer())
            if not handler.request_streaming:  # a request stream's bytes are reported by its handler
                call.bytes_in = _size(request)
            _current.set(call)  # each RPC runs in a task of its own, with a context of its own
            try:
                response = await _drive(behavior, request, context, context.write)
            except asyncio.CancelledError:  # the client cancelled, went away or ran out of time
                self.finish(call, _ended_by_client(context))
                raise
            except BaseException:  # abort() or a failure: the code the handler set, else UNKNOWN
                self.finish(call, _code(context, failed=True))
                raise
            if response is not None:
                call.bytes_out += _size(response)
            self.finish(call, _code(context, failed=False))
            return response

        return handle

    def start(self, service: str, method: str, peer: str) -> CallRecord:
        self.metrics.rpc_in_flight.labels(method).inc()
        return CallRecord(service, method, peer)

    def finish(self, call: CallRecord, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - call.started
        m = self.metrics
        m.rpc_in_flight.labels(call.method).dec()
        m.rpc_handled.labels(call.service, call.method, code.name).inc()
        m.rpc_seconds.labels(call.service, call.method, code.name).observe(seconds)
        m.bytes_received.labels(call.method).inc(call.bytes_in)
        m.bytes_sent.labels(call.method).inc(call.bytes_out)
        level = logging.DEBUG if call.service in QUIET_SERVICES else logging.INFO
        if code in _REFUSALS:
            level = logging.INFO
        if code in _SERVER_ERRORS:
            level = logging.WARNING
        log.log(
            level,
            "%s client=%s peer=%s code=%s %.1f ms in=%d B out=%d B",
            call.method,
            call.client_id or "-",
            call.peer or "-",
            code.name,
            seconds * 1000,
            call.bytes_in,
            call.bytes_out,
            extra=fields(
                event="rpc",
                method=call.method,
                service=call.service,
                client_id=call.client_id or None,
                peer=call.peer or None,
                code=code.name,
                duration_ms=round(seconds * 1000, 3),
                bytes_in=call.bytes_in,
                bytes_out=call.bytes_out,
            ),
        )


def _code(context: grpc.aio.ServicerContext, failed: bool) -> grpc.StatusCode:
    """The handler's outcome: the code it set (abort, set_code), else UNKNOWN if it raised, else OK."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpcio versions report the code's number
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _ended_by_client(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """A cancelled handler: DEADLINE_EXCEEDED when the caller's deadline passed, else CANCELLED."""
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED
