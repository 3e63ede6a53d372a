"""gRPC channel and server options, and the channel the orchestrator opens to each draft and
verify service: message limits, reconnection and keepalive, TLS (:mod:`specdec.rpc.security`) and
trace propagation (:mod:`specdec.rpc.tracing`)."""

from __future__ import annotations

import grpc

from specdec.rpc.security import client_channel
from specdec.rpc.tracing import traced_channel


def message_options(max_message_mb: int) -> list[tuple[str, int]]:
    limit = max_message_mb << 20
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def server_options(max_message_mb: int) -> list[tuple[str, int]]:
    return [
        *message_options(max_message_mb),
        # Accept the clients' keepalive pings (client_options) instead of closing the connection.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        # gRPC sets SO_REUSEPORT by default: a second server on a port in use would then start and
        # take half of the new connections. Without it, that second server fails to bind.
        ("grpc.so_reuseport", 0),
    ]


def client_options(max_message_mb: int) -> list[tuple[str, int]]:
    """Channel options for the orchestrator's internal clients: a restarted service is reconnected
    within about 2 s (gRPC's own default backs off up to 2 minutes), and a connection whose peer
    vanished without closing it (a host or link lost) is found dead by keepalive within ~15 s, and
    a name that resolves to tasks or pods by DNS (a Swarm service with ``endpoint_mode: dnsrr``, a
    headless Kubernetes Service) is looked up again within ~2 s of losing its address (gRPC's
    default waits 30 s), so a replaced task's new address is found as soon as it serves."""
    return [
        *message_options(max_message_mb),
        ("grpc.dns_min_time_between_resolutions_ms", 2000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 10000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def internal_channel(address: str, max_message_mb: int = 64, span_attributes: dict | None = None) -> grpc.Channel:
    """A channel to a draft or verify service: the process's client TLS (see
    :func:`~specdec.rpc.security.use_client_tls`), :func:`client_options`, and trace context on
    every call when tracing is on (so open it after tracing is set up), its CLIENT spans carrying
    ``span_attributes``."""
    return traced_channel(client_channel(address, options=client_options(max_message_mb)), address, span_attributes)
