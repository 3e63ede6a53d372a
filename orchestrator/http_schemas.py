"""The HTTP door's requests: the JSON body parsed (no NaN, no lone surrogate), validated into
OpenAI's request bodies (:class:`CompletionBody`, :class:`ChatBody`), the settings this server
cannot honour refused, and the body turned into the gRPC API's ``GenerateRequest``."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specdec.errors import InvalidRequest
from specdec.grammar import Grammar
from specdec.orchestrator.http_responses import ApiError
from specdec.sampling import MAX_TOP_LOGPROBS
from specdec.generation import GenerationParams

INT32_MAX, UINT64_MAX = 2**31 - 1, 2**64 - 1


# --------------------------------------------------------------------------- the body as JSON

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


# --------------------------------------------------------------------------- request bodies
# Strict: a string where a number belongs, or a float where an integer does, is a 400 naming the
# field, never a coercion. Fields this server does not know are ignored, as vLLM ignores them.

Int32 = Annotated[int, Field(ge=-(2**31), le=INT32_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Number = Annotated[float, Field(allow_inf_nan=False)]
# Unknown fields are kept (``model_extra``) so that :func:`unknown_fields` can name them: a 400 unless
# the operator lets them through (--http-ignore-unknown-fields), as OpenAI's API answers.
STRICT = ConfigDict(strict=True, extra="allow")


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
    # Ranges are the generation parameters' to check (specdec.generation): the same words as over gRPC.
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[Annotated[int, Field(ge=-1, le=INT32_MAX)]] = None  # vLLM's: -1 or 0 = off
    seed: Optional[Annotated[int, Field(ge=0, le=UINT64_MAX)]] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    user: Optional[str] = None
    # Logits processors (specdec.processors), applied at every tree node with the node's own history.
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Number]] = None
    min_p: Optional[Number] = None
    min_tokens: Optional[Count] = None
    bad_words: Optional[list[str]] = None  # vLLM's
    # vLLM's extra fields, and this server's speculation settings (GenerateRequest's).
    stop_token_ids: Optional[list[Int32]] = None
    ignore_eos: Optional[bool] = None
    return_token_ids: Optional[bool] = None
    mode: Optional[str] = None
    speculation: Optional[Speculation] = None
    # OpenAI's Predicted Outputs: text the answer is expected to repeat, a source of draft tokens
    # (specdec.lookup); the usage then counts its accepted and rejected tokens.
    prediction: Optional[Prediction] = None
    # Structured output (specdec.grammar): OpenAI's response_format, or one of vLLM's guided_* fields.
    response_format: Optional[dict[str, Any]] = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_grammar: Optional[str] = None  # a Lark grammar (llguidance's dialect)
    guided_choice: Optional[list[str]] = None
    # OpenAI's bookkeeping fields: accepted, with nothing to do here (no stored completions, no tiers).
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    service_tier: Optional[str] = None


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
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    tool_choice: Any = None
    function_call: Any = None
    parallel_tool_calls: Optional[bool] = None


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


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Fields of a body (and of the objects in it) that no schema here names, dotted, in order.
    Messages are left out: their extra fields (tool calls and the like) reach the chat template."""
    names = [prefix + name for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel) and not isinstance(value, Message):
            names += unknown_fields(value, f"{prefix}{name}.")
    return names


def refuse_unsupported(body: _Body, ignore_unknown: bool = False) -> None:
    """A 400 for every setting this server cannot honour, rather than silently ignoring it; and for
    every field it does not know, unless ``ignore_unknown``."""
    unknown = [] if ignore_unknown else unknown_fields(body)
    if unknown:
        raise ApiError(400, f"unrecognized request argument{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
                            "(the server can be told to ignore unknown fields: --http-ignore-unknown-fields)",
                       param=unknown[0])
    if isinstance(body, CompletionBody) and body.echo and body.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported: the prompt's tokens get no log-probabilities here",
                       param="echo")
    if isinstance(body, ChatBody):
        if body.functions or body.function_call is not None:
            raise ApiError(400, "functions and function_call are OpenAI's deprecated form: send tools and tool_choice",
                           param="functions" if body.functions else "function_call")


# --------------------------------------------------------------------------- JSON -> GenerationParams

def choice_counts(body: _Body, limit: int) -> tuple[int, int]:
    """(n, best_of): the choices returned, and the generations run to pick them from (completions'
    ``best_of``: the n with the highest log-probability). Each is at most ``limit``."""
    n = 1 if body.n is None else body.n
    best_of = getattr(body, "best_of", None)
    best_of = n if best_of is None else best_of
    if not 1 <= n <= limit:
        raise ApiError(400, f"n = {n} must be in [1, {limit}] (--max-choices)", param="n")
    if not n <= best_of <= limit:
        raise ApiError(400, f"best_of = {best_of} must be in [n = {n}, {limit}] (--max-choices)", param="best_of")
    if best_of > n and body.stream:
        raise ApiError(400, "best_of > n cannot be streamed: the best are known only at the end", param="best_of")
    return n, best_of


def generation_params(body: _Body, prompt: dict[str, Any], logprobs: bool, top_logprobs: int,
                      max_tokens: int | None, grammar: Grammar | None = None) -> GenerationParams:
    """The generation's parameters (``prompt``: ``prompt=`` or ``prompt_ids=``), by the one
    constructor every door uses: a bad value gets the gRPC door's words. ``grammar``: the output's
    constraint when it is not the body's own (a required or named tool call)."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    spec = body.speculation or Speculation()
    return GenerationParams.of(
        **prompt,
        max_new_tokens=max_tokens or 0,  # 0: the server's default, shortened to fit the context
        mode=body.mode or None,
        speculation={"draft_length": spec.draft_length, "beam_width": spec.beam_width, "beam_depth": spec.beam_depth,
                     "max_tree_nodes": spec.max_tree_nodes, "adaptive": spec.adaptive},
        sampling={
            "temperature": 1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_k": max(0, body.top_k or 0),
            "seed": body.seed or 0,
        },
        stop=stops,
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        prediction=prediction_text(body.prediction),
        processing={
            "presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
            "logit_bias": logit_bias(body.logit_bias), "min_p": body.min_p or 0.0, "min_tokens": body.min_tokens or 0,
            "grammar": grammar or grammar_of(body),  # a tool choice's, or the request's own
        },
        bad_words=body.bad_words or (),
        suffix=(body.suffix or "") if isinstance(body, CompletionBody) else "",
    )


def grammar_of(body: _Body) -> Grammar | None:
    """The grammar the output must follow: ``response_format`` (``text``, ``json_object``,
    ``json_schema``) or one of vLLM's ``guided_json``, ``guided_regex``, ``guided_grammar``,
    ``guided_choice``; at most one of them."""
    given = [name for name in ("response_format", "guided_json", "guided_regex", "guided_grammar", "guided_choice")
             if getattr(body, name) is not None and not (name == "response_format" and body.response_format.get("type") == "text")]
    if len(given) > 1:
        raise ApiError(400, f"{' and '.join(given)}: at most one way to constrain the output", param=given[1])
    if not given:
        return None
    name = given[0]
    try:
        if name == "response_format":
            return _response_format(body.response_format)
        if name == "guided_json":
            return Grammar("json_schema", body.guided_json if isinstance(body.guided_json, str) else json.dumps(body.guided_json))
        if name == "guided_regex":
            return Grammar("regex", body.guided_regex)
        if name == "guided_grammar":
            return Grammar("lark", body.guided_grammar)
        if not body.guided_choice:
            raise InvalidRequest("guided_choice is empty")
        # One of the strings, as a Lark rule of string literals (JSON's escapes are Lark's).
        return Grammar("lark", "start: " + " | ".join(json.dumps(choice) for choice in body.guided_choice))
    except InvalidRequest as exc:
        raise ApiError(400, f"{name}: {exc}", param=name) from None


def _response_format(given: dict[str, Any]) -> Grammar:
    kind = given.get("type")
    if kind == "json_object":
        return Grammar("json_object")
    if kind == "json_schema":
        spec = given.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("type json_schema needs json_schema.schema, a JSON schema object")
        return Grammar("json_schema", json.dumps(schema))
    raise InvalidRequest(f"type {kind!r} is not one of text, json_object, json_schema")


def logit_bias(given: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's ``logit_bias``: token ids as JSON object keys (strings)."""
    bias = {}
    for key, value in (given or {}).items():
        if not key.isdigit():
            raise ApiError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias")
        bias[int(key)] = value
    return bias


def prediction_text(prediction: Prediction | None) -> str:
    """A prediction's text: its content, or its text parts joined (OpenAI allows only text parts)."""
    if prediction is None:
        return ""
    if isinstance(prediction.content, str):
        return prediction.content
    if any(part.type != "text" or part.text is None for part in prediction.content):
        raise ApiError(400, "prediction: every content part must be {\"type\": \"text\", \"text\": ...}", param="prediction")
    return "".join(part.text for part in prediction.content)


def completion_prompt(body: CompletionBody) -> dict[str, Any]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > 1:
            raise ApiError(400, f"prompt holds {len(prompt)} prompts; this server takes one per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    return {"prompt_ids": prompt}

