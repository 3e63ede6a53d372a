"""A client for the public API (``specdec.v1.GenerationService``), for other Python services.

    from specdec.client import Client

    with Client("127.0.0.1:50051") as client:
        reply = client.generate("def fibonacci(n):", max_new_tokens=64, mode="tree")
        print(reply.text, reply.stats.tokens_per_second)
        for chunk in client.stream("Once upon", max_new_tokens=32, temperature=0.8, seed=7):
            print(chunk.text, end="", flush=True)

:class:`AsyncClient` is the same over ``grpc.aio`` (``await client.generate(...)``,
``async for chunk in client.stream(...)``).

- **Replies** are the protobuf messages themselves (``GenerateResponse``, ``GenerateStreamResponse``,
  ``ModelInfo`` from :mod:`specdec.v1`), so every field the server sends is there.
- **Requests** are built from keyword arguments by :func:`build_request`: any field of
  ``GenerateRequest`` by name, and the fields of ``SamplingParams`` (``temperature``, ``top_p``,
  ``top_k``, ``seed``) and ``SpeculationParams`` (``beam_width``, ``draft_length``, ...) flat, so a
  field added to the protos works without a change here; an unknown name is a ``TypeError``.
  ``None`` leaves a field unset (the server's default).
- **Security**: ``tls=True`` (the system's trusted roots) or ``tls="ca.pem"``, a client certificate
  (``client_cert``/``client_key``) for mutual TLS, and ``token`` / ``token_file``: the bearer token
  sent as ``authorization: Bearer <token>`` (:mod:`specdec.rpc.security` builds both, as for the
  services themselves).
- **Deadlines**: ``timeout_s`` per call (the client's default unless given); a call past it fails
  with ``DEADLINE_EXCEEDED``. Errors are ``grpc.RpcError`` with the server's status code.
- **Retries**: gRPC's own retry policy from :data:`SERVICE_CONFIG`, a service config JSON file that
  ships with the protos (any gRPC client can load it): a call answered ``UNAVAILABLE`` is tried
  again, up to 4 attempts with backoff from 0.2 s to 2 s, within the call's deadline. A stream is
  retried only before its first message arrives. ``retries=False`` turns it off.

:data:`PROTO_DIR` is the directory holding ``specdec/v1/*.proto`` and ``service_config.json``,
for clients in other languages (``python -c "import specdec.client as c; print(c.PROTO_DIR)"``).
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc

from specdec.rpc import security
from specdec.v1 import common_pb2, generation_pb2, generation_pb2_grpc

__all__ = [
    "AsyncClient", "Client", "PROTO_DIR", "SERVICE_CONFIG", "build_request", "channel_options", "service_config",
]


def _proto_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "protos", here.parent / "protos"):  # an installed wheel; the source tree
        if (candidate / "specdec" / "v1" / "generation.proto").is_file():
            return candidate
    return here / "protos"


PROTO_DIR: Path = _proto_dir()
SERVICE_CONFIG: Path = PROTO_DIR / "specdec" / "v1" / "service_config.json"
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 600.0
MAX_MESSAGE_MB = 64


def service_config() -> str:
    """The gRPC service config (JSON text) with the public API's retry policy."""
    try:
        return json.dumps(json.loads(SERVICE_CONFIG.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{SERVICE_CONFIG}: the retry policy is missing (this specdec was installed without protos/; "
            "install a wheel or sdist built with setup.py, or pass retries=False)"
        ) from None


def channel_options(retries: bool = True, max_message_mb: int = MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    """Channel options for the public API: message limits and, with ``retries``, the service
    config's retry policy."""
    limit = max_message_mb << 20
    options: list[tuple[str, Any]] = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    if retries:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", service_config())]
    else:
        options += [("grpc.enable_retries", 0)]
    return options


# --------------------------------------------------------------------------- requests

_SUBMESSAGES = {"sampling": generation_pb2.SamplingParams, "speculation": generation_pb2.SpeculationParams}


def _fields(message_class) -> dict[str, Any]:
    return {f.name: f for f in message_class.DESCRIPTOR.fields}


def _mode(value) -> int:
    """``"tree"``, ``"DECODING_MODE_TREE"`` or the enum number."""
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("DECODING_MODE_") else f"DECODING_MODE_{name}"
        try:
            return generation_pb2.DecodingMode.Value(name)
        except ValueError:
            names = [n.removeprefix("DECODING_MODE_").lower() for n in generation_pb2.DecodingMode.keys()]
            raise ValueError(f"unknown mode {value!r}; one of {', '.join(names)}") from None
    return int(value)


def build_request(prompt: str | None = None, **fields: Any) -> generation_pb2.GenerateRequest:
    """A ``GenerateRequest`` from keyword arguments: request fields by name, sampling and
    speculation fields flat (or whole, as ``sampling=`` / ``speculation=`` messages or dicts).
    ``mode`` may be a name (``"tree"``). ``None`` leaves a field unset."""
    request_fields = _fields(generation_pb2.GenerateRequest)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in _SUBMESSAGES}
    if prompt is not None:
        fields["prompt"] = prompt
    for name, value in fields.items():
        if value is None:
            continue
        if name in _SUBMESSAGES:
            message_class = _SUBMESSAGES[name]
            if isinstance(value, message_class):
                value = {f.name: v for f, v in value.ListFields()}
            nested[name].update(value)
        elif name in request_fields:
            top[name] = value
        else:
            owner = next((sub for sub, cls in _SUBMESSAGES.items() if name in _fields(cls)), None)
            if owner is None:
                known = sorted([*request_fields, *(n for cls in _SUBMESSAGES.values() for n in _fields(cls))])
                raise TypeError(f"GenerateRequest has no field {name!r} (nor its sampling or speculation); known: {', '.join(known)}")
            nested[owner][name] = value
    if "mode" in top:
        top["mode"] = _mode(top["mode"])
    if isinstance(top.get("stop"), str):
        top["stop"] = [top["stop"]]
    for name, message_class in _SUBMESSAGES.items():
        if nested[name]:
            try:
                top[name] = message_class(**nested[name])
            except ValueError as exc:  # protobuf's "Protocol message X has no "y" field."
                raise TypeError(str(exc)) from None
    return generation_pb2.GenerateRequest(**top)


# --------------------------------------------------------------------------- clients


class _Base:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        tls: bool | str | os.PathLike = False,
        client_cert: str | os.PathLike | None = None,
        client_key: str | os.PathLike | None = None,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        retries: bool = True,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        max_message_mb: int = MAX_MESSAGE_MB,
    ) -> None:
        """``address``: host:port of the orchestrator. ``tls``: ``True`` for TLS with the system's
        trusted roots, or the path of a CA bundle (PEM); a client certificate turns TLS on too.
        ``token`` / ``token_file`` (the file wins): the bearer token. ``timeout_s``: each call's
        deadline unless the call gives one (``None``: none). ``metadata``: sent on every call.
        ``options``: more gRPC channel options."""
        is_path = not isinstance(tls, bool)
        self._tls = types.SimpleNamespace(
            tls=bool(tls), tls_ca=str(tls) if is_path and tls else "",
            tls_client_cert=str(client_cert or ""), tls_client_key=str(client_key or ""),
        )
        secret = security.load_token(types.SimpleNamespace(auth_token=token or "", auth_token_file=str(token_file or "")))
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = (*security.token_metadata(secret), *metadata)
        self._options = [*channel_options(retries, max_message_mb), *options]
        self._channel = security.client_channel(address, self._tls, options=self._options, aio=self._aio)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)

    _aio = False

    def _call_args(self, timeout_s, metadata) -> dict[str, Any]:
        return {
            "timeout": self.timeout_s if timeout_s is ... else timeout_s,
            "metadata": (*self._metadata, *metadata),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


class Client(_Base):
    """A blocking client; a context manager that closes its channel."""

    def generate(self, prompt: str | None = None, *, timeout_s: float | None = ..., metadata=(), **fields) -> generation_pb2.GenerateResponse:
        """One generation (``Generate``); ``fields`` as for :func:`build_request`."""
        return self._stub.Generate(build_request(prompt, **fields), **self._call_args(timeout_s, metadata))

    def stream(self, prompt: str | None = None, *, timeout_s: float | None = ..., metadata=(), **fields) -> Iterator[generation_pb2.GenerateStreamResponse]:
        """``GenerateStream``: each round's tokens as accepted, the last message with the finish
        reason and statistics. Leaving the loop early cancels the call."""
        request = build_request(prompt, **fields)  # a bad field fails here, not at the first next()
        call = self._stub.GenerateStream(request, **self._call_args(timeout_s, metadata))

        def chunks():
            try:
                yield from call
            finally:
                call.cancel()

        return chunks()

    def info(self, *, timeout_s: float | None = ..., metadata=()) -> common_pb2.ModelInfo:
        """``GetInfo``: the target model the cluster serves."""
        return self._stub.GetInfo(common_pb2.GetInfoRequest(), **self._call_args(timeout_s, metadata))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The same over ``grpc.aio``: create it inside the running event loop; ``async with``
    closes it."""

    _aio = True

    async def generate(self, prompt: str | None = None, *, timeout_s: float | None = ..., metadata=(), **fields) -> generation_pb2.GenerateResponse:
        return await self._stub.Generate(build_request(prompt, **fields), **self._call_args(timeout_s, metadata))

    def stream(self, prompt: str | None = None, *, timeout_s: float | None = ..., metadata=(), **fields) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        """An async iterator over ``GenerateStream``'s messages; leaving the loop early cancels the call."""
        request = build_request(prompt, **fields)
        call = self._stub.GenerateStream(request, **self._call_args(timeout_s, metadata))

        async def chunks():
            try:
                async for chunk in call:
                    yield chunk
            finally:
                call.cancel()

        return chunks()

    async def info(self, *, timeout_s: float | None = ..., metadata=()) -> common_pb2.ModelInfo:
        return await self._stub.GetInfo(common_pb2.GetInfoRequest(), **self._call_args(timeout_s, metadata))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
