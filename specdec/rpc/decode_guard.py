"""Requests whose bytes do not parse as the method's message are the caller's fault: answer them
INVALID_ARGUMENT, naming the message, rather than gRPC's own INTERNAL.

gRPC Python calls a method's request deserializer before any servicer code runs and turns any
failure there (truncated or garbled bytes, a field sent with the wrong wire type, invalid UTF-8 in
a string field) into INTERNAL "Exception deserializing request!", which tells a client that the
server broke. This interceptor wraps each method's deserializer so that a parse failure becomes an
:class:`Undecodable` value, and each method's behaviour so that such a value is refused at once.
"""

from __future__ import annotations

import functools

import grpc


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


def _refusing(behavior, streaming_response: bool):
    if streaming_response:

        @functools.wraps(behavior)
        def stream(request, context):
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())
            yield from behavior(request, context)

        return stream

    @functools.wraps(behavior)
    def unary(request, context):
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())
        return behavior(request, context)

    return unary


class DecodeGuard(grpc.ServerInterceptor):
    """Refuse undecodable unary-request methods with INVALID_ARGUMENT (see the module docstring)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        return make(
            _refusing(behavior, streaming_response=handler.response_streaming),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
