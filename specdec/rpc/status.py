"""Errors to gRPC status codes, in one place: the servicers answer with them (:func:`rpc_method`)
and the orchestrator's instrumentation records them on its spans and metrics.

Each typed error of :mod:`specdec.errors` has its precise code; a failed internal call passes its
own status on; anything else is a bug, answered INTERNAL and logged with its traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid

import grpc

from specdec.errors import Cancelled, DeadlineExceeded, InvalidRequest, NotReady, Overloaded, SessionLost, Unavailable

log = logging.getLogger("specdec.rpc.status")

STATUS_OF_ERROR = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    SessionLost: grpc.StatusCode.NOT_FOUND,
}


# An internal call that ended this way says nothing of the services' insides: said as it is.
PLAIN_UPSTREAM = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "the request's deadline passed during an internal call",
    grpc.StatusCode.CANCELLED: "the request was cancelled during an internal call",
}


# The HTTP door's status (and OpenAI error type) for each code; anything not here is a 500. Here,
# beside the codes, so the HTTP API and the spans it leaves say the same.
HTTP_STATUS_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),  # the client went away: nobody reads it
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "service_unavailable"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def http_status_of(code: grpc.StatusCode) -> int:
    return 200 if code == grpc.StatusCode.OK else HTTP_STATUS_OF_CODE.get(code, (500, ""))[0]


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status a call that raised ``exc`` ends with."""
    for kind, code in STATUS_OF_ERROR.items():
        if isinstance(exc, kind):
            return code
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code()
    return grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Code and details to answer a call that raised ``exc`` with."""
    code = code_of(exc)
    if isinstance(exc, tuple(STATUS_OF_ERROR)):
        return code, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        # An internal call failed: its status passes on, its text (another service's internals) only to the log.
        if code in PLAIN_UPSTREAM:
            return code, PLAIN_UPSTREAM[code]
        incident = uuid.uuid4().hex[:12]
        log.warning("internal call failed [%s]: %s: %s", incident, code.name, exc.details())
        return code, f"an internal call failed ({code.name}); the server log has the detail under [{incident}]"
    incident = uuid.uuid4().hex[:12]
    log.exception("unhandled error in RPC [%s]", incident)
    return code, f"internal error; the server log has the detail under [{incident}]"


def abort(context, exc: BaseException) -> None:
    """End the call with the status of ``exc``; an overload says when to retry (the pushback
    trailer gRPC's own retry policy reads)."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s:
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(retry_after_s * 1000))),))
    context.abort(*status_of(exc))


def rpc_method(method):
    """Turn exceptions raised by a servicer method (unary or server-streaming) into gRPC statuses."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                abort(context, exc)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            abort(context, exc)

    return unary
