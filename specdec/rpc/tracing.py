"""The gRPC edge of telemetry: W3C trace context carried in gRPC metadata, a span per RPC, and the
RPC metrics; plus :func:`start_telemetry`, which each service's ``main`` calls once.

The orchestrator's channels get :class:`ClientTracingInterceptor` (a CLIENT span per call, its
context injected as ``traceparent`` metadata); the draft and verify servers get
:class:`ServerTracingInterceptor` (a SERVER span per call, the caller's context extracted from the
metadata, so the spans of the work inside become its children). Health checks, reflection and the
housekeeping calls (``GetInfo``, ``ReleaseSession``) are not traced: a trace is one generation.
Nothing is installed when tracing or metrics are off.
"""

from __future__ import annotations

import collections
import time

import grpc
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode

from specdec import telemetry
from specdec.rpc.metrics import ModelServiceMetrics, OrchestratorMetrics, ServiceMetrics, serve_metrics

UNTRACED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
UNTRACED_METHODS = ("/GetInfo", "/ReleaseSession")


def traced(method: str) -> bool:
    """Whether ``/package.Service/Method`` belongs in a generation's trace."""
    return not method.startswith(UNTRACED_SERVICES) and not method.endswith(UNTRACED_METHODS)


def rpc_attributes(method: str) -> tuple[str, dict]:
    """Span name (``package.Service/Method``) and the ``rpc.*`` attributes of a full method name."""
    service, _, name = method.lstrip("/").rpartition("/")
    return f"{service}/{name}", {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _method_name(method: str) -> str:
    return method.rpartition("/")[2]


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class ClientTracingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """A CLIENT span around each unary call, made current so its context goes out in the metadata.

    The span ends when the reply is in: a ``.future()`` call through this channel blocks (the
    clients here only make blocking calls).
    """

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.peer = {"server.address": host or address, **({"server.port": int(port)} if port.isdigit() else {})}

    def intercept_unary_unary(self, continuation, details, request):
        if not telemetry.enabled() or not traced(details.method):
            return continuation(details, request)
        name, attributes = rpc_attributes(details.method)
        with telemetry.tracer().start_as_current_span(
            name, kind=SpanKind.CLIENT, attributes={**attributes, **self.peer}, record_exception=False,
            set_status_on_exception=False,
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata = [*(details.metadata or ()), *carrier.items()]
            details = _CallDetails(details.method, details.timeout, metadata, details.credentials,
                                   details.wait_for_ready, details.compression)
            outcome = continuation(details, request)
            code = outcome.code()  # blocks until the call is done
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {outcome.details()}"))
            return outcome


def traced_channel(channel: grpc.Channel, address: str) -> grpc.Channel:
    """``channel`` with trace-context propagation when tracing is on; unchanged otherwise."""
    if not telemetry.enabled():
        return channel
    return grpc.intercept_channel(channel, ClientTracingInterceptor(address))


def _wrap_unary(handler, behavior):
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _status_code(context) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class ServerTracingInterceptor(grpc.ServerInterceptor):
    """A SERVER span around each traced unary call, child of the caller's span."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or not traced(details.method):
            return handler
        inner = handler.unary_unary
        name, attributes = rpc_attributes(details.method)
        metadata = details.invocation_metadata

        def behavior(request, context):
            parent = propagate.extract({key: value for key, value in metadata or ()})
            with telemetry.tracer().start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attributes, record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return inner(request, context)
                finally:
                    # specdec.rpc.server turns errors into context.abort(code), which raises: read the code set.
                    code = _status_code(context)
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code != grpc.StatusCode.OK:
                        span.set_status(Status(StatusCode.ERROR, code.name))

        return _wrap_unary(handler, behavior)


class ServerMetricsInterceptor(grpc.ServerInterceptor):
    """Counts, times and gauges every unary call except health checks and reflection."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or details.method.startswith(UNTRACED_SERVICES):
            return handler
        inner = handler.unary_unary
        method = _method_name(details.method)
        in_flight = self.metrics.in_flight.labels(method)
        duration = self.metrics.request_duration.labels(method)

        def behavior(request, context):
            in_flight.inc()
            start = time.perf_counter()
            try:
                return inner(request, context)
            finally:
                duration.observe(time.perf_counter() - start)
                in_flight.dec()
                self.metrics.requests.labels(method, _status_code(context).name).inc()

        return _wrap_unary(handler, behavior)


def start_telemetry(service: str, settings, store=None, attributes: dict | None = None):
    """Tracing and metrics for one service process, from its settings (``trace_file``,
    ``metrics_port``, ``host``) and the ``OTEL_*`` variables.

    ``store`` is a model service's session store; the orchestrator passes none and gets no server
    interceptors: its generation span is the SERVER span (``specdec.orchestrator.instrumentation``).
    Returns ``(server_interceptors, metrics)``, ``metrics`` being ``None`` when they are off.
    """
    tracing = telemetry.setup_tracing(service, settings.trace_file, attributes)
    metrics = None
    if settings.metrics_port:
        metrics = OrchestratorMetrics() if store is None else ModelServiceMetrics(store)
        serve_metrics(metrics.registry, settings.metrics_port, settings.host)
    interceptors: list[grpc.ServerInterceptor] = []
    if store is not None:
        if metrics is not None:
            interceptors.append(ServerMetricsInterceptor(metrics))
        if tracing:
            interceptors.append(ServerTracingInterceptor())
    return interceptors, metrics
