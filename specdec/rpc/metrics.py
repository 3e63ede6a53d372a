"""Prometheus metrics of every specdec process, served on ``--metrics-port`` (``SPECDEC_METRICS_PORT``;
0 = off) at ``/metrics``.

Every service counts its RPCs (``specdec_requests_total``, ``specdec_request_duration_seconds``,
``specdec_requests_in_flight``); the draft and verify services add their KV caches and the tokens
their forward passes fed or reused; the orchestrator adds what speculation did, round by round.
Useful ratios come straight out of the counters, e.g.

- acceptance rate: ``sum(rate(specdec_draft_tokens_accepted_total[5m])) / sum(rate(specdec_draft_tokens_proposed_total[5m]))``
  (``by (position)`` for the rate at each draft position, ``by (draft)`` per draft service);
- mean tokens per round (accepted + bonus): ``rate(specdec_tokens_generated_total[5m]) / rate(specdec_round_duration_seconds_count[5m])``;
- mean accepted draft tokens per round: ``rate(specdec_accepted_tokens_total[5m]) / rate(specdec_round_duration_seconds_count[5m])``;
- 95th percentile time to first token: ``histogram_quantile(0.95, sum by (le) (rate(specdec_time_to_first_token_seconds_bucket[5m])))``;
- mean time per output token: ``rate(specdec_inter_token_latency_seconds_sum[5m]) / rate(specdec_inter_token_latency_seconds_count[5m])``.

The draft and verify services count their RPCs with :class:`ServerMetricsInterceptor`; the
orchestrator counts its generations itself (``specdec.orchestrator.instrumentation``). Each process
has its own registry (tests run several in one process), with the standard process
and Python collectors added.
"""

from __future__ import annotations

import contextlib
import logging
import time

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from specdec.rpc.interceptors import HEALTH_AND_REFLECTION, wrap_handler

log = logging.getLogger("specdec.rpc.metrics")
# The *_created series (a timestamp per counter and label set) double what is scraped and are not used.
disable_created_metrics()

# From a cached decoding step on a GPU (~1 ms) to a long CPU generation (minutes).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# One token's share of a round: well under a millisecond when a GPU round accepts several tokens.
TOKEN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def new_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class ServiceMetrics:
    """What every service exports: its RPCs by method (short name, e.g. ``DraftBeams``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.requests = Counter("specdec_requests", "RPCs finished, by method and gRPC status code", ["method", "code"], registry=r)
        self.request_duration = Histogram(
            "specdec_request_duration_seconds", "time to serve one RPC (a whole generation on the orchestrator)",
            ["method"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "specdec_requests_in_flight", "RPCs being served or waiting for the model (the queue depth)", ["method"], registry=r
        )


class ModelServiceMetrics(ServiceMetrics):
    """The draft and verify services: RPCs plus their KV caches and forward passes."""

    def __init__(self, store, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        r.register(SessionStoreCollector(store))
        self.reused_tokens = Counter(
            "specdec_cache_reused_tokens", "context tokens whose KV came from the session cache", ["method"], registry=r
        )
        self.fed_tokens = Counter(
            "specdec_forward_tokens", "tokens fed through the model (missing context + tree nodes or beams)", ["method"], registry=r
        )
        # Continuous batching (specdec.batching), observed at each call's first forward pass.
        self.batch_sessions = Histogram(
            "specdec_batch_sessions", "calls sharing the forward pass a call first ran in, that call included",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r,
        )
        self.batch_rows = Histogram(
            "specdec_batch_rows", "rows fed by the forward pass a call first ran in, over every call in it",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r,
        )
        self.queue_seconds = Histogram(
            "specdec_queue_seconds", "time a call waited for the model before its first forward pass",
            buckets=DURATION_BUCKETS, registry=r,
        )


class OrchestratorMetrics(ServiceMetrics):
    """The orchestrator: RPCs plus speculation, round by round."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.round_duration = Histogram(
            "specdec_round_duration_seconds", "one round: draft, merge, verify, accept (its _count is the number of rounds)",
            ["mode"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.tokens_generated = Counter("specdec_tokens_generated", "tokens added to outputs", ["mode"], registry=r)
        self.time_to_first_token = Histogram(
            "specdec_time_to_first_token_seconds", "from a generation's arrival (its wait for a slot included) to its first "
            "token, observed when the generation completes", ["mode"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.inter_token_latency = Histogram(
            "specdec_inter_token_latency_seconds", "time per output token: each round's duration spread evenly over the tokens "
            "it added (one observation per token, so _sum over _count is the mean)", ["mode"], buckets=TOKEN_BUCKETS, registry=r,
        )
        self.draft_proposed = Counter(
            "specdec_draft_tokens_proposed", "draft tokens proposed (every beam's), by draft service and position in the beam (1 = first)",
            ["draft", "position"], registry=r,
        )
        self.draft_accepted = Counter(
            "specdec_draft_tokens_accepted", "draft tokens the target accepted, by the draft that proposed them and position "
            "(a token two drafts proposed counts for each)", ["draft", "position"], registry=r,
        )
        self.accepted_tokens = Counter(
            "specdec_accepted_tokens", "draft tokens accepted (each token once, whichever drafts proposed it)", ["mode"], registry=r
        )
        self.bonus_tokens = Counter(
            "specdec_bonus_tokens", "the target's own tokens after the accepted path (one per round unless a stop came first)",
            ["mode"], registry=r,
        )
        self.fallback_rounds = Counter(
            "specdec_fallback_rounds", "rounds decoded without speculation because every draft failed, was late or had no room",
            ["mode"], registry=r,
        )
        self.tree_nodes = Counter("specdec_tree_nodes", "token-tree nodes sent to the verify service", ["mode"], registry=r)
        # The OpenTelemetry GenAI server metrics, beside the specdec_* ones, for dashboards built on
        # the conventions; each observation carries its generation's trace id as an exemplar
        # (OpenMetrics), linking a slow bucket to a trace.
        self.genai_request_duration = Histogram(
            "gen_ai_server_request_duration_seconds", "GenAI server request duration (gen_ai.server.request.duration)",
            ["gen_ai_operation_name", "gen_ai_request_model"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.genai_time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "time to the first output token (gen_ai.server.time_to_first_token)",
            ["gen_ai_operation_name", "gen_ai_request_model"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.genai_time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "time per output token after the first (gen_ai.server.time_per_output_token)",
            ["gen_ai_operation_name", "gen_ai_request_model"], buckets=TOKEN_BUCKETS, registry=r,
        )


class SessionStoreCollector:
    """Read at scrape time, so serving requests pays nothing for these."""

    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        yield GaugeMetricFamily("specdec_active_sessions", "sessions holding a KV cache", value=len(self.store))
        yield GaugeMetricFamily("specdec_kv_cache_tokens", "tokens held in KV caches over all sessions", value=self.store.cached_tokens())
        yield GaugeMetricFamily("specdec_kv_cache_bytes", "KV-cache memory over all sessions", value=self.store.cached_bytes())
        yield CounterMetricFamily("specdec_kv_cache_evictions", "sessions evicted to stay within the limits", value=self.store.evictions)
        yield CounterMetricFamily("specdec_kv_cache_shared_tokens", "context tokens a new session copied from another's cache "
                                  "(a shared prefix) instead of computing them", value=self.store.shared_tokens)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread."""
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, port)


class ServerMetricsInterceptor(grpc.ServerInterceptor):
    """Counts, times and gauges every call except health checks and reflection."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_AND_REFLECTION):
            return handler
        method = details.method.rpartition("/")[2]
        in_flight = self.metrics.in_flight.labels(method)
        duration = self.metrics.request_duration.labels(method)

        @contextlib.contextmanager
        def measured(request, context):
            in_flight.inc()
            start = time.perf_counter()
            try:
                yield
            finally:
                duration.observe(time.perf_counter() - start)
                in_flight.dec()
                self.metrics.requests.labels(method, _status_code(context).name).inc()

        return wrap_handler(handler, measured)


def _status_code(context) -> grpc.StatusCode:
    """The code a call ended with (a servicer's ``context.abort`` sets it before raising)."""
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
