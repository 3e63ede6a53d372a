"""The orchestrator's OpenAI-compatible HTTP API, on its own port (``--http-port``; 0 = off).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both also as server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``. Built on Starlette and
served by uvicorn from a thread of the orchestrator process, beside the gRPC server (``http_server``).

Every generation goes through the code every door shares: the JSON body becomes a
:class:`~specdec.generation.GenerationParams` (``http_schemas.generation_params``), which
:class:`~specdec.orchestrator.generations.Generations` runs exactly as it runs a gRPC call (the same
checks, modes and settings, the same generation queue, traces, metrics and run log), so the output
is the same token for token. Its calls block; they run in worker threads, one per generation in
flight, and a client that disconnects is seen as a cancelled call (the controller stops between
rounds).

What is OpenAI's and what is this server's:

- Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; the HTTP status
  comes from the one table :data:`HTTP_STATUS_OF_CODE`, keyed by the gRPC status the same failure
  gets on the gRPC API (``specdec.rpc.status``).
- ``n`` and completions' ``best_of`` run a generation per choice, at once (:func:`run_all`;
  streamed choices merged into one event stream); ``echo`` puts the prompt before the text;
  ``tools`` and ``tool_choice`` are the chat template's and ``specdec.orchestrator.http_tools``'.
  ``suffix`` is fill-in-the-middle. Penalties, ``logit_bias``, ``min_p``, ``min_tokens`` and ``bad_words`` are logits processors applied at every
  tree node (``specdec.processors``): speculation stays exact against the distribution they make.
  ``response_format`` and vLLM's ``guided_*`` fields are a grammar masked at every tree node the
  same way (``specdec.grammar``).
- ``temperature`` defaults to 1 as in OpenAI's API; 0 is greedy, the target's own greedy output.
- Each response carries the speculation statistics in an extra top-level ``spec_decode`` object,
  named as vLLM names its spec-decode metrics; vLLM's extra request fields ``top_k``,
  ``stop_token_ids``, ``ignore_eos`` and ``return_token_ids`` work too, as do this server's
  ``mode`` and ``speculation`` (``SpeculationParams``' fields).
- The bearer token and TLS are the gRPC port's (``--auth-token`` / ``--auth-token-file``,
  ``--tls-cert`` / ``--tls-key`` / ``--tls-client-ca``); ``/health`` and ``/metrics`` stay open, as
  gRPC health checks do.

This module is the app and its routes; the door's other parts: ``http_schemas`` (request bodies,
their checks, the generation parameters they make), ``http_chat`` (the chat template),
``http_responses`` (errors and the responses' JSON) and ``http_streaming`` (server-sent events).
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from specdec.errors import InvalidRequest
from specdec.generation import GenerationParams
from specdec.orchestrator.calls import Call
from specdec.orchestrator.http_chat import ChatTemplate, message_text
from specdec.orchestrator.http_responses import ApiError, Formatter
from specdec.orchestrator.http_schemas import (
    ChatBody, CompletionBody, _parse_json, choice_counts, completion_prompt, generation_params, grammar_of, parse_body,
    refuse_unsupported,
)
from specdec.orchestrator.http_tools import Tools, tag_terms, tools_of
from specdec.orchestrator.http_streaming import EventStream, _capture, _watch_disconnect, sse

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
TIMEOUT_HEADER = "x-request-timeout"  # seconds: the generation's deadline, as a gRPC call's deadline
PARSER_THREADS = 2  # bodies parsed at once, off the event loop


def trace_headers(request: Request) -> dict[str, str]:
    """The headers a caller's trace context may be in; never the token."""
    return {k: v for k, v in request.headers.items() if k not in ("authorization", "cookie")}


def _host_name(value: str) -> str:
    """The host of a Host header's value (or an address, or an origin without its scheme): no port, no brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


# --------------------------------------------------------------------------- the app


class HttpApi:
    """The Starlette app over the orchestrator's :class:`~specdec.orchestrator.generations.Generations`."""

    def __init__(self, generations, token: str = "", registry=None, chat_template: str = "",
                 max_body_bytes: int = 64 << 20, threads: int = 48) -> None:
        self.generations = generations
        self._token = token.encode()
        self.registry = registry
        self.template = ChatTemplate(generations, chat_template)
        self.tool_tags = tag_terms(generations.tokenizer)  # how a tool call grammar names its tags
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = {_host_name(h) for h in generations.settings.http_allowed_hosts} | {_host_name(generations.settings.host)}
        self.threads = threads
        self._limiter: anyio.CapacityLimiter | None = None
        self._parsers: anyio.CapacityLimiter | None = None
        self.admission = None  # the gRPC server's (specdec.rpc.interceptors.Admission), once it serves
        model = generations.target_info.model or generations.settings.target_model
        self.model = model
        self.aliases = {name for m in (model, generations.settings.target_model) for name in (m, Path(m).name) if name}
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route(COMPLETIONS, self.completions, methods=["POST"]),
                Route(CHAT, self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.one_model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self.http_exception, Exception: self.unexpected},
        )

    # ---- infrastructure

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # Worker threads for the generations' blocking calls: one per generation running or waiting
        # for a slot, and a few over (the generation queue, not this, refuses what is beyond).
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        return self._limiter

    @property
    def parsers(self) -> anyio.CapacityLimiter:
        # Worker threads for parsing bodies: a few, so that large bodies queue here, not in the generation threads.
        if self._parsers is None:
            self._parsers = anyio.CapacityLimiter(PARSER_THREADS)
        return self._parsers

    def serving(self) -> bool:
        return self.admission is not None and not self.admission.closed

    async def http_exception(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()
        if exc.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()
        return ApiError(exc.status_code, str(exc.detail)).response()

    async def unexpected(self, request: Request, exc: Exception) -> Response:
        return ApiError.of(exc).response()

    def authorize(self, request: Request) -> None:
        if not self._token:
            self.check_browser(request)
            return
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(401, "missing 'Authorization: Bearer <token>' header", "authentication_error")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "the Authorization header must be 'Bearer <token>'", "authentication_error")
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(401, "the bearer token is not valid", "authentication_error")

    def check_browser(self, request: Request) -> None:
        """With no token, what keeps a web page the user visits from using the door: the Host must
        name an allowed host (a DNS-rebinding page reaches us under its own name), an Origin (sent by
        browsers on cross-site calls) too, and a POST must say it is JSON (a cross-site form or a
        "simple" fetch cannot say so without a preflight, which this server does not answer)."""
        allowed = self.allowed_hosts
        host = _host_name(request.headers.get("host", ""))
        if host not in allowed:
            raise ApiError(403, f"Host {host or '(none)'} is not one this server answers without a token (--http-allowed-hosts)",
                           "permission_error")
        origin = request.headers.get("origin")
        if origin is not None and _host_name(origin.partition("://")[2]) not in allowed:
            raise ApiError(403, f"requests from the web origin {origin} are not accepted without a token", "permission_error")
        if request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "the body must be sent as Content-Type: application/json", code="unsupported_media_type")

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refused with 413 past the gRPC API's message limit before it is parsed
        (at once when Content-Length says so)."""
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "Content-Length is not a number")
            if int(length) > limit:
                raise ApiError(413, f"the body has {length} bytes; at most {limit} are accepted (--max-message-mb)")
        chunks, size, timeout_s = [], 0, self.generations.settings.http_read_timeout_s
        try:
            with anyio.fail_after(timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"the body has more than {limit} bytes; at most {limit} are accepted (--max-message-mb)")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {timeout_s:g} s (--http-read-timeout-s)", code="request_timeout") from None
        # Parsed in a worker thread, a few at a time: a body of many megabytes takes seconds to parse,
        # and on the event loop every other request (/health too) would wait for it.
        return await anyio.to_thread.run_sync(_parse_json, b"".join(chunks), limiter=self.parsers)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.aliases:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model}'", param="model",
                           code="model_not_found")

    async def in_thread(self, request: Request, cancel: threading.Event, fn: Callable[[], Any]) -> Any:
        """``fn()`` in a worker thread; the client going away meanwhile sets ``cancel``."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_watch_disconnect, request.receive, cancel)
            try:
                outcome = await anyio.to_thread.run_sync(_capture(fn), limiter=self.limiter)
            finally:
                tasks.cancel_scope.cancel()
        if outcome.error is not None:
            raise outcome.error
        return outcome.value

    # ---- routes

    async def health(self, request: Request) -> Response:
        if self.serving():
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        from prometheus_client.exposition import choose_encoder

        if self.registry is None:
            return ApiError(404, "metrics are off", code="not_found").response()
        # OpenMetrics when the scraper asks for it (Prometheus does): the exemplars' trace ids come with it.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(self.registry), headers={"Content-Type": content_type})

    def model_card(self) -> dict:
        info = self.generations.target_info
        # Beyond OpenAI's fields, as vLLM adds max_model_len: the dtype the verify service runs in,
        # and with --dtype auto why (every exact path it measured at start-up).
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "specdec",
                "root": self.model, "parent": None, "max_model_len": info.max_context or None,
                "dtype": info.dtype or None, "precision": info.precision or None}

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except ApiError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, request: Request) -> Response:
        try:
            self.authorize(request)
            self.check_model(request.path_params["model"])
        except ApiError as exc:
            return exc.response()
        return JSONResponse(self.model_card())

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, chat=True)

    async def generate(self, request: Request, chat: bool) -> Response:
        headers: dict[str, str] = {}
        entered = streaming = False
        call: Call | None = None
        try:
            self.authorize(request)
            # Checked as a gRPC request_id is (a 400 when unfit).
            rid = request.headers.get("x-request-id") or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            headers["X-Request-Id"] = rid
            deadline = self.deadline(request)
            asked = await self.read_request(request, chat)
            body = asked.body
            if not self.serving():
                raise ApiError(503, "the server is not serving (starting or shutting down); retry later", "service_unavailable")
            if not self.admission.enter():
                raise ApiError(503, "the server is shutting down; retry on another replica", "service_unavailable")
            entered = True
            cancel = threading.Event()
            # A plain function, as gRPC's is: the run log copies the request (dataclasses.asdict), and a
            # bound method of the Event would take its lock along.
            call = Call(request.url.path, deadline, lambda: cancel.is_set(), http_headers=trace_headers(request),
                        operation="chat" if chat else "text_completion", request_id=rid,
                        messages=[(m.role, message_text(m, i)) for i, m in enumerate(body.messages)]
                        if chat and self.generations.settings.trace_text else None)
            formatter = self.formatter(asked, chat, rid)
            calls = [call] + [dataclasses.replace(call) for _ in range(1, asked.best_of)]
            if body.stream:
                started = await self.in_thread(request, cancel,
                                               lambda: start_streams(self.generations, self.params(asked, chat), calls))
                if call.trace_id:
                    headers["X-Trace-Id"] = call.trace_id
                streaming = True
                events = (self.events(started[0][0], started[0][1].prompt_ids, formatter) if asked.n == 1
                          else self.merged_events(started, formatter))
                return EventStream(events, headers, cancel, self.admission.leave, self.generations.settings.stall_timeout_s)
            outcomes = await self.in_thread(request, cancel, lambda: run_all(self.generations, self.params(asked, chat), calls))
            if call.trace_id:
                headers["X-Trace-Id"] = call.trace_id
            results = [result for _, result, _ in outcomes]
            chosen = best(results, asked.n, asked.logprobs)
            return JSONResponse(formatter.whole(outcomes[0][0].prompt_ids, *chosen, usage_of=tuple(results)), headers=headers)
        except Exception as exc:  # noqa: BLE001 - every failure is answered in OpenAI's shape
            error = ApiError.of(exc).in_openai_terms(chat)
            trace_id = call.trace_id if call is not None else self.generations.instrumentation.refused(
                request.url.path, trace_headers(request), error.status, error.code or error.type)
            if trace_id:
                headers["X-Trace-Id"] = trace_id
            return error.response(headers)
        finally:
            if entered and not streaming:
                self.admission.leave()

    def params(self, asked: Asked, chat: bool) -> list[GenerationParams]:
        """One per generation (a worker thread's work: a chat's template and tokenizing); best_of
        ranks by log-probability, so it asks for them."""
        body, tools = asked.body, asked.tools
        given = {"prompt_ids": self.template.prompt_ids(body.messages, tools.offered)} if chat else asked.prompt
        one = generation_params(body, given, asked.logprobs or asked.best_of > asked.n, asked.top, asked.max_tokens,
                                tools.grammar)
        return [one] + [one.with_seed_offset(i) for i in range(1, asked.best_of)]

    def formatter(self, asked: Asked, chat: bool, rid: str) -> Formatter:
        body = asked.body
        return Formatter(chat, rid, self.model, self.generations.tokenizer, asked.logprobs, bool(body.return_token_ids),
                         include_usage=bool(body.stream_options and body.stream_options.include_usage),
                         echo=echo_text(asked, self.generations.tokenizer) if not chat else "", tools=asked.tools.parse)

    async def read_request(self, request: Request, chat: bool) -> Asked:
        """The body, checked and read into what the generation needs (400s name the field)."""
        data = await self.read_json(request)
        if chat:
            self.check_message_count(data)
        else:
            self.check_prompt_size(data)
        body = parse_body(ChatBody if chat else CompletionBody, data)
        self.check_model(body.model)
        refuse_unsupported(body, self.generations.settings.http_ignore_unknown_fields)
        n, best_of = choice_counts(body, self.generations.settings.max_choices)
        if not chat:
            return Asked(body, n, best_of, body.logprobs is not None, body.logprobs or 0, body.max_tokens,
                         completion_prompt(body), Tools([], None, False))
        tools = tools_of(body.tools, body.tool_choice, body.parallel_tool_calls, self.tool_tags)
        if tools.grammar is not None and grammar_of(body) is not None:
            raise ApiError(400, "a required or named tool_choice constrains the output already: no response_format "
                                "or guided_* beside it", param="tool_choice")
        return Asked(body, n, best_of, bool(body.logprobs), body.top_logprobs or 0,
                     body.max_completion_tokens or body.max_tokens, None, tools)

    def check_message_count(self, data: Any) -> None:
        """A chat request's messages counted before each is validated."""
        messages, limit = data.get("messages") if isinstance(data, dict) else None, self.generations.settings.max_chat_messages
        if isinstance(messages, list) and len(messages) > limit:
            raise ApiError(400, f"messages has {len(messages)} entries; at most {limit} are accepted (--max-chat-messages)",
                           param="messages")

    def check_prompt_size(self, data: Any) -> None:
        """A prompt of token ids sized against the context before anything copies or checks its
        ids, as the gRPC API sizes its ``prompt_token_ids``."""
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        context = self.generations.target_info.max_context
        if isinstance(prompt, list) and context and len(prompt) >= context and not isinstance(prompt[0], (str, list)):
            raise InvalidRequest(f"prompt has {len(prompt)} tokens; the model's context is {context}")

    @staticmethod
    def deadline(request: Request) -> float | None:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            seconds = float("nan")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ApiError(400, f"X-Request-Timeout = {raw!r}: seconds, a number > 0", param="X-Request-Timeout")
        return time.monotonic() + seconds

    async def merged_events(self, started: list, formatter: Formatter) -> AsyncIterator[bytes]:
        """Several choices' streams as one: each choice's chunks in its own order, the choices'
        interleaved as their rounds complete; one usage chunk for all at the end, when asked for."""
        send, receive = anyio.create_memory_object_stream(max_buffer_size=len(started) * 4)
        results: list = [None] * len(started)

        async def pump(out, index: int, pieces, prompt_ids: list[int]) -> None:
            own = dataclasses.replace(formatter.for_choice(index), include_usage=False)
            async with out:
                async for event in self.events(pieces, prompt_ids, own, done=False,
                                               on_result=lambda r: results.__setitem__(index, r)):
                    await out.send(event)

        async with anyio.create_task_group() as tasks:
            async with send:
                for index, (pieces, req) in enumerate(started):
                    tasks.start_soon(pump, send.clone(), index, pieces, req.prompt_ids)
            async with receive:
                async for event in receive:
                    yield event
        if formatter.include_usage and all(results):
            yield sse(formatter.head() | {"object": "chat.completion.chunk" if formatter.chat else "text_completion",
                                          "choices": [], "usage": formatter.usage(*results)})
        yield sse("[DONE]")

    async def events(self, pieces, prompt_ids: list[int], formatter: Formatter, done: bool = True,
                     on_result: Callable | None = None) -> AsyncIterator[bytes]:
        """The stream's events: each piece's chunks, an error event if the generation fails, [DONE]
        (unless ``done`` is false: one choice of several); ``on_result`` is handed the result."""
        try:
            for chunk in formatter.chunks(prompt_ids, None):
                yield sse(chunk)
            while True:
                outcome = await anyio.to_thread.run_sync(_capture(lambda: next(pieces, None)), limiter=self.limiter)
                if outcome.error is not None:
                    yield sse(ApiError.of(outcome.error).body())
                    break
                if outcome.value is None:
                    break
                if outcome.value.result is not None and on_result is not None:
                    on_result(outcome.value.result)
                for chunk in formatter.chunks(prompt_ids, outcome.value):
                    yield sse(chunk)
            if done:
                yield sse("[DONE]")
        finally:
            with anyio.CancelScope(shield=True):
                # Stops the generation if it is still going (the client left): its sessions are released.
                await anyio.to_thread.run_sync(pieces.close, limiter=self.limiter)


@dataclasses.dataclass
class Asked:
    """A generation request as the HTTP door read it."""

    body: Any  # ChatBody or CompletionBody
    n: int  # choices returned
    best_of: int  # generations run to pick them from
    logprobs: bool
    top: int  # alternatives per token
    max_tokens: int | None
    prompt: dict | None  # completions' prompt= or prompt_ids=; chat: from the messages, later
    tools: Tools


def start_streams(generations, params: list[GenerationParams], calls: list[Call]) -> list:
    """Each choice's stream, once admitted (a refusal is still an HTTP status), as (pieces, resolved
    parameters); all closed again if one is refused."""
    started = []
    try:
        for p, c in zip(params, calls):
            pieces = generations.stream(p, c)
            started.append((pieces, next(pieces)[0]))
    except BaseException:
        for pieces, _ in started:
            pieces.close()
        raise
    return started


def best(results: list, n: int, logprobs: bool) -> list:
    """The n to return: all of them, or best_of's n most likely (log-probabilities kept only where
    asked for: the ranking needed them)."""
    if len(results) == n:
        return results
    chosen = sorted(results, key=cumulative_logprob, reverse=True)[:n]
    return chosen if logprobs else [dataclasses.replace(r, logprobs=[]) for r in chosen]


def run_all(generations, params: list[GenerationParams], calls: list[Call]) -> list:
    """Every choice's generation at once (each its own session: the services share the prompt's
    cache between them and batch their passes); their outcomes in order, or the first failure."""
    if len(params) == 1:
        return [generations.run(params[0], calls[0])]
    with ThreadPoolExecutor(len(params), thread_name_prefix="choice") as pool:
        futures = [pool.submit(generations.run, p, c) for p, c in zip(params, calls)]
        return [f.result() for f in futures]


def cumulative_logprob(result) -> float:
    """best_of's ranking: the sum of the chosen tokens' log-probabilities."""
    return sum(entry.logprob for entry in result.logprobs or ())


def echo_text(asked: Asked, tokenizer) -> str:
    """Completions' ``echo``: the prompt's text (decoded where it came as token ids)."""
    if not getattr(asked.body, "echo", None):
        return ""
    prompt = asked.prompt  # completion_prompt's reading: prompt= or prompt_ids=
    return prompt["prompt"] if "prompt" in prompt else tokenizer.decode(prompt["prompt_ids"])
