"""Tracing for every specdec process: OpenTelemetry set up from the standard ``OTEL_*`` variables,
plus a JSON-lines span file for offline analysis (``specdec traces analyze``).

Tracing is off unless something asks for it: an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``;
comma-separated), or a trace file (``--trace-file`` / ``SPECDEC_TRACE_FILE``). Off, :func:`span`
hands back one shared do-nothing context manager, so the spans in the hot paths cost a function
call; callers set attributes on the span they get, which does nothing on the non-recording span.

The rest follows the OpenTelemetry SDK's own variables: ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (or
``OTEL_EXPORTER_OTLP_PROTOCOL``) ``grpc`` (the default here, port 4317) or ``http/protobuf``
(port 4318); ``OTEL_SERVICE_NAME`` (default ``specdec-<service>``); ``OTEL_RESOURCE_ATTRIBUTES``;
``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (parent-based always-on by default, so the
draft and verify services follow the orchestrator's decision); ``OTEL_BSP_SCHEDULE_DELAY`` (how
often finished spans are exported, 5000 ms by default); ``OTEL_SDK_DISABLED=true`` turns it all off.

This module holds no gRPC code: the interceptors that carry W3C trace context in gRPC metadata live
at the edge, in ``specdec.rpc.tracing``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

log = logging.getLogger("specdec.telemetry")

INSTRUMENTATION_SCOPE = "specdec"
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)  # reusable: what span() gives when tracing is off

_tracer: trace.Tracer | None = None
_provider = None  # the SDK TracerProvider this module built, when tracing is on
_lock = threading.Lock()


def enabled() -> bool:
    return _tracer is not None


def provider():
    """The SDK TracerProvider of this process's tracing, or None when tracing is off."""
    return _provider


def tracer() -> trace.Tracer:
    """The process's tracer (a no-op one when tracing is off)."""
    return _tracer if _tracer is not None else trace.NoOpTracer()


def span(name: str, kind: SpanKind = SpanKind.INTERNAL, context=None):
    """``with span("specdec.forward") as s: ... s.set_attribute(...)``: a child of the current span.

    Attributes are set on the span handed back rather than passed in, so a caller builds none of
    them when tracing is off (``s.is_recording()`` guards anything costly).
    """
    if _tracer is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(name, context=context, kind=kind)


def exporter_names(env=os.environ) -> list[str]:
    """The span exporters the ``OTEL_*`` variables ask for (the trace file is separate)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    return [] if "none" in names else names


def otlp_protocol(env=os.environ) -> str:
    return (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()


def setup_tracing(service: str, trace_file: str = "", attributes: dict | None = None, env=os.environ) -> bool:
    """Configure this process's tracing for ``service`` (``orchestrator``, ``draft``, ``verify``).

    Returns whether tracing is on. Calling it again replaces the previous set-up (tests do).
    """
    global _tracer, _provider
    names = exporter_names(env)
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        trace_file = ""
    with _lock:
        _shutdown_locked()
        if not names and not trace_file:
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporters = [_exporter(name, env) for name in names]
        if trace_file:
            exporters.append(JsonLinesSpanExporter(trace_file))
        exporters = [e for e in exporters if e is not None]
        if not exporters:
            return False
        resource = Resource.create(
            {
                # Resource.create lets these win over OTEL_RESOURCE_ATTRIBUTES, so OTEL_SERVICE_NAME is read here.
                "service.name": env.get("OTEL_SERVICE_NAME") or f"specdec-{service}",
                "service.namespace": "specdec",
                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
                **(attributes or {}),
            }
        )
        provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        _provider = provider
        _tracer = provider.get_tracer(INSTRUMENTATION_SCOPE)
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            # Only the first set-up in a process becomes global (the API allows one); it is for
            # other libraries' spans, ours go through _tracer.
            trace.set_tracer_provider(provider)
    log.info("tracing on for %s: %s", resource.attributes.get("service.name"),
             ", ".join([*names, *([f"file {trace_file}"] if trace_file else [])]))
    return True


def _exporter(name: str, env):
    if name == "otlp":
        protocol = otlp_protocol(env)
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            log.warning("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=%s is not supported (grpc, http/protobuf); no OTLP export", protocol)
            return None
        # Endpoint, headers, timeout, compression and certificates come from the OTEL_* variables.
        return OTLPSpanExporter()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none); ignored", name)
    return None


def shutdown() -> None:
    """Export what is left and stop tracing (at process exit; the SDK also does it at exit)."""
    with _lock:
        _shutdown_locked()


def _shutdown_locked() -> None:
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer, _provider = None, None


# --------------------------------------------------------------------------- JSON-lines span file

KIND_NAMES = {SpanKind.INTERNAL: "INTERNAL", SpanKind.SERVER: "SERVER", SpanKind.CLIENT: "CLIENT",
              SpanKind.PRODUCER: "PRODUCER", SpanKind.CONSUMER: "CONSUMER"}


def span_record(span) -> dict:
    """One finished SDK span as a flat JSON object (one line of the trace file)."""
    parent = span.parent
    status = span.status
    return {
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "name": span.name,
        "kind": KIND_NAMES.get(span.kind, str(span.kind)),
        "service": span.resource.attributes.get("service.name", ""),
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "attributes": {k: _json_value(v) for k, v in (span.attributes or {}).items()},
        "status": {"code": status.status_code.name, "message": status.description or ""},
        "events": [
            {"name": e.name, "time_unix_nano": e.timestamp, "attributes": {k: _json_value(v) for k, v in (e.attributes or {}).items()}}
            for e in span.events
        ],
        # The SDK's own telemetry.sdk.* entries are the same on every line: left out.
        "resource": {k: _json_value(v) for k, v in span.resource.attributes.items() if not k.startswith("telemetry.sdk.")},
    }


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per span to a file.

    Several processes (a whole local cluster) may share one file: it is opened with ``O_APPEND``
    and each export is one ``write`` of whole lines, so lines from different processes never
    interleave.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence) -> SpanExportResult:
        data = "".join(json.dumps(span_record(s), separators=(",", ":"), default=str) + "\n" for s in spans).encode()
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                log.warning("could not write spans to %s: %s", self.path, exc)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
