"""Traces across gRPC: a span per RPC on each side, and W3C trace context carried in the call's
metadata, so the draft and verify processes' spans join the orchestrator's generation trace.

Both sides are OpenTelemetry's own gRPC instrumentation (``opentelemetry-instrumentation-grpc``),
installed per channel and per server rather than by patching ``grpc`` globally, and only when
tracing is on: the orchestrator's channels to the draft and verify services get its client
interceptor (:func:`traced_channel`: a CLIENT span per call, ended when the reply is in, for
``.future()`` calls too), the draft and verify servers its server interceptor
(:func:`server_interceptor`: a SERVER span, child of the caller's). The orchestrator's own public
calls are not traced here: its generation span is the SERVER span
(``specdec.orchestrator.instrumentation``).

Kept by hand, because the library does not do it:

- which calls are traced (:func:`traced`): a trace is one generation, so health checks,
  reflection and the housekeeping calls (``GetInfo``, ``ReleaseSession``) are left out;
- the peer on client spans (``server.address``, ``server.port``, and a draft's name,
  ``specdec.draft``): the interceptor never learns the channel's target, and trace analysis names
  the draft on a round's critical path by them, even one that never answered;
- span names: the library names a span after the method's path (``/package.Service/Method``);
  OpenTelemetry's RPC conventions, and every trace query here, use ``package.Service/Method``.
"""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import client_interceptor
from opentelemetry.instrumentation.grpc import server_interceptor as _library_server_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.sdk.trace import SpanProcessor

from specdec import telemetry
from specdec.rpc.interceptors import HEALTH_AND_REFLECTION

UNTRACED_METHODS = ("/GetInfo", "/ReleaseSession")


def traced(method: str) -> bool:
    """Whether ``/package.Service/Method`` belongs in a generation's trace."""
    return not method.startswith(HEALTH_AND_REFLECTION) and not method.endswith(UNTRACED_METHODS)


def _traced_call(details) -> bool:
    # Client interceptors see ``full_method``, server interceptors ``method``.
    return traced(getattr(details, "full_method", None) or details.method)


def _peer(address: str) -> dict:
    host, _, port = address.rpartition(":")
    return {"server.address": host or address, **({"server.port": int(port)} if port.isdigit() else {})}


def traced_channel(channel: grpc.Channel, address: str, attributes: dict | None = None) -> grpc.Channel:
    """``channel`` with a CLIENT span per traced call and trace context in its metadata when
    tracing is on; unchanged otherwise. ``address`` is the channel's target, for the spans, and
    ``attributes`` more of them (a draft's name, as the round records give it)."""
    if not telemetry.enabled():
        return channel
    peer = _peer(address) | (attributes or {})
    interceptor = client_interceptor(telemetry.provider(), filter_=_traced_call,
                                     request_hook=lambda span, request: span.set_attributes(peer))
    return intercept_channel(channel, interceptor)


def server_interceptor() -> grpc.ServerInterceptor:
    """A SERVER span per traced call, child of the span whose context the call's metadata carries."""
    return _library_server_interceptor(telemetry.provider(), filter_=_traced_call)


class RpcSpanNames(SpanProcessor):
    """Renames the library's ``/package.Service/Method`` spans ``package.Service/Method``; add it to
    the process's tracer provider once tracing is on."""

    def on_start(self, span, parent_context=None) -> None:
        if span.name.startswith("/") and span.attributes.get("rpc.system") == "grpc":
            span.update_name(span.name[1:])
