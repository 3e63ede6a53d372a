"""The HTTP door's streams and worker threads: server-sent events (:func:`sse`,
:class:`EventStream`), a blocking call's outcome carried out of its thread (:func:`_capture`), and
the client's going away watched for (:func:`_watch_disconnect`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any, AsyncIterator, Callable

import anyio

log = logging.getLogger("specdec.orchestrator.http")


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {text}\n\n".encode()


@dataclasses.dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None


def _capture(fn: Callable[[], Any]) -> Callable[[], _Outcome]:
    def run() -> _Outcome:
        try:
            return _Outcome(fn())
        except Exception as exc:  # noqa: BLE001 - answered as an error by the caller
            return _Outcome(error=exc)
    return run


async def _watch_disconnect(receive, cancel: threading.Event, on_disconnect: Callable[[], None] | None = None) -> None:
    """Wait for the client to go away (the request body has been read: the next message says so)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            if on_disconnect is not None:
                on_disconnect()
            return


class EventStream:
    """A server-sent events response whose events come from ``events``; a client that goes away
    sets ``cancel`` (the generation stops after its current round). ``done()`` runs once at the end."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str], cancel: threading.Event,
                 done: Callable[[], None], stall_s: float = 0.0) -> None:
        self.events, self.headers, self.cancel, self.done = events, headers, cancel, done
        self.stall_s = stall_s  # a client that takes no event for this long is cut off (0: never)

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   *((k.lower().encode(), v.encode()) for k, v in self.headers.items())]
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_watch_disconnect, receive, self.cancel, tasks.cancel_scope.cancel)
                try:
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    async for event in self.events:
                        # A send waits while the client's socket is full: a client that stops reading
                        # would hold the generation, and its slot, there.
                        with anyio.fail_after(self.stall_s or None):
                            await send({"type": "http.response.body", "body": event, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except TimeoutError:
                    log.warning("a streaming client took no output for %g s (stall_timeout_s): cut off", self.stall_s)
                    self.cancel.set()
                except OSError:  # the connection broke under a send
                    self.cancel.set()
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
            self.done()

