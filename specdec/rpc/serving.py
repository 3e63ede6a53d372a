"""Process start-up shared by the model services: logging, threads, model loading, signals."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from specdec import telemetry

log = logging.getLogger("specdec")


class ModelWorker:
    """Runs a service's model calls one at a time on one dedicated thread.

    gRPC hands each call to whichever worker thread is free; on a CPU each calling thread gets an
    OpenMP team of its own, and teams left spinning in other threads steal the cores the next
    forward needs. Concurrent forwards would also only split the same cores (or the same GPU
    stream). One thread keeps a single team warm. The caller's context (its trace span) is carried
    over, so spans made inside stay children of the call's span.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def run(self, fn, *args, **kwargs):
        import contextvars

        return self._pool.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def load_for_service(service: str, name: str, settings):
    """Load a model and its tokenizer for a service; returns (model, tokenizer, description)."""
    import torch

    from specdec.model_store import load_model
    from specdec.service_info import describe_model

    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    log.info("%s: loading %s on %s (%s)", service, name, settings.device, settings.dtype)
    model, tokenizer = load_model(name, device=settings.device, dtype=settings.dtype)
    return model, tokenizer, describe_model(service, name, model, tokenizer)


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


def serve_until_signalled(server, health_servicer, grace_s: float = 30.0) -> None:
    """Block until SIGINT/SIGTERM, then shut down gracefully: report NOT_SERVING on grpc.health.v1,
    refuse new calls with UNAVAILABLE, give the calls in flight up to ``grace_s`` to finish (a
    second signal cuts that short), stop the server and return, so that the process exits 0. Calls
    still running after the grace period are cancelled; if their handlers do not return at once,
    the process exits 0 here without waiting for them.

    ``health_servicer`` is the one :func:`specdec.rpc.start_server` returned: it carries the
    server's :class:`Admission`. Health checks keep answering (NOT_SERVING) until the server stops.
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


def announce(service: str, host: str, port: int) -> None:
    # Launchers read this line to learn the bound port when port 0 was asked for.
    print(f"specdec {service} listening on {host}:{port}", flush=True)


def run_model_service(service: str, settings, model_name: str, make_servicer, add_servicer, service_name: str) -> None:
    """Start-up shared by the draft and verify services: load the model, bound the session store,
    start telemetry and the server, announce the port, serve until signalled.

    ``make_servicer(model, store, info, metrics)`` builds the servicer; ``add_servicer(servicer,
    server)`` is the generated ``add_*Servicer_to_server``.
    """
    from specdec.kv_cache import SessionStore
    from specdec.rpc.server import start_server
    from specdec.rpc.tracing import start_telemetry
    from specdec.rpc.security import describe_server_tls

    setup_logging()
    model, _, info = load_for_service(service, model_name, settings)
    store = SessionStore(settings.max_sessions, settings.kv_cache_mb << 20, ttl_s=settings.session_ttl_s)
    store.start_sweeper()
    interceptors, metrics = start_telemetry(service, settings, store, {"specdec.model": model_name})
    servicer = make_servicer(model, store, info, metrics)
    server, port, health = start_server(
        lambda s: add_servicer(servicer, s),
        [service_name],
        settings.host,
        settings.port,
        settings.max_message_mb,
        interceptors=interceptors,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        tls=settings,
    )
    log.info("%s: port speaks %s", service, describe_server_tls(settings))
    announce(service, settings.host, port)
    serve_until_signalled(server, health, settings.shutdown_grace_s)
