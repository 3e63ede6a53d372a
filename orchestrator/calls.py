"""What the orchestrator's front doors (the gRPC servicer in ``specdec.orchestrator.server``, the
HTTP API in ``specdec.orchestrator.http_api``) hand the generations (``specdec.orchestrator.generations``)
beside the parameters, and get back from them."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Mapping

from specdec.records import GenerationResult, RoundRecord, TokenLogprob


@dataclasses.dataclass
class Call:
    """One call for a generation, as a front door received it: gRPC (Generate, GenerateStream) or
    HTTP (specdec.orchestrator.http_api)."""

    method: str  # the metrics' method label and the span's: the gRPC method or the HTTP route
    deadline: float | None = None  # time.monotonic() by which the generation must end (None: no deadline)
    cancelled: Callable[[], bool] | None = None  # true once the client has gone away
    grpc_context: Any = None  # a gRPC call's context (the caller's trace context is in its metadata)
    http_headers: Mapping[str, str] | None = None  # an HTTP call's headers (its traceparent)
    operation: str = "text_completion"  # gen_ai.operation.name: "chat" for chat completions
    trace_id: str = ""  # the generation's trace, once it has one (the doors return it to the caller)
    request_id: str = ""  # the client's id for the request ("": a new one); checked as it is used
    on_trace_id: Callable[[str], None] | None = None  # how the door hands the trace id over before the output (gRPC: metadata)
    messages: list[tuple[str, str]] | None = None  # a chat's (role, text) pairs, for spans that record text (--trace-text)

    @classmethod
    def of_grpc(cls, method: str, context) -> Call:
        remaining = context.time_remaining()  # None when the client set no deadline
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e6 else None
        return cls(method, deadline, lambda: not context.is_active(), grpc_context=context)


class Stall:
    """``with stall:`` around handing one message to a client that may stop taking them: once that
    takes ``timeout_s`` (0: never), ``on_stall()`` runs (from a timer thread), which cuts the client
    off, so that its generation stops and frees its slot."""

    def __init__(self, timeout_s: float, on_stall: Callable[[], None]) -> None:
        self.timeout_s, self.on_stall = timeout_s, on_stall
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Stall:
        if self.timeout_s:
            self._timer = threading.Timer(self.timeout_s, self.on_stall)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclasses.dataclass
class StreamPiece:
    """One step of a streamed generation, for every front door: a round's tokens, the text they
    release and their log-probabilities (when asked for); or, last, the text held back until the
    end (it might have begun a stop string) and the result."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    record: RoundRecord | None = None  # the round; None on the last piece
    result: GenerationResult | None = None  # on the last piece only
