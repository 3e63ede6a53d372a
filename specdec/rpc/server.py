"""A specdec process's gRPC server from start to exit: logging, telemetry, the server with
grpc.health.v1 and reflection, the start-up line launchers read, and graceful shutdown on a
signal; plus :func:`wait_until_serving` for launchers and tests, and :func:`run_model_service`,
the whole ``main`` of the draft and verify services.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from specdec import telemetry
from specdec.errors import check_range, check_token_ids
from specdec.rpc.channels import server_options
from specdec.rpc.convert import model_info_pb
from specdec.rpc.interceptors import Admission, AdmissionInterceptor, DecodeGuard
from specdec.rpc.metrics import ModelServiceMetrics, OrchestratorMetrics, ServerMetricsInterceptor, serve_metrics
from specdec.rpc.security import client_channel, describe_server_tls, server_credentials
from specdec.rpc.status import rpc_method
from specdec.rpc.tracing import RpcSpanNames, server_interceptor
from specdec.v1 import common_pb2

log = logging.getLogger("specdec")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def start_telemetry(service: str, settings, store=None, attributes: dict | None = None):
    """Tracing and metrics for one service process, from its settings (``trace_file``,
    ``metrics_port``, ``host``) and the ``OTEL_*`` variables.

    ``store`` is a model service's session store; the orchestrator passes none and gets no server
    interceptors: its generation span is the SERVER span (``specdec.orchestrator.instrumentation``).
    Returns ``(server_interceptors, metrics)``, ``metrics`` being ``None`` when they are off.
    """
    tracing = telemetry.setup_tracing(service, settings.trace_file, attributes)
    if tracing:
        telemetry.provider().add_span_processor(RpcSpanNames())
    metrics = None
    if settings.metrics_port:
        metrics = OrchestratorMetrics() if store is None else ModelServiceMetrics(store)
        serve_metrics(metrics.registry, settings.metrics_port, settings.host)
    interceptors: list[grpc.ServerInterceptor] = []
    if store is not None:
        if metrics is not None:
            interceptors.append(ServerMetricsInterceptor(metrics))
        if tracing:
            interceptors.append(server_interceptor())
    return interceptors, metrics


class PortInUse(RuntimeError):
    """Another process listens on the port a service was asked to serve on."""


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` naming ``host:port`` when something already listens there (port 0,
    a free one picked at bind time, is never in use). Called before a service loads its model, so
    that a second server on a busy port fails at once rather than minutes later."""
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # an address that does not resolve: the server's own bind reports it
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As a server binds: a port held only by closed connections (TIME_WAIT) is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(f"port {host}:{port} is in use: something already listens on it") from None
                # Any other failure (an address this host lacks, a privileged port) is left to the server's bind.


def exit_if_ports_in_use(service: str, settings) -> None:
    """Exit 1 with one plain line when the service's port, metrics port or HTTP port (``settings.host``,
    ``port``, ``metrics_port``, the orchestrator's ``http_port``) is taken."""
    try:
        for port in (settings.port, settings.metrics_port, getattr(settings, "http_port", 0)):
            check_port_free(settings.host, port)
    except PortInUse as exc:
        print(f"specdec {service}: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


class ServingHealth(health.HealthServicer):
    """grpc.health.v1 plus the server's :class:`~specdec.rpc.interceptors.Admission`, which graceful
    shutdown closes when it turns health to NOT_SERVING."""

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self.admission = admission


def start_server(add_servicers, service_names: list[str], host: str, port: int, max_message_mb: int = 64, workers: int = 16,
                 interceptors=(), max_concurrent_rpcs: int | None = None, tls=None):
    """Start a server with the given servicers plus grpc.health.v1 and reflection.

    ``max_concurrent_rpcs`` bounds the calls in progress or queued for a worker; gRPC answers any
    call beyond it with RESOURCE_EXHAUSTED at once. ``tls``: settings with ``tls_cert``,
    ``tls_key`` and ``tls_client_ca`` (see :mod:`specdec.rpc.security`); ``None`` or unset = plaintext.
    Returns ``(server, bound_port, health_servicer)``; every service is marked SERVING, and
    :func:`serve_until_signalled` shuts the server down gracefully. A port another server listens
    on is refused (no SO_REUSEPORT): ``RuntimeError``.
    """
    credentials = server_credentials(tls) if tls is not None else None
    admission = Admission()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=server_options(max_message_mb),
        # The first interceptor is the outermost: a call refused at shutdown or for bytes that do
        # not parse is neither counted nor traced.
        interceptors=[AdmissionInterceptor(admission), DecodeGuard(), *interceptors], maximum_concurrent_rpcs=max_concurrent_rpcs or None,
    )
    add_servicers(server)
    health_servicer = ServingHealth(admission)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not listen on {host}:{port}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def announce(service: str, host: str, port: int) -> None:
    # Launchers read this line to learn the bound port when port 0 was asked for.
    print(f"specdec {service} listening on {host}:{port}", flush=True)


def serve_until_signalled(server, health_servicer: ServingHealth, grace_s: float = 30.0) -> None:
    """Block until SIGINT/SIGTERM, then shut down gracefully: report NOT_SERVING on grpc.health.v1,
    refuse new calls with UNAVAILABLE, give the calls in flight up to ``grace_s`` to finish (a
    second signal cuts that short), stop the server and return, so that the process exits 0. Calls
    still running after the grace period are cancelled; if their handlers do not return at once,
    the process exits 0 here without waiting for them.

    ``health_servicer`` is the one :func:`start_server` returned: it carries the server's
    :class:`Admission`. Health checks keep answering (NOT_SERVING) until the server stops.
    """
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_):
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    # Python runs signal handlers in the main thread between bytecodes; when the kernel hands the
    # signal to another thread (gRPC's, torch's), an untimed wait here would never see it.
    while not stop.wait(0.5):
        pass
    admission = health_servicer.admission
    health_servicer.enter_graceful_shutdown()
    admission.close()
    log.info("shutting down: NOT_SERVING, refusing new calls; %d in flight get up to %.0f s", admission.in_flight, grace_s)
    idle = admission.wait_idle(grace_s, hurry)
    if not idle:
        log.warning("shutting down: %d call(s) still in flight are cancelled", admission.in_flight)
    # Idle means every handler has returned, not that gRPC has sent each call's final status yet:
    # a short grace lets it, where stop(0) would cancel a stream that already sent all its messages.
    server.stop(5.0 if idle else 0).wait()
    log.info("stopped")
    telemetry.shutdown()  # export the spans still buffered
    if not idle and not admission.wait_idle(2.0):
        # A handler still busy (a long forward pass) would hold the interpreter's exit, which joins
        # gRPC's worker threads: the grace period is over, so leave without them.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)


def wait_until_serving(address: str, timeout_s: float, service: str = "", alive=lambda: True, tls=None) -> None:
    """Block until ``address`` reports SERVING on grpc.health.v1; ``alive()`` false aborts early.
    ``tls``: client settings (``tls_ca``, ``tls_client_cert``, ``tls_client_key``) for a TLS server."""
    deadline = time.monotonic() + timeout_s
    with client_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive():
                raise RuntimeError(f"the service for {address} exited before it served")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not report SERVING within {timeout_s:.0f} s")
            time.sleep(0.2)


# --------------------------------------------------------------------------- the model services


class ModelServicer:
    """What the draft and verify servicers share: the model's description (``GetInfo``), the
    session store (``ReleaseSession``), and one call run in its session, its KV reuse counted.

    ``engine`` is the service's :class:`~specdec.draft_service.drafter.BeamDrafter` or
    :class:`~specdec.verify_service.verifier.TreeVerifier`: anything with a ``store``.
    """

    def __init__(self, engine, info, settings, metrics=None) -> None:
        self.engine = engine
        self.info = info  # specdec.service_info.ModelDescription
        self.settings = settings
        self.metrics = metrics  # specdec.rpc.metrics.ModelServiceMetrics, or None when metrics are off

    def context_ids(self, request) -> list[int]:
        """The request's whole context, checked: its ``context_token_ids`` after the first
        ``context_start`` tokens of its session's last context (:meth:`SessionStore.context`; a
        session that lacks them answers NOT_FOUND), at most the model's context in all."""
        max_context = self.info.max_context or 1 << 30
        start = check_range("context_start", request.context_start, 0, max_context - 1)
        tail = check_token_ids("context_token_ids", request.context_token_ids, self.info.vocab_size,
                               allow_empty=start > 0, max_len=max_context - start)
        return self.engine.store.context(request.session_id, start, tail, request.context_digest)

    def in_session(self, method: str, request, context, run):
        """``run(session_id, caller)`` in the request's session (``caller``: a
        :class:`~specdec.batching.Caller`, so that the model skips the call once its caller has
        gone). Without a session id the call is stateless: its cache is dropped right after. The
        forward pass it shared with other sessions is noted on the call's span."""
        from specdec.batching import Caller

        session_id = request.session_id or f"oneshot-{uuid.uuid4()}"
        try:
            outcome = run(session_id, Caller.of_rpc(context))
        finally:
            if not request.session_id:
                self.engine.release(session_id)
        batch = getattr(outcome, "batch", None)
        if batch is not None:
            trace.get_current_span().set_attributes({"specdec.batch.sessions": batch.sessions, "specdec.batch.rows": batch.rows,
                                      "specdec.queue_ms": outcome.queue_s * 1e3})
        if self.metrics is not None:
            self.metrics.reused_tokens.labels(method).inc(outcome.reused_tokens)
            self.metrics.fed_tokens.labels(method).inc(outcome.fed_tokens)
        return outcome

    @rpc_method
    def GetInfo(self, request, context):
        return model_info_pb(self.info, self.engine.store)

    @rpc_method
    def ReleaseSession(self, request, context):
        return common_pb2.ReleaseSessionResponse(released=self.engine.release(request.session_id))


def observe_batches(metrics):
    """What a :class:`~specdec.batching.BatchWorker` reports of each call's first pass, into the
    service's metrics (None when metrics are off)."""
    if metrics is None:
        return None

    def observe(batch, queue_s: float) -> None:
        metrics.batch_sessions.observe(batch.sessions)
        metrics.batch_rows.observe(batch.rows)
        metrics.queue_seconds.observe(queue_s)

    return observe


def load_for_service(service: str, name: str, settings, dtype: str | None = None):
    """Load a model and its tokenizer for a service, in ``dtype`` (by default the settings'; ``auto``
    here is :func:`specdec.precision.default_dtype`: a service that measures its candidates, the
    verify service, resolves it itself); returns (model, tokenizer, description)."""
    import torch

    from specdec.model_store import load_model
    from specdec.precision import default_dtype
    from specdec.service_info import describe_model

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    dtype = dtype or settings.dtype
    if dtype == "auto":
        dtype = default_dtype(settings.device)
    log.info("%s: loading %s on %s (%s)", service, name, settings.device, dtype)
    model, tokenizer = load_model(name, device=settings.device, dtype=dtype)
    return model, tokenizer, describe_model(service, name, model, tokenizer)


def run_model_service(service: str, settings, model_name: str, make_servicer, add_servicer, service_name: str,
                      load=load_for_service) -> None:
    """Start-up shared by the draft and verify services: refuse a port in use (before anything is
    loaded), load the model, bound the session store,
    start telemetry, measure the forward's cost curve (``--calibrate``; this warms the model), start
    the server, announce the port, serve until signalled.

    ``make_servicer(model, store, info, metrics, tokenizer)`` builds the servicer; ``add_servicer(servicer,
    server)`` is the generated ``add_*Servicer_to_server``. ``load(service, model_name, settings)``
    returns ``(model, tokenizer, description)``; a model-free service's gives ``None`` for the model.
    """
    from specdec.kv_cache import SessionStore

    setup_logging()
    exit_if_ports_in_use(service, settings)  # before the model: loading it may take minutes
    from specdec.model_store import ModelStoreError

    try:
        model, tokenizer, info = load(service, model_name, settings)
    except ModelStoreError as exc:
        # A model that is not there (not fetched, no such path, unknown to the hub): one line, no traceback.
        print(f"specdec {service}: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    store = SessionStore(settings.max_sessions, settings.kv_cache_mb << 20, ttl_s=settings.session_ttl_s)
    store.start_sweeper()
    interceptors, metrics = start_telemetry(service, settings, store, {"specdec.model": model_name})
    servicer = make_servicer(model, store, info, metrics, tokenizer)
    calibrate = getattr(servicer.engine, "calibrate", None)
    if info.forward_costs:
        pass  # measured while the precision was chosen (specdec.precision), on this very model
    elif settings.calibrate and calibrate is not None:
        # Before the server starts: health reports SERVING only once the model is warm.
        info.forward_costs = list(calibrate().points)
        log.info("%s: forward cost by rows fed: %s", service, ", ".join(f"{r}: {ms:.1f} ms" for r, ms in info.forward_costs))
    elif model is None:
        info.forward_costs = [(1, 0.0)]  # a model-free engine runs no forward: its proposals cost next to nothing
    server, port, health_servicer = start_server(
        lambda s: add_servicer(servicer, s),
        [service_name],
        settings.host,
        settings.port,
        settings.max_message_mb,
        interceptors=interceptors,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        tls=settings,
    )
    if info.precision:
        log.info("%s: dtype %s", service, info.precision)
    log.info("%s: port speaks %s", service, describe_server_tls(settings))
    announce(service, settings.host, port)
    serve_until_signalled(server, health_servicer, settings.shutdown_grace_s)
