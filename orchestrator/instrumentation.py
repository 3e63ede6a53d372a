"""What the orchestrator reports about each generation: its trace and its Prometheus metrics.

The trace of one generation (see the README, "Read its traces")::

    text_completion {model}                      SERVER, gen_ai.* attributes   (GenerationService)
    ├── specdec.round                            one per round, specdec.* attributes (controller)
    │   ├── specdec.v1.DraftService/DraftBeams   CLIENT, one per draft, concurrent
    │   │   └── specdec.v1.DraftService/DraftBeams   SERVER, in the draft process
    │   │       ├── specdec.cache.sync (└── specdec.cache.compact)
    │   │       └── specdec.forward …   (└── specdec.tree_mask)
    │   └── specdec.v1.VerifyService/VerifyTree  CLIENT
    │       └── specdec.v1.VerifyService/VerifyTree  SERVER, in the verify process
    │           ├── specdec.cache.sync (└── specdec.cache.compact)
    │           └── specdec.forward (└── specdec.tree_mask)
    └── specdec.round …

The generation span is started here and never made current across a ``yield`` (the streaming
servicer and the controller are generators): each round span is made current only while the round
runs, which is when the draft and verify clients inject it into their calls. Prompt and output
text are recorded only when the operator asks (``--trace-text``), otherwise only token counts.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from specdec import telemetry
from specdec.rpc.metrics import OrchestratorMetrics
from specdec.rpc.status import code_of, http_status_of

PROVIDER = "specdec"
# The GenAI conventions' finish reasons for ours: the end-of-sequence token, a stop string and a stop token are all "stop".
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "stop_token": "stop"}


@dataclass
class ObservedRound:
    record: object = None  # the round's specdec.records.RoundRecord, set when the round completed


_NULL_ROUND = contextlib.nullcontext(ObservedRound())  # shared: tracing and metrics off


class ObservedGeneration:
    """Handed to the servicer for one generation: the root span and what the metrics need."""

    def __init__(self, span: trace.Span, start: float | None = None, with_text: bool = False) -> None:
        self.span = span
        self.with_text = with_text and span.is_recording()  # the operator asked for text on spans (--trace-text)
        # Even an unsampled root is the rounds' parent: they inherit its sampling decision.
        self.trace_parent = trace.set_span_in_context(span) if span is not trace.INVALID_SPAN else None
        self.mode = ""
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter() if start is None else start  # when the call arrived
        self.admitted: float | None = None  # when it was given a generation slot
        self.output_tokens = 0  # once finished
        self.first_token_s: float | None = None  # from arrival to the first token, once finished

    @property
    def trace_id(self) -> str:
        """The generation's trace id (32 hex digits), for the caller and the run log; "" untraced."""
        context = self.span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else ""

    def set_request(self, params, request_id: str) -> None:
        """Once the request (``params``: a resolved GenerationParams) is checked and holds a generation slot."""
        self.mode = params.mode
        self.admitted = time.perf_counter()
        if not self.span.is_recording():
            return
        self.span.set_attributes({
            # The wait for a generation slot (and checks before it), apart from the generation itself.
            "gen_ai.latency.time_in_queue": self.admitted - self.start,
            "gen_ai.response.id": request_id,
            "gen_ai.request.max_tokens": params.max_new_tokens,
            "gen_ai.request.temperature": float(params.sampling.temperature),
            "gen_ai.usage.input_tokens": len(params.prompt_ids),
            "specdec.mode": str(params.mode),
            "specdec.request_id": request_id,
            "specdec.request.draft_length": params.speculation.draft_length,
            "specdec.request.beam_width": params.speculation.beam_width,
            "specdec.request.beam_depth": params.speculation.beam_depth,
            "specdec.request.max_tree_nodes": params.speculation.max_tree_nodes,
        })

    def streamed(self, record, waited_s: float) -> None:
        """A streamed round's piece was passed on to the client, which took ``waited_s`` to take it
        (back-pressure from a slow reader): an event on the generation's span."""
        if self.span.is_recording():
            self.span.add_event("specdec.stream.piece", {"specdec.round.index": record.index,
                                                         "specdec.new_tokens": len(record.new_tokens),
                                                         "specdec.client_wait_ms": waited_s * 1e3})

    def record_text(self, messages: list[tuple[str, str]], output: str, finish_reason: str) -> None:
        """The conversation as the GenAI conventions write it (``gen_ai.input.messages``,
        ``gen_ai.output.messages``, JSON): only called when :attr:`with_text`."""
        def message(role: str, text: str, **more) -> dict:
            return {"role": role, "parts": [{"type": "text", "content": text}], **more}

        self.span.set_attributes({
            "gen_ai.input.messages": json.dumps([message(role, text) for role, text in messages]),
            "gen_ai.output.messages": json.dumps([message("assistant", output,
                                                          finish_reason=FINISH_REASONS.get(finish_reason, finish_reason))]),
        })

    def finish(self, result) -> None:
        """From the generation's specdec.records.GenerationResult."""
        self.output_tokens = len(result.token_ids)
        if result.token_ids and self.admitted is not None:
            # The controller times its first token from its own start, right after the slot was given.
            self.first_token_s = self.admitted - self.start + result.stats.time_to_first_token_ms / 1e3
        if not self.span.is_recording():
            return
        e2e = time.perf_counter() - self.start
        latency = {"gen_ai.latency.e2e": e2e}
        if self.first_token_s is not None:
            latency["gen_ai.latency.time_to_first_token"] = self.first_token_s
            if len(result.token_ids) > 1:
                latency["gen_ai.latency.time_per_output_token"] = (e2e - self.first_token_s) / (len(result.token_ids) - 1)
        self.span.set_attributes({
            **latency,
            # The conventions' reasons ("stop" for any stop, as OpenAI says it); ours, finer, beside them.
            "gen_ai.response.finish_reasons": [FINISH_REASONS.get(result.finish_reason, result.finish_reason)],
            "specdec.finish_reason": result.finish_reason,
            "gen_ai.usage.input_tokens": result.stats.prompt_tokens,
            "gen_ai.usage.output_tokens": len(result.token_ids),
            "specdec.rounds": result.stats.rounds,
            "specdec.draft_tokens.proposed": result.stats.draft_tokens_proposed,
            "specdec.draft_tokens.accepted": result.stats.draft_tokens_accepted,
        })


class GenerationInstrumentation:
    def __init__(self, model: str = "", metrics: OrchestratorMetrics | None = None, with_text: bool = False) -> None:
        self.model = model
        self.metrics = metrics
        self.with_text = with_text  # prompt and output text on generation spans (--trace-text; off: counts only)

    @contextlib.contextmanager
    def generation(self, method: str, grpc_context=None, http_headers=None,
                   operation: str = "text_completion") -> Iterator[ObservedGeneration]:
        """Around one generation: the root span, the request metrics. ``method`` is the gRPC method
        (Generate, GenerateStream) or the HTTP route (/v1/completions, /v1/chat/completions; then
        ``http_headers`` are the request's headers, and ``operation`` is "chat" for chat completions)."""
        start = time.perf_counter()
        span = trace.INVALID_SPAN
        if telemetry.enabled():
            parent = None
            # A caller that traces (W3C traceparent in the metadata or headers) gets the generation under its span.
            if grpc_context is not None:
                parent = propagate.extract({m.key: m.value for m in grpc_context.invocation_metadata() or ()})
            elif http_headers is not None:
                parent = propagate.extract(dict(http_headers))
            if http_headers is None:
                protocol = {"rpc.system": "grpc", "rpc.service": "specdec.v1.GenerationService", "rpc.method": method}
            else:
                protocol = {"http.request.method": "POST", "http.route": method}
            span = telemetry.tracer().start_span(
                f"{operation} {self.model}", context=parent, kind=SpanKind.SERVER,
                attributes={
                    "gen_ai.operation.name": operation,
                    "gen_ai.provider.name": PROVIDER,
                    "gen_ai.request.model": self.model,
                    **protocol,
                },
            )
        observed = ObservedGeneration(span, start, self.with_text)
        if self.metrics is not None:
            self.metrics.in_flight.labels(method).inc()
        try:
            yield observed
        except BaseException as exc:
            observed.code = _status_code(exc)
            if span.is_recording():
                if isinstance(exc, Exception):
                    span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, observed.code.name))
                span.set_attribute("error.type", observed.code.name)
            raise
        finally:
            if http_headers is None:
                span.set_attribute("rpc.grpc.status_code", observed.code.value[0])
            else:
                span.set_attribute("http.response.status_code", http_status_of(observed.code))
            span.end()
            if self.metrics is not None:
                self._count_generation(method, operation, observed, time.perf_counter() - start)

    def _count_generation(self, method: str, operation: str, observed: ObservedGeneration, seconds: float) -> None:
        m, labels = self.metrics, (operation, self.model)
        exemplar = {"trace_id": observed.trace_id} if observed.trace_id else None
        m.in_flight.labels(method).dec()
        m.request_duration.labels(method).observe(seconds)
        m.requests.labels(method, observed.code.name).inc()
        m.genai_request_duration.labels(*labels).observe(seconds, exemplar)
        if observed.first_token_s is not None:
            m.time_to_first_token.labels(observed.mode).observe(observed.first_token_s)
            m.genai_time_to_first_token.labels(*labels).observe(observed.first_token_s, exemplar)
            if observed.output_tokens > 1:
                m.genai_time_per_output_token.labels(*labels).observe(
                    (seconds - observed.first_token_s) / (observed.output_tokens - 1), exemplar)

    def refused(self, route: str, http_headers, status: int, error_type: str) -> str:
        """A span for an HTTP request refused before any generation began (a bad token, a body that
        does not parse, a request the server cannot take now), under the caller's trace; its trace
        id ("" when tracing is off). Not a generation: it carries no gen_ai.operation.name."""
        if not telemetry.enabled():
            return ""
        span = telemetry.tracer().start_span(
            f"POST {route}", context=propagate.extract(dict(http_headers)), kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route, "http.response.status_code": status,
                        "error.type": error_type},
        )
        span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()
        context = span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else ""

    def round(self, trace_parent, index: int, mode: str):
        """Around one round of the controller (no ``yield`` inside): ``with ... as observed:``,
        then ``observed.record = record`` once the round is complete."""
        if not telemetry.enabled() and self.metrics is None:
            return _NULL_ROUND
        return self._round(trace_parent, index, mode)

    @contextlib.contextmanager
    def _round(self, trace_parent, index: int, mode: str) -> Iterator[ObservedRound]:
        start = time.perf_counter()
        span = telemetry.tracer().start_span("specdec.round", context=trace_parent) if telemetry.enabled() else trace.INVALID_SPAN
        observed = ObservedRound()
        try:
            # Current while the round runs: the draft and verify calls become its children.
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                yield observed
        except BaseException as exc:
            if span.is_recording():
                if isinstance(exc, Exception):
                    span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            record = observed.record
            if record is not None:
                if span.is_recording():
                    span.set_attributes(round_attributes(record, mode))
                if self.metrics is not None:
                    self._count_round(record, mode, time.perf_counter() - start)
            span.end()

    def _count_round(self, record, mode: str, seconds: float) -> None:
        m = self.metrics
        m.round_duration.labels(mode).observe(seconds)
        m.tokens_generated.labels(mode).inc(len(record.new_tokens))
        if record.new_tokens:
            # The round's tokens arrive together: each is given an equal share of its time.
            latency, share = m.inter_token_latency.labels(mode), seconds / len(record.new_tokens)
            for _ in record.new_tokens:
                latency.observe(share)
        m.accepted_tokens.labels(mode).inc(len(record.accepted))
        m.tree_nodes.labels(mode).inc(record.tree_nodes)
        if record.bonus_token is not None:
            m.bonus_tokens.labels(mode).inc()
        if record.fallback:
            m.fallback_rounds.labels(mode).inc()
        proposed = Counter((name, position) for name, beams in record.proposals.items()
                           for beam in beams for position in range(1, len(beam) + 1))
        for (name, position), count in proposed.items():
            m.draft_proposed.labels(name, str(position)).inc(count)
        # The trie credits a draft with every node along its paths, so what a draft got accepted is
        # the first accepted_by_draft[name] positions.
        for name, count in record.accepted_by_draft.items():
            for position in range(1, count + 1):
                m.draft_accepted.labels(name, str(position)).inc()


def round_attributes(record, mode: str) -> dict:
    beams = [beam for beams in record.proposals.values() for beam in beams]
    attributes = {
        "specdec.round.index": record.index,
        "specdec.mode": mode,
        "specdec.drafts": len(record.proposals),
        "specdec.drafted": sum(len(b) for b in beams),
        "specdec.draft.depth": max((len(b) for b in beams), default=0),
        "specdec.accepted": len(record.accepted),
        "specdec.bonus": int(record.bonus_token is not None),
        "specdec.bonus.correction": record.bonus_is_correction,
        "specdec.new_tokens": len(record.new_tokens),
        "specdec.tree.nodes": record.tree_nodes,
        "specdec.tree.branching_factor": float(record.branching_factor),
        "specdec.winning_draft": record.winning_draft,
        "specdec.fallback": record.fallback,
        "specdec.chosen.width": record.chosen_width,
        "specdec.chosen.depth": record.chosen_depth,
        "specdec.predicted.tokens": float(record.expected_tokens),
        "specdec.predicted.ms": float(record.predicted_ms),
        "specdec.batch.company_sessions": record.company_sessions,
        # Rounds sent ahead (docs/scaling.md): this round's verdict came from one; ones dropped before it.
        "specdec.round.sent_ahead": record.sent_ahead,
        "specdec.round.discarded_ahead": record.discarded_ahead,
    }
    if record.fallback_reason:
        attributes["specdec.fallback_reason"] = record.fallback_reason
    # A draft that failed the round (the collector keeps such traces): apart from the rounds the
    # cost model chose not to draft, which are fallbacks too but no fault.
    attributes["specdec.draft_failed"] = bool(record.draft_failures)
    if record.draft_failures:
        attributes["specdec.draft_failures"] = list(record.draft_failures)
    return attributes


def _status_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, GeneratorExit):
        return grpc.StatusCode.CANCELLED  # a streaming client that went away
    return code_of(exc)
