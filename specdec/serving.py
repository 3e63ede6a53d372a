"""Process start-up shared by the model services: logging, threads, model loading, signals."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from specdec import telemetry

log = logging.getLogger("specdec")


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


def serve_until_signalled(server, health_servicer, grace_s: float = 5.0) -> None:
    """Block until SIGINT/SIGTERM; then report NOT_SERVING, finish in-flight calls, stop."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace_s).wait()
    telemetry.shutdown()  # export the spans still buffered


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
    from specdec.rpc import start_server
    from specdec.rpc_telemetry import start_telemetry

    setup_logging()
    model, _, info = load_for_service(service, model_name, settings)
    store = SessionStore(settings.max_sessions, settings.kv_cache_mb << 20)
    interceptors, metrics = start_telemetry(service, settings, store, {"specdec.model": model_name})
    servicer = make_servicer(model, store, info, metrics)
    server, port, health = start_server(
        lambda s: add_servicer(servicer, s),
        [service_name],
        settings.host,
        settings.port,
        settings.max_message_mb,
        interceptors=interceptors,
    )
    announce(service, settings.host, port)
    serve_until_signalled(server, health)
