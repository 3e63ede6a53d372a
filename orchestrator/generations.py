"""The orchestrator's generations, for every front door and free of any protocol.

A door (the gRPC servicer in ``specdec.orchestrator.server``, the OpenAI-compatible HTTP API in
``specdec.orchestrator.http_api``) converts its wire format into a
:class:`~specdec.generation.GenerationParams` and a :class:`~specdec.orchestrator.calls.Call`, runs
it through :meth:`Generations.run` or :meth:`Generations.stream` and converts the result back;
neither door calls the other. Here, once for both: the prompt tokenised (bounded), the server's
defaults filled in, the checks against the model, a generation slot (the queue), the trace and
metrics, the controller's loop, and the run log.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from specdec import config
from specdec.cost import RoundCosts
from specdec.detokenize import TextStream, token_texts
from specdec.errors import InvalidRequest
from specdec.grammar import Grammars
from specdec.generation import CallContext, GenerationParams, request_id
from specdec.lookup import PromptLookup
from specdec.orchestrator.calls import Call, StreamPiece
from specdec.orchestrator.controller import Limits, SpeculativeController
from specdec.orchestrator.instrumentation import GenerationInstrumentation
from specdec.orchestrator.resilience import GenerationQueue
from specdec.records import GenerationLog, GenerationResult

log = logging.getLogger("specdec.orchestrator")
TOKENIZERS_AT_ONCE = 4  # texts tokenized at once, over both doors
PIECE_CHARS_PER_TOKEN = 4  # past this many characters a context token, a text is counted in pieces first
PIECE_CHARS = 1 << 16
# Fill-in-the-middle tokens (prefix, suffix, middle) of the model families that have them.
FIM_TOKENS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))


class Generations:
    """``target_info``: the verify service's ``ModelInfo`` (vocabulary, context, end-of-sequence
    tokens, model name)."""

    def __init__(self, settings: config.OrchestratorSettings, tokenizer, verify_client, draft_clients, target_info,
                 metrics=None, costs: RoundCosts | None = None) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.target_info = target_info
        self.log_dir = Path(settings.log_dir) if settings.log_dir else None
        limits = Limits(
            vocab_size=target_info.vocab_size,
            max_context=target_info.max_context,
            max_new_tokens_limit=settings.max_new_tokens_limit,
            eos_token_ids=frozenset(target_info.eos_token_ids),
            speculation=settings,
        )
        # The generation's trace and the metrics (specdec.rpc.metrics.OrchestratorMetrics, or None when off).
        self.instrumentation = GenerationInstrumentation(target_info.model, metrics, settings.trace_text)
        self._tokenizing = threading.BoundedSemaphore(TOKENIZERS_AT_ONCE)
        self.queue = GenerationQueue(settings.max_active_generations, settings.max_queued_generations,
                                     max_wait_s=settings.max_queue_wait_s)
        self.controller = SpeculativeController(
            verify_client,
            draft_clients,
            limits,
            detokenizer=functools.partial(TextStream, tokenizer),
            draft_timeout_s=settings.draft_timeout_ms / 1e3,
            verify_timeout_s=settings.verify_timeout_ms / 1e3,
            instrumentation=self.instrumentation,
            costs=costs,
            lookup=PromptLookup(settings.lookup_max_ngram, settings.lookup_min_ngram) if settings.prompt_lookup else None,
            lookup_depth=settings.lookup_depth,
            send_ahead=settings.send_ahead,
            grammars=Grammars(tokenizer, target_info.vocab_size, target_info.eos_token_ids),
        )

    # ------------------------------------------------------------------ what the doors call

    def resolve(self, params: GenerationParams) -> GenerationParams:
        """``params`` as the server runs them (the prompt tokenised, its defaults filled in),
        checked against the model and the operator's limits."""
        max_context = self.target_info.max_context
        if params.suffix:
            params = dataclasses.replace(params, prompt=self.fill_in_the_middle(params.prompt, params.suffix), suffix="")
        if params.prompt:
            # Refused before tokenising: a text far past the context takes long to tokenise.
            if max_context and len(params.prompt) > max_context * self.longest_token_chars:
                raise InvalidRequest(
                    f"prompt has {len(params.prompt)} characters; the model's context of {max_context} tokens holds at most "
                    f"{max_context * self.longest_token_chars}"
                )
            prompt_ids = self.tokenize(params.prompt, "prompt")
        else:
            prompt_ids = params.prompt_ids
            if max_context and len(prompt_ids) >= max_context:
                raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; the model's context is {max_context}")
        # The prediction is tokenised as a continuation (no special tokens), bounded as a prompt is.
        prediction_ids = self.tokenize(params.prediction, "prediction", add_special_tokens=False) if params.prediction else None
        # Each bad word as given and after a space, as vLLM tokenises them (a word mid-sentence
        # usually carries its space).
        bad_words_ids = [ids for word in params.bad_words for text in dict.fromkeys((word, " " + word.lstrip()))
                         if (ids := self.tokenize(text, "bad_words", add_special_tokens=False))]
        if params.processing.grammar is not None:
            params.processing.grammar.llguidance()  # a grammar that does not compile: refused here, in one line
        resolved = params.resolved(prompt_ids, self.settings, params.max_new_tokens or self.default_max_new_tokens(len(prompt_ids)),
                                   prediction_ids, bad_words_ids)
        self.controller.check(resolved)
        return resolved

    def run(self, params: GenerationParams, call: Call) -> tuple[GenerationParams, GenerationResult, list[str]]:
        """One whole generation: the resolved parameters, the result, and the text each token adds."""
        with self.instrumentation.generation(call.method, call.grpc_context, call.http_headers, call.operation) as observed:
            self._announce(call, observed)
            with self.admitted(params, observed, call) as (resolved, context):
                result = self.controller.generate(resolved, context)
            self.finish(observed, params, result, call)
        texts = token_texts(self.tokenizer, result.token_ids)
        self.write_log(resolved, result, texts, call.trace_id)
        return resolved, result, texts

    def stream(self, params: GenerationParams, call: Call) -> Iterator[tuple[GenerationParams, CallContext] | StreamPiece]:
        """A generation as it goes: first (the resolved parameters, the call) once it holds a
        generation slot (a refusal raises before it), then a :class:`StreamPiece` per round, then
        the last piece, with the text held back until the end and the result. Closing the iterator
        early (the client went away) stops the generation and releases its sessions everywhere."""
        # The generation span is not made current here: this generator yields inside it.
        with self.instrumentation.generation(call.method, call.grpc_context, call.http_headers, call.operation) as observed:
            self._announce(call, observed)
            with self.admitted(params, observed, call) as (resolved, context):
                yield resolved, context
                rounds = self.controller.stream(resolved, context)
                sent = 0  # characters of text handed out so far
                try:
                    while True:
                        record = next(rounds)
                        sent += len(record.text)
                        handed = time.perf_counter()
                        yield StreamPiece(record.new_tokens, record.text, record.logprobs, record=record)
                        # How long the door took to pass it on: a slow reader shows here, not as compute.
                        observed.streamed(record, time.perf_counter() - handed)
                except StopIteration as done:
                    result = done.value
                finally:
                    # Also when the client goes away (GeneratorExit here): the controller's own
                    # clean-up releases the sessions in every service.
                    rounds.close()
            self.finish(observed, params, result, call)
        self.write_log(resolved, result, trace_id=call.trace_id)
        # Any text held back (it might have begun a stop string), and the totals.
        yield StreamPiece([], result.text[sent:], [], result=result)

    # ------------------------------------------------------------------ the steps

    @contextlib.contextmanager
    def admitted(self, params: GenerationParams, observed, call: Call) -> Iterator[tuple[GenerationParams, CallContext]]:
        """The resolved parameters and the call's context (its deadline: the client's, within the
        server's own; its liveness: the controller stops between rounds when either ends), holding
        a generation slot while the block runs."""
        rid = request_id(call.request_id)
        resolved = self.resolve(params)
        deadline = call.deadline
        # The server's own deadline bounds every generation; a client's may only shorten it.
        if self.settings.generation_timeout_s:
            own = time.monotonic() + self.settings.generation_timeout_s
            deadline = own if deadline is None else min(deadline, own)
        context = CallContext(rid, deadline, call.cancelled, observed.trace_parent)
        self.queue.acquire(deadline, call.cancelled)
        try:
            observed.set_request(resolved, rid)
            yield resolved, context
        finally:
            self.queue.release()

    def fill_in_the_middle(self, prefix: str, suffix: str) -> str:
        """The prompt that asks the model for the text between ``prefix`` and ``suffix``, framed by
        its own fill-in-the-middle tokens (Qwen2.5-Coder's, StarCoder's, ...); InvalidRequest when
        it has none. Prompt lookup then searches the suffix too: infilling often repeats it."""
        vocab = self.tokenizer.get_vocab()
        for names in FIM_TOKENS:
            if all(name in vocab for name in names):
                before, after, middle = names
                return f"{before}{prefix}{after}{suffix}{middle}"
        raise InvalidRequest(f"suffix: the model {self.target_info.model} has no fill-in-the-middle tokens")

    def tokenize(self, text: str, what: str, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids, tokenized a few texts at a time (``TOKENIZERS_AT_ONCE``: a long
        text takes a worker thread for a while, and the doors' threads must not all wait on it).
        A text longer than ``PIECE_CHARS_PER_TOKEN`` characters a token of the context is counted
        in pieces first, and refused as soon as they hold more tokens than the context (less one a
        piece, for the tokens a cut can split): a many-megabyte prompt costs a context's worth of
        tokenizing, not its whole length."""
        context = self.target_info.max_context
        with self._tokenizing:
            if context and len(text) > context * PIECE_CHARS_PER_TOKEN:
                counted, pieces = 0, 0
                for start in range(0, len(text), PIECE_CHARS):
                    counted += len(self.tokenizer(text[start:start + PIECE_CHARS], add_special_tokens=False).input_ids)
                    pieces += 1
                    if counted - pieces >= context:
                        raise InvalidRequest(f"{what} has more than {context} tokens (counted in its first {start + PIECE_CHARS} "
                                             f"characters); the model's context is {context}")
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Characters in the tokenizer's longest token: a prompt has at least len(text) / this many tokens."""
        return max(map(len, self.tokenizer.get_vocab()), default=1)

    def default_max_new_tokens(self, prompt_len: int) -> int:
        """The server default, shortened to fit the model's context (an explicit value is never cut)."""
        room = self.target_info.max_context - prompt_len if self.target_info.max_context else self.settings.max_new_tokens
        return max(1, min(self.settings.max_new_tokens, room))

    def finish(self, observed, params: GenerationParams, result: GenerationResult, call: Call) -> None:
        """The generation's totals on its span, and its text where the operator asked for it (the
        prompt as the caller sent it: ``params`` before they were resolved)."""
        observed.finish(result)
        if observed.with_text:
            prompt = params.prompt or self.tokenizer.decode(params.prompt_ids, skip_special_tokens=True)
            observed.record_text(call.messages or [("user", prompt)], result.text, result.finish_reason)

    @staticmethod
    def _announce(call: Call, observed) -> None:
        """The generation's trace id, for the caller to find its trace by (each door returns it its way)."""
        call.trace_id = observed.trace_id
        if call.trace_id and call.on_trace_id is not None:
            call.on_trace_id(call.trace_id)

    def write_log(self, params: GenerationParams, result: GenerationResult, texts: list[str] | None = None,
                  trace_id: str = "") -> None:
        if self.log_dir is None:
            return
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
            with_text = self.settings.log_text
            entry = GenerationLog(
                result=result,
                target_model=self.target_info.model,
                request=copy.deepcopy(params.summary()) | {"request_id": result.request_id}
                | ({"trace_id": trace_id} if trace_id else {}),
                # Only with --log-text (GenerationLog.counts_json leaves every text and token id out
                # otherwise): the prompt and each token's text, so that the log alone can be shown.
                prompt=self.tokenizer.decode(params.prompt_ids, skip_special_tokens=True) if with_text else "",
                prompt_token_ids=list(params.prompt_ids) if with_text else [],
                token_texts=(texts if texts is not None else token_texts(self.tokenizer, result.token_ids)) if with_text else [],
                with_text=with_text,
            )
            path.write_text(json.dumps(entry.to_json(), indent=1))
            prune(self.log_dir, self.settings.log_max_mb << 20)
        except OSError as exc:
            log.warning("could not write the run log: %s", exc)


def prune(directory: Path, max_bytes: int) -> int:
    """Delete the oldest ``*.json`` files of ``directory`` until the rest take at most ``max_bytes``;
    how many went. (Every write checks: a listing of a few thousand files costs about a millisecond.)"""
    files = sorted(directory.glob("*.json"), key=lambda p: p.name)  # names begin with the time written
    sizes = [p.stat().st_size for p in files]
    total, gone = sum(sizes), 0
    for path, size in zip(files, sizes):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total, gone = total - size, gone + 1
    return gone
