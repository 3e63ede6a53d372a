"""The HTTP door's server: uvicorn serving :class:`~specdec.orchestrator.http_api.HttpApi` from a
thread of the orchestrator process, with the limits that keep a careless or hostile client from
holding it (README, "Careless and hostile clients"): a connection cap, a read deadline on each
request head, bounded kernel send buffers."""

from __future__ import annotations

import socket
import ssl
import threading
import time

from specdec.orchestrator.http_api import HttpApi

SEND_BUFFER_BYTES = 256 << 10  # per connection, in the kernel: enough for any stream's pace


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (port 0: a free one), so the port is known and taken at once.

    Its connections' kernel send buffers are bounded (``SEND_BUFFER_BYTES``, not the kernel's
    autotuned megabytes): a client that stops reading fills them soon, so the stall timeout sees it,
    and each such client holds little memory meanwhile."""
    family = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server = socket.create_server((host.strip("[]"), port), family=family)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)  # inherited by accepted sockets
    return server


def head_deadline_protocol(timeout_s: float):
    """uvicorn's h11 protocol, with a deadline on each request head: a connection whose head has
    not arrived ``timeout_s`` after it opened (or after its last response) is closed.

    Written here because uvicorn has no such setting: its keep-alive timer starts only after a
    first response and stops at any byte received, so a client sending a header byte now and then
    would hold a connection (and, under ``limit_concurrency``, a place) for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(timeout_s, self._head_late)

        def _head_late(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request head has arrived since
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._head_timer.cancel()  # a head arrived: the request is the app's now

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._head_late)

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return HeadDeadline


class HttpServer:
    """uvicorn serving an :class:`HttpApi` from a daemon thread of this process."""

    def __init__(self, api: HttpApi, settings) -> None:
        import uvicorn

        self.api = api
        self.host = settings.host
        self.socket = listening_socket(settings.host, settings.http_port)
        self.port = self.socket.getsockname()[1]
        self.tls = bool(settings.tls_cert)
        tls = {}
        if self.tls:
            tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
            if getattr(settings, "tls_client_ca", ""):
                tls |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(api.app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, limit_concurrency=settings.max_connections,
                                http=head_deadline_protocol(settings.http_read_timeout_s), **tls)
        config.load()  # a TLS file that cannot be read fails here, at start-up
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="specdec-http",
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self, admission, timeout_s: float = 30.0) -> None:
        """Serve, admitting generations through the gRPC server's ``admission`` (graceful shutdown
        closes it: then /health answers 503 and new generations are refused)."""
        self.api.admission = admission
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP API did not start on {self.host}:{self.port}")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_http(generations, settings, token: str, registry) -> HttpServer:
    """The HTTP API of ``settings`` (``http_port``, ``host``, TLS, ``max_message_mb``,
    ``chat_template``), its port bound; :meth:`HttpServer.start` serves it."""
    threads = settings.max_active_generations + settings.max_queued_generations + 8
    api = HttpApi(generations, token, registry, settings.chat_template, settings.max_message_mb << 20, threads)
    return HttpServer(api, settings)
