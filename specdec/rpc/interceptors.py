"""Server interceptors every specdec server installs, and the one way here to wrap a handler.

A gRPC Python interceptor cannot run code around a call directly: it must rebuild the method's
handler with a new behaviour, of the right one of four shapes (unary or streaming, each way).
:func:`wrap_handler` does that once; an interceptor hands it a context manager to run each call in.

- :class:`AdmissionInterceptor` counts the calls in flight in an :class:`Admission` and, once
  graceful shutdown has closed it, refuses new calls with UNAVAILABLE.
- :class:`DecodeGuard` answers request bytes that do not parse with INVALID_ARGUMENT.

Health checks and reflection (:data:`HEALTH_AND_REFLECTION`) are infrastructure, not work: they
stay open through shutdown and authentication, and are neither traced nor counted.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Callable, ContextManager

import grpc

HEALTH_AND_REFLECTION = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_HANDLER_OF_SHAPE = {  # (request_streaming, response_streaming) -> handler factory, behaviour attribute
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}

Scope = Callable[[object, grpc.ServicerContext], ContextManager]


def wrap_handler(handler: grpc.RpcMethodHandler, scope: Scope, request_deserializer=None) -> grpc.RpcMethodHandler:
    """``handler`` with each call run inside ``scope(request, context)``: entered before the servicer
    method, left once it has returned its reply or its last streamed message (or failed). The scope
    may refuse the call by calling ``context.abort``. ``request_deserializer`` replaces the handler's."""
    make, attribute = _HANDLER_OF_SHAPE[(handler.request_streaming, handler.response_streaming)]
    inner = getattr(handler, attribute)
    if handler.response_streaming:

        def behavior(request, context):
            with scope(request, context):
                yield from inner(request, context)
    else:

        def behavior(request, context):
            with scope(request, context):
                return inner(request, context)

    return make(behavior, request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer)


# --------------------------------------------------------------------------- graceful shutdown


class Admission:
    """Counts the calls in flight and, once closed, admits no new ones: graceful shutdown."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._in_flight = 0
        self.closed = False

    def enter(self) -> bool:
        with self._changed:
            if self.closed:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wait_idle(self, timeout_s: float, interrupted: threading.Event | None = None) -> bool:
        """Wait until no call is in flight (True), or the timeout passes or ``interrupted`` is set (False)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0 or (interrupted is not None and interrupted.is_set()):
                    return False
                self._changed.wait(min(left, 0.2))
        return True


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Counts every call but health checks and reflection while it runs; once the admission is
    closed (shutting down), refuses new ones with UNAVAILABLE, the code clients retry elsewhere."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    @contextlib.contextmanager
    def _admitted(self, request, context):
        if not self.admission.enter():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down")
        try:
            yield
        finally:
            self.admission.leave()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_AND_REFLECTION):
            return handler
        return wrap_handler(handler, self._admitted)


# --------------------------------------------------------------------------- undecodable requests


class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, message: str, error: Exception) -> None:
        self.message = message
        self.error = error

    def details(self) -> str:
        return f"the request is not a valid {self.message} message: {type(self.error).__name__}: {self.error}"


def _tolerant(deserializer):
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    message = descriptor.full_name if descriptor is not None else "request"

    @functools.wraps(deserializer)
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad bytes
            return Undecodable(message, exc)

    return deserialize


@contextlib.contextmanager
def _decoded(request, context):
    if isinstance(request, Undecodable):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())
    yield


class DecodeGuard(grpc.ServerInterceptor):
    """Requests whose bytes do not parse as the method's message are the caller's fault: answer them
    INVALID_ARGUMENT, naming the message, rather than gRPC's own INTERNAL.

    gRPC Python calls a method's request deserializer before any servicer code runs and turns any
    failure there (truncated or garbled bytes, a field sent with the wrong wire type, invalid UTF-8
    in a string field) into INTERNAL "Exception deserializing request!", which tells a client that
    the server broke. This interceptor wraps each unary-request method's deserializer so that a
    parse failure becomes an :class:`Undecodable` value, which the method then refuses at once.
    """

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return wrap_handler(handler, _decoded, request_deserializer=_tolerant(handler.request_deserializer))
