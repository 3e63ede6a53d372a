"""Transport security and caller authentication for every gRPC hop, in one place.

- **TLS on servers.** :func:`server_credentials` turns a server's ``tls_cert`` / ``tls_key`` into
  credentials; with ``tls_client_ca`` set the server also requires a client certificate signed by
  that CA (mutual TLS), which is how the draft and verify services let only the orchestrator in.
- **TLS on clients.** :func:`client_channel` opens a channel that trusts ``tls_ca`` and presents
  ``tls_client_cert`` / ``tls_client_key``; plaintext when none is set. The orchestrator's clients,
  the launcher's health waits and the client package (:mod:`specdec.client`, which
  ``specdec generate`` uses) all open their channels here. A process that
  calls internal services names its client identity once, with :func:`use_client_tls`.
- **Bearer tokens on the public API.** :class:`BearerTokenInterceptor` asks every
  GenerationService call for ``authorization: Bearer <token>`` metadata: UNAUTHENTICATED without
  one, PERMISSION_DENIED for a wrong one (compared in constant time). Health checks and reflection
  stay open, so probes and ``grpcurl list`` need no secret.

Secrets (the token, key files) are read here and nowhere else, and never logged: error messages
name the setting and the file, never what is in it.
"""

from __future__ import annotations

import contextlib
import hmac
from pathlib import Path

import grpc

from specdec.rpc.interceptors import HEALTH_AND_REFLECTION, wrap_handler

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case


class SecurityConfigError(ValueError):
    """A TLS or token setting that cannot work (missing half of a pair, unreadable file)."""


def _read(path: str, setting: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"--{setting} {path}: cannot read it ({exc.strerror})") from None
    if not data.strip():
        raise SecurityConfigError(f"--{setting} {path}: the file is empty")
    return data


# --------------------------------------------------------------------------- servers


def server_tls_on(settings) -> bool:
    return bool(getattr(settings, "tls_cert", "") or getattr(settings, "tls_key", "") or getattr(settings, "tls_client_ca", ""))


def server_credentials(settings) -> grpc.ServerCredentials | None:
    """Credentials for a server's port from its ``tls_*`` settings; ``None`` means plaintext."""
    if not server_tls_on(settings):
        return None
    cert, key, client_ca = settings.tls_cert, settings.tls_key, getattr(settings, "tls_client_ca", "")
    if not (cert and key):
        raise SecurityConfigError("TLS needs both --tls-cert and --tls-key (--tls-client-ca alone cannot serve TLS)")
    ca = _read(client_ca, "tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(key, "tls-key"), _read(cert, "tls-cert"))], root_certificates=ca, require_client_auth=ca is not None
    )


def describe_server_tls(settings) -> str:
    """For the start-up log: what the port demands, never which secrets."""
    if not server_tls_on(settings):
        return "plaintext"
    return "TLS, client certificates required" if getattr(settings, "tls_client_ca", "") else "TLS"


# --------------------------------------------------------------------------- clients

_process_client_tls = None  # set once by a process that calls internal services (the orchestrator)


def use_client_tls(settings) -> None:
    """Make ``settings``' ``tls_ca`` / ``tls_client_cert`` / ``tls_client_key`` this process's
    default for :func:`client_channel` (checked now, so a bad file stops start-up)."""
    global _process_client_tls
    channel_credentials(settings)
    _process_client_tls = settings


def client_tls_on(settings) -> bool:
    """TLS when a CA or a client certificate is named, or ``tls`` (an optional attribute) is true:
    TLS with the system's trusted roots."""
    return settings is not None and bool(
        getattr(settings, "tls", False)
        or getattr(settings, "tls_ca", "") or getattr(settings, "tls_client_cert", "") or getattr(settings, "tls_client_key", "")
    )


def channel_credentials(settings) -> grpc.ChannelCredentials | None:
    """Channel credentials from ``tls_ca`` (trusted roots; the system's when unset) and the client
    certificate pair; ``None`` means plaintext."""
    if not client_tls_on(settings):
        return None
    ca, cert, key = getattr(settings, "tls_ca", ""), getattr(settings, "tls_client_cert", ""), getattr(settings, "tls_client_key", "")
    if bool(cert) != bool(key):
        raise SecurityConfigError("a client certificate needs both --tls-client-cert and --tls-client-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "tls-ca") if ca else None,
        private_key=_read(key, "tls-client-key") if key else None,
        certificate_chain=_read(cert, "tls-client-cert") if cert else None,
    )


def client_channel(address: str, tls=None, options=None, aio: bool = False):
    """A channel to ``address``: TLS when ``tls`` (or the process default) names a CA or a client
    certificate, plaintext otherwise. The server's certificate must name the host of ``address``.
    ``aio``: a ``grpc.aio`` channel instead of a blocking one."""
    credentials = channel_credentials(tls if tls is not None else _process_client_tls)
    kind = grpc.aio if aio else grpc
    if credentials is None:
        return kind.insecure_channel(address, options=options)
    return kind.secure_channel(address, credentials, options=options)


# --------------------------------------------------------------------------- bearer tokens


def load_token(settings) -> str:
    """The bearer token from ``auth_token_file`` (first) or ``auth_token``; '' when neither is set."""
    path = getattr(settings, "auth_token_file", "")
    if path:
        return _read(path, "auth-token-file").decode().strip()
    return getattr(settings, "auth_token", "").strip()


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``; empty when there is none."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


def _refusing(code: grpc.StatusCode, details: str):
    """A call scope (see :func:`~specdec.rpc.interceptors.wrap_handler`) that only answers ``code``."""

    @contextlib.contextmanager
    def refuse(request, context):
        context.abort(code, details)  # raises: the servicer method never runs
        yield

    return refuse


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>``; health and reflection stay open."""

    def __init__(self, token: str) -> None:
        if not token:
            raise SecurityConfigError("an empty bearer token would let everyone in")
        self._token = token.encode()

    def check(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        """``None`` when the metadata carries the token, else the status to refuse with."""
        values = [value for key, value in metadata or () if key == AUTHORIZATION]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
        scheme, _, given = (values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]).partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <token>'"
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not valid"
        return None

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_AND_REFLECTION):
            return handler
        refused = self.check(details.invocation_metadata)
        return handler if refused is None else wrap_handler(handler, _refusing(*refused))


def auth_interceptors(settings) -> list[grpc.ServerInterceptor]:
    """``[BearerTokenInterceptor]`` when ``settings`` name a token, else ``[]``."""
    token = load_token(settings)
    return [BearerTokenInterceptor(token)] if token else []

