"""The orchestrator's OpenAI-compatible HTTP API, on its own port (``--http-port``; 0 = off).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both also as server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``. Built on Starlette and
served by uvicorn from a thread of the orchestrator process, beside the gRPC server (``http_server``).

Every generation goes through the gRPC API's own code: the JSON body becomes a
``specdec.v1.GenerateRequest``, which :class:`~specdec.orchestrator.server.GenerationServicer` runs
exactly as it runs a gRPC call (``run_generation`` / ``stream_generation``: the same checks, modes
and settings, the same generation queue, traces, metrics and run log), so the output is the same
token for token. The servicer's calls block; they run in worker threads, one per generation in
flight, and a client that disconnects is seen as a cancelled call (the controller stops between
rounds).

What is OpenAI's and what is this server's:

- Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; the HTTP status
  comes from the one table :data:`HTTP_STATUS_OF_CODE`, keyed by the gRPC status the same failure
  gets on the gRPC API (``specdec.rpc.status``).
- ``n`` must be 1; penalties, ``logit_bias``, ``best_of``, ``echo``, ``suffix`` and tools are refused
  with a 400 that says so (each would change what the target's distribution gives).
- ``temperature`` defaults to 1 as in OpenAI's API; 0 is greedy, the target's own greedy output.
- Each response carries the speculation statistics in an extra top-level ``spec_decode`` object,
  named as vLLM names its spec-decode metrics; vLLM's extra request fields ``top_k``,
  ``stop_token_ids``, ``ignore_eos`` and ``return_token_ids`` work too, as do this server's
  ``mode`` and ``speculation`` (``SpeculationParams``' fields).
- The bearer token and TLS are the gRPC port's (``--auth-token`` / ``--auth-token-file``,
  ``--tls-cert`` / ``--tls-key`` / ``--tls-client-ca``); ``/health`` and ``/metrics`` stay open, as
  gRPC health checks do.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Optional, Union

import anyio
import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from specdec.errors import InvalidRequest, NotReady
from specdec.orchestrator.calls import Call, StreamPiece
from specdec.records import DecodingMode, GenerationResult, TokenLogprob
from specdec.rpc.status import HTTP_STATUS_OF_CODE, status_of
from specdec.sampling import MAX_TOP_LOGPROBS
from specdec.v1 import generation_pb2

log = logging.getLogger("specdec.orchestrator.http")

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
INT32_MAX, UINT64_MAX = 2**31 - 1, 2**64 - 1
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the sampling settings exclude gets this, as vLLM does
TIMEOUT_HEADER = "x-request-timeout"  # seconds: the generation's deadline, as a gRPC call's deadline
PARSER_THREADS = 2  # bodies parsed at once, off the event loop

# A failure's HTTP status and OpenAI error type come from the gRPC status it gets on the gRPC API
# (specdec.rpc.status.HTTP_STATUS_OF_CODE). Anything not there is a 500.
CODE_OF_STATUS = {  # OpenAI's machine-readable codes, where it has one
    401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 429: "rate_limit_exceeded",
}
# GenerateRequest's names in the servicer's messages, and the request fields they come from (longest first).
GRPC_FIELD_NAMES = [
    ("max_new_tokens", "max_tokens"), ("prompt_token_ids", "prompt"), ("sampling.temperature", "temperature"),
    ("sampling.top_p", "top_p"), ("sampling.top_k", "top_k"), ("stop_token_ids", "stop_token_ids"),
    ("top_logprobs", "top_logprobs"), ("speculation.", "speculation."), ("request_id", "X-Request-Id"),
    ("prompt", "prompt"), ("stop", "stop"), ("mode", "mode"),
]
# OpenAI's finish reasons: every stop (end-of-sequence, a stop string, a stop token) is "stop".
FINISH_REASON = {"length": "length", "eos": "stop", "stop_string": "stop", "stop_token": "stop", "stop": "stop"}


LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # where to look before walking the parsed body


def _is_text(value: Any) -> bool:
    """Whether every string in a parsed JSON value (keys too) is valid Unicode text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class ApiError(Exception):
    """An error answered as it is: HTTP status, message, OpenAI type, the parameter at fault."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else CODE_OF_STATUS.get(status)
        self.headers: dict[str, str] = {}

    @classmethod
    def of(cls, exc: BaseException) -> ApiError:
        """The answer to a failure of the servicer, through :data:`HTTP_STATUS_OF_CODE`."""
        if isinstance(exc, ApiError):
            return exc
        code, message = status_of(exc)  # logs an unexpected failure with its traceback
        status, kind = HTTP_STATUS_OF_CODE.get(code, (500, "server_error"))
        error = cls(status, message, kind, code=code.name.lower() if status != 500 else "internal_error")
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s:
            error.headers["Retry-After"] = str(math.ceil(retry_after_s))
        return error

    def in_openai_terms(self, chat: bool) -> ApiError:
        """A refusal of the servicer's names the GenerateRequest field at fault first: name the
        request's own field instead, in the message and as ``param``."""
        if self.status != 400 or self.param is not None:
            return self
        for grpc_name, name in GRPC_FIELD_NAMES:
            if self.message.startswith(grpc_name):
                name = "messages" if chat and name == "prompt" else name
                self.message, self.param = name + self.message[len(grpc_name):], name.partition(".")[0]
                break
        return self

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**self.headers, **(headers or {})}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# --------------------------------------------------------------------------- request bodies
# Strict: a string where a number belongs, or a float where an integer does, is a 400 naming the
# field, never a coercion. Fields this server does not know are ignored, as vLLM ignores them.

Int32 = Annotated[int, Field(ge=-(2**31), le=INT32_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Number = Annotated[float, Field(allow_inf_nan=False)]
STRICT = ConfigDict(strict=True, extra="ignore")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: Optional[bool] = None


class Speculation(BaseModel):
    """``SpeculationParams``: 0 (or absent) = the server's default."""

    model_config = STRICT
    draft_length: Count = 0
    beam_width: Count = 0
    beam_depth: Count = 0
    max_tree_nodes: Count = 0
    adaptive: Optional[bool] = None


class ContentPart(BaseModel):
    model_config = STRICT
    type: str
    text: Optional[str] = None


class Prediction(BaseModel):
    """OpenAI's Predicted Outputs: text the answer is expected to repeat."""
    model_config = STRICT
    type: Literal["content"]
    content: Union[str, list[ContentPart]]


class _Body(BaseModel):
    model_config = STRICT
    model: Optional[str] = None
    max_tokens: Optional[TokenCount] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]] = None
    top_p: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None
    top_k: Optional[Annotated[int, Field(ge=-1, le=INT32_MAX)]] = None  # vLLM's: -1 or 0 = off
    seed: Optional[Annotated[int, Field(ge=0, le=UINT64_MAX)]] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    user: Optional[str] = None
    # Refused unless neutral: each would change the distribution the target's tokens are drawn from.
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Number]] = None
    min_p: Optional[Number] = None
    min_tokens: Optional[Count] = None
    # vLLM's extra fields, and this server's speculation settings (GenerateRequest's).
    stop_token_ids: Optional[list[Int32]] = None
    ignore_eos: Optional[bool] = None
    return_token_ids: Optional[bool] = None
    mode: Optional[str] = None
    speculation: Optional[Speculation] = None
    # Checked (a malformed one is a 400), then left aside: the prompt lookup already proposes what
    # the context repeats; the prediction itself is not yet a source of proposals.
    prediction: Optional[Prediction] = None


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[Int32], list[list[Int32]]]
    logprobs: Optional[TopLogprobs] = None  # this many alternatives per token, with each token's own
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls and the like reach the template
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Optional[TokenCount] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[TopLogprobs] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    tool_choice: Any = None
    function_call: Any = None


def parse_body(kind: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = [str(part) for part in first["loc"]]
        # A union's failed branches name themselves in the location (str, list[int], ...): drop them.
        path = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool"))
        raise ApiError(400, f"{path or 'body'}: {first['msg']}", param=loc[0] if loc else None) from None


def refuse_unsupported(body: _Body) -> None:
    """A 400 for every setting this server cannot honour, rather than silently ignoring it."""
    if body.n not in (None, 1):
        raise ApiError(400, f"n = {body.n} is not supported: one choice per request (n = 1); send the request n times "
                            "(with different seeds when sampling)", param="n")
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0}
    for name, value in neutral.items():
        given = getattr(body, name)
        if given is not None and given != value:
            raise ApiError(400, f"{name} = {given} is not supported (it would change the target's distribution); "
                                f"leave it unset or {value}", param=name)
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported (it would change the target's distribution)", param="logit_bias")
    if isinstance(body, CompletionBody):
        if body.best_of not in (None, 1):
            raise ApiError(400, f"best_of = {body.best_of} is not supported: one sequence per request", param="best_of")
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
    if isinstance(body, ChatBody):
        if body.tools or body.functions:
            raise ApiError(400, "tools and functions are not supported", param="tools" if body.tools else "functions")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format")


# --------------------------------------------------------------------------- JSON -> GenerateRequest

def generate_request(body: _Body, prompt: dict[str, Any], rid: str, logprobs: bool, top_logprobs: int,
                     max_tokens: int | None) -> generation_pb2.GenerateRequest:
    """The ``GenerateRequest`` a gRPC client would send for the same thing (``prompt``: ``prompt=``
    or ``prompt_token_ids=``)."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    spec = body.speculation or Speculation()
    return generation_pb2.GenerateRequest(
        **prompt,
        max_new_tokens=max_tokens or 0,  # 0: the server's default, shortened to fit the context
        mode=DecodingMode.parse(body.mode).to_pb() if body.mode else generation_pb2.DECODING_MODE_UNSPECIFIED,
        speculation=generation_pb2.SpeculationParams(
            draft_length=spec.draft_length, beam_width=spec.beam_width, beam_depth=spec.beam_depth,
            max_tree_nodes=spec.max_tree_nodes, **({"adaptive": spec.adaptive} if spec.adaptive is not None else {}),
        ),
        sampling=generation_pb2.SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            seed=body.seed or 0,
        ),
        stop=stops,
        request_id=rid,
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def completion_prompt(body: CompletionBody) -> dict[str, Any]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > 1:
            raise ApiError(400, f"prompt holds {len(prompt)} prompts; this server takes one per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"prompt_token_ids": prompt}


class ChatTemplate:
    """Messages to prompt tokens: the target tokenizer's chat template, or ``--chat-template``'s."""

    def __init__(self, servicer, path: str = "") -> None:
        self.servicer = servicer
        self.template: str | None = None
        if path:
            try:
                self.template = Path(path).expanduser().read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise NotReady(f"--chat-template {path}: cannot read it ({exc})") from None
        elif not getattr(servicer.tokenizer, "chat_template", None):
            log.info("the target's tokenizer has no chat template: /v1/chat/completions answers 400 until --chat-template is set")

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        tokenizer = self.servicer.tokenizer
        if self.template is None and not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "the target model's tokenizer has no chat template; start the orchestrator with "
                                "--chat-template FILE (SPECDEC_CHAT_TEMPLATE)", param="messages")
        limit = self.servicer.settings.max_chat_messages
        if len(messages) > limit:
            raise ApiError(400, f"messages has {len(messages)} entries; at most {limit} are accepted (--max-chat-messages)",
                           param="messages")
        conversation = []
        for i, m in enumerate(messages):
            if isinstance(m.content, list):
                if any(part.type != "text" or part.text is None for part in m.content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(part.text for part in m.content)
            else:
                content = m.content or ""
            conversation.append({**(m.model_extra or {}), "role": m.role, "content": content}
                                | ({"name": m.name} if m.name is not None else {}))
        # Sized before the template renders them (it only adds), and again after.
        context, longest = self.servicer.target_info.max_context, self.servicer.longest_token_chars
        chars = sum(len(c["content"]) for c in conversation)
        if context and chars > context * longest:
            raise InvalidRequest(f"the messages hold {chars} characters; the model's context of {context} tokens "
                                 f"holds at most {context * longest}")
        try:
            text = tokenizer.apply_chat_template(conversation, chat_template=self.template, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception: TemplateError)
            raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from None
        # Sized before tokenised, as the gRPC API's text prompts are: a text far past the context takes long.
        if context and len(text) > context * longest:
            raise InvalidRequest(f"the messages make a prompt of {len(text)} characters; the model's context of "
                                 f"{context} tokens holds at most {context * longest}")
        # The template writes any special tokens it wants (a BOS, the role markers): none added here.
        return self.servicer.tokenize(text, "messages", add_special_tokens=False)


# --------------------------------------------------------------------------- results -> JSON


def spec_decode_stats(result: GenerationResult) -> dict[str, Any]:
    """The speculation of one generation, named as vLLM names its spec-decode metrics.

    A *draft* is a round that drafted anything; its *draft tokens* are the positions it could have
    had accepted (the longest path of the round's tree or chains: every beam's tokens are
    ``num_proposed_tokens``), so ``draft_acceptance_rate`` = accepted / draft tokens, and
    ``mean_acceptance_length`` = 1 + accepted per draft (the bonus token counted), as vLLM has them.
    """
    rounds, stats = result.rounds, result.stats
    depths = [r.drafted_depth for r in rounds]
    drafts = sum(1 for d in depths if d)
    draft_tokens = sum(depths)
    accepted = sum(len(r.accepted) for r in rounds)
    per_position = [0] * max(depths, default=0)
    for r in rounds:
        for i in range(min(len(r.accepted), len(per_position))):
            per_position[i] += 1
    return {
        "mode": stats.mode,
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "num_accepted_tokens_per_pos": per_position,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "draft_acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "num_proposed_tokens": stats.draft_tokens_proposed,
        "rounds": stats.rounds,
        "tokens_per_round": stats.mean_accepted_per_round,
        "fallback_rounds": sum(1 for r in rounds if r.fallback),
        "drafts": [
            {"draft": d.draft, "model": d.model, "num_draft_tokens": d.proposed_positions,
             "num_proposed_tokens": d.proposed_tokens, "num_accepted_tokens": d.accepted_tokens,
             "draft_acceptance_rate": d.acceptance_rate if d.proposed_positions else None}
            for d in stats.drafts
        ],
        "time_to_first_token_ms": stats.time_to_first_token_ms,
        "tokens_per_second": stats.tokens_per_second,
    }


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


@dataclasses.dataclass
class Formatter:
    """One response's JSON, for either API, whole or as stream chunks."""

    chat: bool
    rid: str
    model: str
    tokenizer: Any
    logprobs: bool
    return_token_ids: bool
    include_usage: bool = False
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    offset: int = 0  # completions' text_offset: characters of completion text before the next token

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def logprobs_json(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            def one(token_id: int, logprob: float) -> dict:
                text = self.token_text(token_id)
                return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

            return {"content": [one(t.token_id, t.logprob) | {"top_logprobs": [one(i, v) for i, v in t.top]} for t in entries],
                    "refusal": None}
        tokens = [self.token_text(t.token_id) for t in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(t.logprob) for t in entries],
            # The alternatives and, as OpenAI's has it, the chosen token itself.
            "top_logprobs": [{self.token_text(i): _finite(v) for i, v in [*t.top, (t.token_id, t.logprob)]} for t in entries],
            "text_offset": offsets,
        }

    def head(self) -> dict:
        return {"id": self.rid, "object": ("chat.completion" if self.chat else "text_completion"), "created": self.created,
                "model": self.model}

    def usage(self, result: GenerationResult) -> dict:
        prompt, completion = result.stats.prompt_tokens, len(result.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, prompt_ids: list[int], result: GenerationResult) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choice["logprobs"] = self.logprobs_json(result.logprobs or [])
        choice |= self.finish(result)
        body = self.head() | {"choices": [choice], "usage": self.usage(result), "spec_decode": spec_decode_stats(result)}
        if self.return_token_ids:
            choice["token_ids"] = list(result.token_ids)
            (body if self.chat else choice)["prompt_token_ids"] = list(prompt_ids)
        return body

    @staticmethod
    def finish(result: GenerationResult) -> dict:
        return {"finish_reason": FINISH_REASON.get(result.finish_reason, result.finish_reason),
                "stop_reason": result.stop_reason}

    def chunk(self, text: str | None, token_ids: list[int], entries: list[TokenLogprob], finish: dict | None = None,
              role: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self.logprobs_json(entries) if entries else None
        choice |= finish or {"finish_reason": None}
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
        body = self.head() | {"object": "chat.completion.chunk" if self.chat else "text_completion", "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return body

    def chunks(self, prompt_ids: list[int], piece: StreamPiece | None) -> list[dict]:
        """The chunks of one streamed piece (``None``: the stream's opening, the chat's role)."""
        if piece is None:
            if not self.chat:
                return []
            first = self.chunk("", [], [], role=True)
            if self.return_token_ids:
                first["prompt_token_ids"] = list(prompt_ids)
            return [first]
        if piece.result is None:
            if not piece.text and not piece.token_ids:
                return []
            return [self.chunk(piece.text, piece.token_ids, piece.logprobs if self.logprobs else [])]
        result = piece.result
        last = self.chunk(piece.text if piece.text or not self.chat else None, [], [], finish=self.finish(result))
        last["spec_decode"] = spec_decode_stats(result)
        out = [last]
        if self.include_usage:
            out.append(self.head() | {"object": last["object"], "choices": [], "usage": self.usage(result)})
        return out


def trace_headers(request: Request) -> dict[str, str]:
    """The headers a caller's trace context may be in; never the token."""
    return {k: v for k, v in request.headers.items() if k not in ("authorization", "cookie")}


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {text}\n\n".encode()


# --------------------------------------------------------------------------- the app


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


def _host_name(value: str) -> str:
    """The host of a Host header's value (or an address, or an origin without its scheme): no port, no brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _parse_json(body: bytes) -> Any:
    """The body as JSON; no NaN or Infinity, and no lone surrogate escape."""
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        data = json.loads(body, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if LONE_SURROGATE.search(body) and not _is_text(data):
        # JSON may escape half a UTF-16 pair (\ud800): no string of the API can hold it.
        raise ApiError(400, "the body holds a lone surrogate escape (\\ud800 to \\udfff): not text")
    return data


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


class HttpApi:
    """The Starlette app over one :class:`~specdec.orchestrator.server.GenerationServicer`."""

    def __init__(self, servicer, token: str = "", registry=None, chat_template: str = "",
                 max_body_bytes: int = 64 << 20, threads: int = 48) -> None:
        self.servicer = servicer
        self._token = token.encode()
        self.registry = registry
        self.template = ChatTemplate(servicer, chat_template)
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = {_host_name(h) for h in servicer.settings.http_allowed_hosts} | {_host_name(servicer.settings.host)}
        self.threads = threads
        self._limiter: anyio.CapacityLimiter | None = None
        self._parsers: anyio.CapacityLimiter | None = None
        self.admission = None  # the gRPC server's (specdec.rpc.interceptors.Admission), once it serves
        model = servicer.target_info.model or servicer.settings.target_model
        self.model = model
        self.aliases = {name for m in (model, servicer.settings.target_model) for name in (m, Path(m).name) if name}
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
        # Worker threads for the servicer's blocking calls: one per generation running or waiting
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
        chunks, size, timeout_s = [], 0, self.servicer.settings.http_read_timeout_s
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
        info = self.servicer.target_info
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
            # The servicer checks a given one as it checks a gRPC request_id (a 400 when unfit).
            rid = request.headers.get("x-request-id") or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            headers["X-Request-Id"] = rid
            deadline = self.deadline(request)
            data = await self.read_json(request)
            if chat:
                self.check_message_count(data)
            else:
                self.check_prompt_size(data)
            body = parse_body(ChatBody if chat else CompletionBody, data)
            self.check_model(body.model)
            refuse_unsupported(body)
            if chat:
                logprobs, top, max_tokens = bool(body.logprobs), body.top_logprobs or 0, body.max_completion_tokens or body.max_tokens
            else:
                logprobs, top, max_tokens = body.logprobs is not None, body.logprobs or 0, body.max_tokens
            prompt = None if chat else completion_prompt(body)
            if not self.serving():
                raise ApiError(503, "the server is not serving (starting or shutting down); retry later", "service_unavailable")
            if not self.admission.enter():
                raise ApiError(503, "the server is shutting down; retry on another replica", "service_unavailable")
            entered = True
            cancel = threading.Event()
            # A plain function, as gRPC's is: the run log copies the request (dataclasses.asdict), and a
            # bound method of the Event would take its lock along.
            call = Call(request.url.path, deadline, lambda: cancel.is_set(), http_headers=trace_headers(request),
                        operation="chat" if chat else "text_completion")

            def message() -> generation_pb2.GenerateRequest:
                given = {"prompt_token_ids": self.template.prompt_ids(body.messages)} if chat else prompt
                return generate_request(body, given, rid, logprobs, top, max_tokens)

            formatter = Formatter(chat, rid, self.model, self.servicer.tokenizer, logprobs, bool(body.return_token_ids),
                                  include_usage=bool(body.stream_options and body.stream_options.include_usage))
            if body.stream:
                def start():
                    pieces = self.servicer.stream_generation(message(), call)
                    return pieces, next(pieces)  # once admitted: a refusal is still an HTTP status

                pieces, req = await self.in_thread(request, cancel, start)
                if call.trace_id:
                    headers["X-Trace-Id"] = call.trace_id
                streaming = True
                return EventStream(self.events(pieces, req.prompt_ids, formatter), headers, cancel, self.admission.leave,
                                   self.servicer.settings.stall_timeout_s)
            req, result, _ = await self.in_thread(request, cancel, lambda: self.servicer.run_generation(message(), call))
            if call.trace_id:
                headers["X-Trace-Id"] = call.trace_id
            return JSONResponse(formatter.whole(req.prompt_ids, result), headers=headers)
        except Exception as exc:  # noqa: BLE001 - every failure is answered in OpenAI's shape
            error = ApiError.of(exc).in_openai_terms(chat)
            trace_id = call.trace_id if call is not None else self.servicer.instrumentation.refused(
                request.url.path, trace_headers(request), error.status, error.code or error.type)
            if trace_id:
                headers["X-Trace-Id"] = trace_id
            return error.response(headers)
        finally:
            if entered and not streaming:
                self.admission.leave()

    def check_message_count(self, data: Any) -> None:
        """A chat request's messages counted before each is validated."""
        messages, limit = data.get("messages") if isinstance(data, dict) else None, self.servicer.settings.max_chat_messages
        if isinstance(messages, list) and len(messages) > limit:
            raise ApiError(400, f"messages has {len(messages)} entries; at most {limit} are accepted (--max-chat-messages)",
                           param="messages")

    def check_prompt_size(self, data: Any) -> None:
        """A prompt of token ids sized against the context before anything copies or checks its
        ids, as the gRPC API sizes its ``prompt_token_ids``."""
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        context = self.servicer.target_info.max_context
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

    async def events(self, pieces, prompt_ids: list[int], formatter: Formatter) -> AsyncIterator[bytes]:
        """The stream's events: each piece's chunks, an error event if the generation fails, [DONE]."""
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
                for chunk in formatter.chunks(prompt_ids, outcome.value):
                    yield sse(chunk)
            yield sse("[DONE]")
        finally:
            with anyio.CancelScope(shield=True):
                # Stops the generation if it is still going (the client left): its sessions are released.
                await anyio.to_thread.run_sync(pieces.close, limiter=self.limiter)
