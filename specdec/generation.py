"""One generation, free of any protocol: what the user asked (:class:`GenerationParams`), the call
it came in (:class:`CallContext`: deadline, cancellation, request id, trace) and how it is going
(:class:`GenerationState`).

Every front door (the gRPC servicer, the OpenAI-compatible HTTP API, the command line) converts its
wire format into these types with :meth:`GenerationParams.of`, the one constructor: it checks every
field that needs no model and raises :class:`~specdec.errors.InvalidRequest` naming the field, so a
bad value gets the same words through every door. What depends on the model and the server (the
vocabulary, the context, the operator's limits and defaults) is checked where those are known
(``specdec.orchestrator.controller.SpeculativeController.check``). The parameters are immutable: the
server resolves them once (the prompt tokenised, its defaults filled in: :meth:`resolved`) and
nothing changes them afterwards; deadlines and cancellation travel apart, in the call.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from specdec.errors import Cancelled, DeadlineExceeded, InvalidRequest, check_range
from specdec.processors import MAX_BAD_WORDS, Processing
from specdec.records import DecodingMode, RoundRecord, TokenLogprob
from specdec.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP_STRINGS = 16  # every round searches the output for each stop string and its prefixes
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 128
INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class Speculation:
    """How a generation may speculate; 0 (None for ``adaptive``) = the server's default."""

    draft_length: int = 0  # sequential mode: tokens per draft chain
    beam_width: int = 0  # tree mode: beams per draft
    beam_depth: int = 0  # tree mode: tokens per beam
    max_tree_nodes: int = 0  # cap on the merged tree
    adaptive: bool | None = None  # each round's shape chosen by cost and acceptance, within the values above

    def __post_init__(self) -> None:
        for name in ("draft_length", "beam_width", "beam_depth", "max_tree_nodes"):
            check_range(f"speculation.{name}", getattr(self, name), 0, INT32_MAX)

    def over(self, defaults) -> Speculation:
        """These values, the unset ones taken from ``defaults`` (anything with the same fields)."""
        return Speculation(*(getattr(self, f.name) or getattr(defaults, f.name) for f in dataclasses.fields(self)[:4]),
                           self.adaptive if self.adaptive is not None else defaults.adaptive)


@dataclass(frozen=True)
class GenerationParams:
    """What one generation was asked for (every door, every field). Build it with :meth:`of`."""

    prompt: str = ""  # text, tokenised by the server; or
    prompt_ids: tuple[int, ...] = ()  # token ids (exactly one of the two)
    max_new_tokens: int = 0  # 0: the server's default, shortened to fit the context
    mode: DecodingMode | None = None  # None: the server's default
    speculation: Speculation = Speculation()
    sampling: SamplingParams = SamplingParams()  # temperature 0: greedy
    stop: tuple[str, ...] = ()  # strings that end the generation (the text up to them is kept)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end it as end-of-sequence does
    ignore_eos: bool = False  # generate past the model's end-of-sequence tokens
    logprobs: bool = False  # each token's log-probability under the target
    top_logprobs: int = 0  # with logprobs: this many most likely tokens at each place
    include_rounds: bool = False  # return every round's record
    # Text the answer is expected to repeat (OpenAI's Predicted Outputs: a file being edited), or its
    # token ids: a source of draft tokens beside the context, checked by the target as every draft's.
    prediction: str = ""
    prediction_ids: tuple[int, ...] = ()
    processing: Processing = Processing()  # penalties, logit_bias, min_p, min_tokens (specdec.processors)
    bad_words: tuple[str, ...] = ()  # text the output must not contain: tokenised by the server into processing.bad_words_ids
    suffix: str = ""  # fill-in-the-middle: the text after the gap (the prompt is the text before it)

    @classmethod
    def of(cls, *, speculation: Mapping[str, Any] | Speculation | None = None,
           sampling: Mapping[str, Any] | SamplingParams | None = None,
           processing: Mapping[str, Any] | Processing | None = None, **fields) -> GenerationParams:
        """The one constructor: plain values (``speculation``, ``sampling`` and ``processing`` as
        mappings of their fields, or built), checked; raises :class:`InvalidRequest` naming the first
        bad field (``speculation.*`` and ``sampling.*`` by their message's path; the processors by
        their own names, as OpenAI's parameters are)."""
        for key, given, kind, prefix in (("speculation", speculation, Speculation, True), ("sampling", sampling, SamplingParams, True),
                                         ("processing", processing, Processing.of, False)):
            if isinstance(given, Mapping):
                try:
                    fields[key] = kind(**given)
                except InvalidRequest as exc:
                    message = str(exc)
                    raise InvalidRequest(message if not prefix or message.startswith(key) else f"{key}.{message}") from None
            elif given is not None:
                fields[key] = given
        if isinstance(fields.get("mode"), str):
            fields["mode"] = DecodingMode.parse(fields["mode"]) if fields["mode"] else None
        for key in ("prompt_ids", "stop", "stop_token_ids", "prediction_ids", "bad_words"):
            if key in fields:
                fields[key] = tuple(fields[key])
        return cls(**fields)

    def __post_init__(self) -> None:
        if self.prompt and self.prompt_ids:
            raise InvalidRequest("set one of prompt and prompt_token_ids, not both")
        if not self.prompt and not self.prompt_ids:
            raise InvalidRequest("prompt is empty: set prompt or prompt_token_ids")
        check_range("max_new_tokens", self.max_new_tokens, 0, INT32_MAX)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for i, stop in enumerate(self.stop):
            if not stop:
                raise InvalidRequest(f"stop[{i}] is empty")
            if len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(f"stop[{i}] has {len(stop)} characters; at most {MAX_STOP_CHARS} are allowed")
        check_range("stop_token_ids count", len(self.stop_token_ids), 0, MAX_STOP_TOKEN_IDS)
        if self.prediction and self.prediction_ids:
            raise InvalidRequest("set one of prediction and prediction_token_ids, not both")
        check_range("bad_words count", len(self.bad_words), 0, MAX_BAD_WORDS)
        for i, word in enumerate(self.bad_words):
            if not 0 < len(word) <= MAX_STOP_CHARS:
                raise InvalidRequest(f"bad_words[{i}] must be 1 to {MAX_STOP_CHARS} characters")
        if self.suffix and not self.prompt:
            raise InvalidRequest("suffix needs the prompt as text (fill-in-the-middle frames both with the model's tokens)")
        check_range("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs = true")

    def resolved(self, prompt_ids: Sequence[int], defaults, max_new_tokens: int,
                 prediction_ids: Sequence[int] | None = None, bad_words_ids: Sequence[Sequence[int]] = ()) -> GenerationParams:
        """These parameters as the server runs them: the prompt's, the prediction's and the bad
        words' token ids, the mode and speculation with ``defaults`` (the server's settings) filled
        in, and ``max_new_tokens``."""
        processing = self.processing
        if bad_words_ids:
            processing = dataclasses.replace(processing, bad_words_ids=processing.bad_words_ids + tuple(map(tuple, bad_words_ids)))
        return dataclasses.replace(self, prompt="", prompt_ids=tuple(prompt_ids), max_new_tokens=max_new_tokens,
                                   mode=self.mode or DecodingMode.parse(defaults.mode), speculation=self.speculation.over(defaults),
                                   prediction="", prediction_ids=tuple(self.prediction_ids if prediction_ids is None else prediction_ids),
                                   processing=processing, bad_words=(), suffix="")

    @property
    def paths(self) -> int:
        """Paths each draft proposes at most: ``beam_width`` beams in tree mode, one chain otherwise."""
        return self.speculation.beam_width if self.mode == DecodingMode.TREE else 1

    @property
    def max_depth(self) -> int:
        """Tokens per path at most: ``draft_length`` in sequential mode, ``beam_depth`` otherwise. An
        adaptive tree may also choose any chain sequential mode could: up to ``draft_length`` deep."""
        spec = self.speculation
        if self.mode == DecodingMode.SEQUENTIAL:
            return spec.draft_length
        return max(spec.beam_depth, spec.draft_length) if spec.adaptive and self.mode == DecodingMode.TREE else spec.beam_depth

    def with_seed_offset(self, offset: int) -> GenerationParams:
        """The same request as another choice of it (``n``, ``best_of``): with a seed, ``seed +
        offset``, so every choice replays; without one each draws its own; greedy, the same."""
        if self.sampling.greedy or not self.sampling.seed:
            return self
        return dataclasses.replace(self, sampling=dataclasses.replace(self.sampling, seed=(self.sampling.seed + offset) % (1 << 64) or 1))

    def summary(self) -> dict[str, Any]:
        """Every field but the prompt, as plain JSON values (the run log's ``request``; the
        speculation's fields at the top, as the logs have always had them)."""
        skip = ("prompt", "prompt_ids", "speculation", "prediction", "prediction_ids", "processing", "bad_words", "suffix")
        entry = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        entry.update(dataclasses.asdict(self.speculation), prompt_tokens=len(self.prompt_ids),
                     mode=str(self.mode) if self.mode else None, sampling=dataclasses.asdict(self.sampling),
                     stop=list(self.stop), stop_token_ids=list(self.stop_token_ids), prediction_tokens=len(self.prediction_ids),
                     processing={**dataclasses.asdict(self.processing), "logit_bias": len(self.processing.logit_bias),
                                 "bad_words_ids": len(self.processing.bad_words_ids),
                                 # the kind and size only: a schema may carry the caller's text
                                 "grammar": (f"{self.processing.grammar.kind} ({len(self.processing.grammar.spec)} characters)"
                                             if self.processing.grammar else "")})
        return entry


def request_id(given: str = "") -> str:
    """The client's request id, checked (it goes into logs and traces), or a new one."""
    if not given:
        return f"req-{uuid.uuid4().hex}"
    if len(given) > MAX_REQUEST_ID_CHARS or not (given.isascii() and given.isprintable()):
        raise InvalidRequest(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters")
    return given


@dataclass(frozen=True)
class CallContext:
    """The call a generation runs in: its id, when it must end and whether its client has gone."""

    request_id: str = field(default_factory=request_id)
    deadline: float | None = None  # time.monotonic() by which the whole generation must end
    cancelled: Callable[[], bool] | None = None  # true once the client has gone away
    trace_parent: Any = None  # the OpenTelemetry context of the generation's span (parent of the round spans)

    def left(self, rounds: int) -> float | None:
        """Seconds left before the deadline (None: no deadline); raises once the client has gone
        or the deadline has passed (``rounds``: how many ran, for the message)."""
        if self.cancelled is not None and self.cancelled():
            raise Cancelled(f"the client cancelled the request after {rounds} rounds")
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"the request's deadline passed after {rounds} rounds")
        return left


@dataclass
class GenerationState:
    """How one generation is going: what it produced so far and what stopped it."""

    session_id: str = field(default_factory=lambda: f"gen-{uuid.uuid4()}")
    start: float = field(default_factory=time.perf_counter)
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    first_token_ms: float = 0.0
    stop: tuple[str, str | int | None] | None = None  # (finish reason, stop string or token) once stopped early

    def add(self, record: RoundRecord, tokens: list[int], logprobs: list[TokenLogprob]) -> None:
        self.output += tokens
        self.logprobs += logprobs
        self.rounds.append(record)
        self.first_token_ms = self.first_token_ms or (time.perf_counter() - self.start) * 1e3
