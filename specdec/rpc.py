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

from specdec.errors import InvalidRequest, NotReady, Overloaded, Unavailable
from specdec.service_info import ModelDescription
from specdec.v1 import common_pb2

log = logging.getLogger("specdec.rpc")


STATUS_OF_ERROR = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
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


def start_server(add_servicers, service_names: list[str], host: str, port: int, max_message_mb: int = 64, workers: int = 16,
                 interceptors=()):
    """Start a server with the given servicers plus grpc.health.v1 and reflection.

    Returns ``(server, bound_port, health_servicer)``; every service is marked SERVING.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=channel_options(max_message_mb), interceptors=list(interceptors)
    )
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not listen on {host}:{port}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def wait_until_serving(address: str, timeout_s: float, service: str = "", alive=lambda: True) -> None:
    """Block until ``address`` reports SERVING on grpc.health.v1; ``alive()`` false aborts early."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
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
