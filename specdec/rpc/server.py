"""gRPC edge helpers shared by the three servers: error-to-status mapping, server start-up with
health and reflection, and health waiting for launchers and tests.

The algorithm modules of this package never import this one; only the servers and clients do.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.rpc.decode_guard import DecodeGuard
from specdec.errors import Cancelled, DeadlineExceeded, InvalidRequest, NotReady, Overloaded, Unavailable
from specdec.service_info import ModelDescription
from specdec.v1 import common_pb2

log = logging.getLogger("specdec.rpc.server")


STATUS_OF_ERROR = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
}


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in STATUS_OF_ERROR.items():
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        # An internal call failed: pass its status on, naming where it came from.
        return exc.code(), f"upstream call failed: {exc.details()}"
    log.exception("unhandled error in RPC")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def rpc_method(method):
    """Turn exceptions raised by a servicer method (unary or server-streaming) into gRPC statuses."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                context.abort(*_status_of(exc))

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            context.abort(*_status_of(exc))

    return unary


def model_info_pb(info: ModelDescription, store) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        service=info.service,
        model=info.model,
        vocab_size=info.vocab_size,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        device=info.device,
        dtype=info.dtype,
        max_context=info.max_context,
        active_sessions=len(store),
        cached_tokens=store.cached_tokens(),
        eos_token_ids=info.eos_token_ids,
        version=info.version,
    )


def sampling_params(message, seed: int = 0):
    """SamplingParams from a request's temperature / top_p / top_k fields, checked."""
    from specdec.sampling import SamplingParams

    if not message.temperature >= 0:  # also catches NaN
        raise InvalidRequest(f"temperature = {message.temperature} must be >= 0")
    if not 0 <= message.top_p <= 1:
        raise InvalidRequest(f"top_p = {message.top_p} must be in [0, 1]")
    if message.top_k < 0:
        raise InvalidRequest(f"top_k = {message.top_k} must be >= 0")
    return SamplingParams(temperature=message.temperature, top_k=message.top_k, top_p=message.top_p or 1.0, seed=seed)


def distribution_pb(probs, precision) -> common_pb2.Distribution:
    from specdec.sampling import pack

    data, token_ids = pack(probs)
    return common_pb2.Distribution(precision=precision, probs=data, token_ids=token_ids, vocab_size=len(probs))


def distribution_from_pb(message, vocab_size: int):
    """The exact distribution a service sent (float64 for drafts, float32 for the target)."""
    import torch

    from specdec.sampling import normalise16, unpack

    if message.vocab_size != vocab_size:
        raise InvalidRequest(f"a distribution over {message.vocab_size} tokens does not fit the vocabulary of {vocab_size}")
    if any(not 0 <= t < vocab_size for t in message.token_ids):
        raise InvalidRequest("a distribution names a token outside the vocabulary")
    if message.precision == common_pb2.Distribution.PRECISION_FLOAT16:
        return normalise16(unpack(message.probs, list(message.token_ids), vocab_size, torch.float16))
    return unpack(message.probs, list(message.token_ids), vocab_size, torch.float32)


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    limit = max_message_mb << 20
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def server_options(max_message_mb: int) -> list[tuple[str, int]]:
    # Accept the clients' keepalive pings (client_options) instead of closing the connection.
    return [*channel_options(max_message_mb), ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 0)]


def client_options(max_message_mb: int) -> list[tuple[str, int]]:
    """Channel options for the orchestrator's internal clients: a restarted service is reconnected
    within about 2 s (gRPC's own default backs off up to 2 minutes), and a connection whose peer
    vanished without closing it (a host or link lost) is found dead by keepalive within ~15 s."""
    return [
        *channel_options(max_message_mb),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 10000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


UNGATED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ServingHealth(health.HealthServicer):
    """grpc.health.v1 plus the server's :class:`~specdec.rpc.serving.Admission`, which graceful
    shutdown closes when it turns health to NOT_SERVING."""

    def __init__(self, admission) -> None:
        super().__init__()
        self.admission = admission


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Counts every call but health checks and reflection while it runs; once the admission is
    closed (shutting down), refuses new ones with UNAVAILABLE, the code clients retry elsewhere."""

    def __init__(self, admission) -> None:
        self.admission = admission

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(UNGATED_SERVICES):
            return handler
        admission = self.admission

        def admit(context):
            if not admission.enter():
                context.abort(grpc.StatusCode.UNAVAILABLE, "the service is shutting down")

        def unary_reply(inner):
            def behavior(request, context):
                admit(context)
                try:
                    return inner(request, context)
                finally:
                    admission.leave()
            return behavior

        def streamed_reply(inner):
            def behavior(request, context):
                admit(context)
                try:
                    yield from inner(request, context)
                finally:
                    admission.leave()
            return behavior

        if handler.unary_unary:
            make, behavior = grpc.unary_unary_rpc_method_handler, unary_reply(handler.unary_unary)
        elif handler.unary_stream:
            make, behavior = grpc.unary_stream_rpc_method_handler, streamed_reply(handler.unary_stream)
        elif handler.stream_unary:
            make, behavior = grpc.stream_unary_rpc_method_handler, unary_reply(handler.stream_unary)
        else:
            make, behavior = grpc.stream_stream_rpc_method_handler, streamed_reply(handler.stream_stream)
        return make(behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def start_server(add_servicers, service_names: list[str], host: str, port: int, max_message_mb: int = 64, workers: int = 16,
                 interceptors=(), max_concurrent_rpcs: int | None = None, tls=None):
    """Start a server with the given servicers plus grpc.health.v1 and reflection.

    ``max_concurrent_rpcs`` bounds the calls in progress or queued for a worker; gRPC answers any
    call beyond it with RESOURCE_EXHAUSTED at once. ``tls``: settings with ``tls_cert``,
    ``tls_key`` and ``tls_client_ca`` (see :mod:`specdec.rpc.security`); ``None`` or unset = plaintext.
    Returns ``(server, bound_port, health_servicer)``; every service is marked SERVING, and
    :func:`specdec.rpc.serving.serve_until_signalled` shuts the server down gracefully.
    """
    from specdec.rpc.security import server_credentials
    from specdec.rpc.serving import Admission

    credentials = server_credentials(tls) if tls is not None else None
    admission = Admission()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=server_options(max_message_mb),
        # DecodeGuard: request bytes that do not parse are INVALID_ARGUMENT, not gRPC's INTERNAL.
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


def wait_until_serving(address: str, timeout_s: float, service: str = "", alive=lambda: True, tls=None) -> None:
    """Block until ``address`` reports SERVING on grpc.health.v1; ``alive()`` false aborts early.
    ``tls``: client settings (``tls_ca``, ``tls_client_cert``, ``tls_client_key``) for a TLS server."""
    from specdec.rpc.security import client_channel

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
