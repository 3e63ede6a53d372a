"""The HTTP door's answers: errors in OpenAI's shape (:class:`ApiError`, its status from the gRPC
status the same failure gets), and a generation's result as OpenAI's JSON, whole or as stream
chunks (:class:`Formatter`), with the speculation statistics (:func:`spec_decode_stats`)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from starlette.responses import JSONResponse

from specdec.orchestrator.calls import StreamPiece
from specdec.orchestrator.http_tools import held_back, parse_calls
from specdec.lookup import PREDICTION
from specdec.records import GenerationResult, TokenLogprob
from specdec.rpc.status import HTTP_STATUS_OF_CODE, status_of

LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the sampling settings exclude gets this, as vLLM does

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
    ("prompt", "prompt"), ("stop", "stop"), ("mode", "mode"), ("prediction", "prediction"), ("logit_bias", "logit_bias"),
    ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
    ("repetition_penalty", "repetition_penalty"), ("min_p", "min_p"), ("min_tokens", "min_tokens"),
    ("bad_words", "bad_words"), ("suffix", "suffix"),
]
# OpenAI's finish reasons: every stop (end-of-sequence, a stop string, a stop token) is "stop".
FINISH_REASON = {"length": "length", "eos": "stop", "stop_string": "stop", "stop_token": "stop", "stop": "stop"}


# --------------------------------------------------------------------------- errors


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
        error = cls(status, message, kind, code=code.name.lower() if status != 500 else "internal_error",
                    param=getattr(exc, "param", None))
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
    index: int = 0  # the choice's
    echo: str = ""  # completions' echo: the prompt's text, before each choice's text
    tools: bool = False  # chat: tool calls are parsed out of the output (specdec.orchestrator.http_tools)
    streamed: str = ""  # with tools: the text streamed so far, and how much of it went out as content
    sent: int = 0

    def for_choice(self, index: int) -> Formatter:
        """The formatter of choice ``index`` of the same response (its own text offsets)."""
        return dataclasses.replace(self, index=index, offset=0, streamed="", sent=0)

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

    @staticmethod
    def usage(*results: GenerationResult) -> dict:
        """The usage of one or several choices of one prompt (counted once, as OpenAI counts it)."""
        prompt, completion = results[0].stats.prompt_tokens, sum(len(r.token_ids) for r in results)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        predicted = [d for r in results for d in r.stats.drafts if d.draft == PREDICTION]
        if predicted:
            # Predicted Outputs: the prediction's tokens the target accepted, and those it proposed
            # that were not accepted (OpenAI counts the prediction's tokens absent from the answer).
            accepted = sum(d.accepted_tokens for d in predicted)
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": sum(d.proposed_tokens for d in predicted) - accepted,
            }
        return usage

    def whole(self, prompt_ids: list[int], *results: GenerationResult, usage_of: tuple = ()) -> dict:
        """The response with a choice per result (``usage_of``: the results the usage counts, when
        more were generated than are returned: best_of)."""
        choices = [self.for_choice(i).choice(prompt_ids, result) for i, result in enumerate(results)]
        body = self.head() | {"choices": choices, "usage": self.usage(*(usage_of or results)),
                              "spec_decode": spec_decode_stats(results[0]) if len(results) == 1
                              else [spec_decode_stats(r) for r in results]}
        if self.return_token_ids and self.chat:
            body["prompt_token_ids"] = list(prompt_ids)
        return body

    def choice(self, prompt_ids: list[int], result: GenerationResult) -> dict:
        choice: dict[str, Any] = {"index": self.index}
        calls = []
        if self.chat:
            content, calls = parse_calls(result.text) if self.tools else (result.text, [])
            choice["message"] = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})
        else:
            choice["text"] = self.echo + result.text
        choice["logprobs"] = self.logprobs_json(result.logprobs or [])
        choice |= self.finish(result, bool(calls))
        if self.return_token_ids:
            choice["token_ids"] = list(result.token_ids)
            if not self.chat:
                choice["prompt_token_ids"] = list(prompt_ids)
        return choice

    @staticmethod
    def finish(result: GenerationResult, called: bool = False) -> dict:
        """finish_reason (``tool_calls`` when the output called tools) and vLLM's stop_reason."""
        return {"finish_reason": "tool_calls" if called else FINISH_REASON.get(result.finish_reason, result.finish_reason),
                "stop_reason": result.stop_reason}

    def chunk(self, text: str | None, token_ids: list[int], entries: list[TokenLogprob], finish: dict | None = None,
              role: bool = False) -> dict:
        choice: dict[str, Any] = {"index": self.index}
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
                return [self.chunk(self.echo, [], [])] if self.echo else []
            first = self.chunk("", [], [], role=True)
            if self.return_token_ids:
                first["prompt_token_ids"] = list(prompt_ids)
            return [first]
        if self.tools:
            return self._tool_chunks(piece)
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

    def _tool_chunks(self, piece: StreamPiece) -> list[dict]:
        """A chat stream that may call tools: text goes out as content until a tool call may be
        beginning; the calls, parsed from the whole output, in one delta at the end."""
        self.streamed += piece.text
        if piece.result is None:
            upto = held_back(self.streamed)
            text, self.sent = self.streamed[self.sent:upto], max(self.sent, upto)
            return [self.chunk(text, piece.token_ids, piece.logprobs if self.logprobs else [])] if text or piece.token_ids else []
        result = piece.result
        content, calls = parse_calls(result.text)
        out = []
        if calls:
            rest = self.streamed[self.sent:held_back(self.streamed)]
            last = self.chunk(rest or None, [], [], finish=self.finish(result, True))
            last["choices"][0]["delta"]["tool_calls"] = [call | {"index": i} for i, call in enumerate(calls)]
        else:
            last = self.chunk(self.streamed[self.sent:] or None, [], [], finish=self.finish(result))
        last["spec_decode"] = spec_decode_stats(result)
        out.append(last)
        if self.include_usage:
            out.append(self.head() | {"object": last["object"], "choices": [], "usage": self.usage(result)})
        return out
