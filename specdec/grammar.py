"""Structured output: a grammar the output must follow (JSON, a JSON schema, a regular expression or
a Lark grammar), applied as a token mask at every place the target decides, through llguidance.

Why llguidance: measured on the embedded target's tokenizer (151,936 tokens, 2-core AMD EPYC), a
JSON schema compiles in about 2 ms and a mask takes about 0.03 ms a token (xgrammar: 28 ms and
0.02 ms), it rolls a matcher back in microseconds (each tree branch forks the state), it names the
tokens a grammar forces (free drafts), and it installs with no dependencies (xgrammar pulls in
triton and a compiler runtime).

Exactness: a place's mask depends only on the output up to it (the prompt is not part of the
grammar), so the verify service masks each tree node with its own path, and the target's token there
is what one-token decoding under the same grammar gives after the same tokens.

The tokenizer's view llguidance needs is built once per process (about 1.5 s for 150k tokens), in
the background from start-up on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from specdec.errors import InvalidRequest

log = logging.getLogger("specdec")

KINDS = ("json_object", "json_schema", "regex", "lark")
MAX_GRAMMAR_CHARS = 64 * 1024
# JSON without free whitespace: the separators are fixed (", " and ": "), so the grammar forces
# the keys and punctuation a schema fixes (taken as free drafts) rather than letting each be
# spelled several ways.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_COMPILED = 256  # grammars kept compiled per process


@dataclass(frozen=True)
class Grammar:
    """What the output must match: ``kind`` (:data:`KINDS`) and its text (the schema as JSON, the
    regular expression or the Lark grammar; empty for ``json_object``)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"grammar kind {self.kind!r} must be one of {', '.join(KINDS)}")
        if len(self.spec) > MAX_GRAMMAR_CHARS:
            raise InvalidRequest(f"the {self.kind} has {len(self.spec)} characters; at most {MAX_GRAMMAR_CHARS}")
        if self.kind != "json_object" and not self.spec:
            raise InvalidRequest(f"the {self.kind} is empty")

    def llguidance(self) -> str:
        """The grammar as llguidance takes it; InvalidRequest when it cannot be compiled."""
        return _compiled(self)


def _compile(grammar: Grammar) -> str:
    from llguidance import LLMatcher

    try:
        if grammar.kind in ("json_object", "json_schema"):
            schema = '{"type": "object"}' if grammar.kind == "json_object" else grammar.spec
            json.loads(schema)  # a clear message for text that is not JSON at all
            text = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        elif grammar.kind == "regex":
            text = LLMatcher.grammar_from_regex(grammar.spec)
        else:
            text = LLMatcher.grammar_from_lark(grammar.spec)
    except ValueError as exc:  # json.JSONDecodeError too
        raise InvalidRequest(f"the {grammar.kind} cannot be compiled: {exc}") from None
    error = LLMatcher.validate_grammar(text)
    if error:
        raise InvalidRequest(f"the {grammar.kind} cannot be compiled: {error}")
    return text


_cache: OrderedDict[Grammar, str] = OrderedDict()
_cache_lock = threading.Lock()


def _compiled(grammar: Grammar) -> str:
    with _cache_lock:
        if grammar in _cache:
            _cache.move_to_end(grammar)
            return _cache[grammar]
    text = _compile(grammar)
    with _cache_lock:
        _cache[grammar] = text
        while len(_cache) > _COMPILED:
            _cache.popitem(last=False)
    return text


class Grammars:
    """One process's grammar engine over one tokenizer (a ``transformers`` tokenizer)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)  # what a complete output may end with (else the tokenizer's own)
        self._view = None
        self._lock = threading.Lock()
        # Built now, beside the start-up, not on the first request that asks for a grammar: 1.5 s
        # there would be charged to that round (and the cost model would learn from it).
        threading.Thread(target=self._warm, name="grammar-tokenizer", daemon=True).start()

    def _warm(self) -> None:
        try:
            self._tokenizer_view()
        except Exception as exc:  # noqa: BLE001 - said here; a request asking for a grammar meets it again
            log.warning("grammars: the tokenizer cannot be read for them: %s", exc)

    def _tokenizer_view(self):
        with self._lock:
            if self._view is None:
                self._view = self._build_view()
            return self._view

    def _build_view(self):
        import llguidance
        import llguidance.hf

        eos = self.eos_token_ids or None
        try:
            # The tokenizer's own description (byte-level and byte-fallback tokenizers: every real model's).
            return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        except ValueError:
            # Any other kind (a word-level one, say): each token's bytes as it decodes alone.
            return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Tokens(self.tokenizer, self.vocab_size)),
                                          n_vocab=self.vocab_size, eos_token=eos)

    def state(self, grammar: Grammar) -> GrammarState:
        from llguidance import LLMatcher

        return GrammarState(LLMatcher(self._tokenizer_view(), grammar.llguidance()), self.vocab_size)


class _Tokens:
    """A tokenizer as llguidance's ``TokenizerWrapper`` reads one: each token's bytes, the special
    tokens, and text to token ids."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        # The unknown token stands for text it could not read: a token like any other here.
        self.special_token_ids = [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id]
        self.tokens = [tokenizer.decode([i]).encode() if i < len(tokenizer) else b"" for i in range(vocab_size)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False).input_ids


class GrammarState:
    """One generation's place in its grammar, moved to any output by rolling back to the common
    prefix and consuming the rest (a tree's branches share most of theirs)."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.consumed: list[int] = []  # the output the matcher stands after

    def _move_to(self, output: Sequence[int]) -> bool:
        """Stand after ``output``; False when the grammar refuses one of its tokens (then the state
        stands after the longest prefix it takes)."""
        common = 0
        for a, b in zip(self.consumed, output):
            if a != b:
                break
            common += 1
        if common < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - common)
            del self.consumed[common:]
        rest = list(output[common:])
        if rest:
            # try_consume_tokens takes the longest acceptable prefix and leaves the matcher usable.
            taken = self.matcher.try_consume_tokens(rest)
            self.consumed.extend(rest[:taken])
            return taken == len(rest)
        return True

    def allowed(self, output: Sequence[int]) -> torch.Tensor | None:
        """The tokens the grammar allows after ``output`` (bool, ``[vocab_size]``); None when the
        grammar refuses ``output`` itself (a draft's path the target cannot take: its answer is
        never used)."""
        if not self._move_to(output):
            return None
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].astype(bool))

    def forced(self, output: Sequence[int]) -> list[int]:
        """The tokens the grammar forces after ``output`` (free drafts: the target can take no
        other); [] when none is forced or the grammar refuses ``output``."""
        if not self._move_to(output):
            return []
        return list(self.matcher.compute_ff_tokens())


def mask_scores(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``scores`` (one row) with every token the grammar does not allow at -inf."""
    if allowed is None:
        return scores
    width = scores.shape[-1]
    keep = allowed[:width] if allowed.shape[0] >= width else torch.cat([allowed, allowed.new_zeros(width - allowed.shape[0])])
    return scores.masked_fill(~keep.to(scores.device), float("-inf"))


class GrammarStates:
    """The grammar state of each session a model service holds (at most ``capacity``, least
    recently used dropped first: a dropped one is rebuilt from the output on the next call)."""

    def __init__(self, grammars: Grammars, capacity: int = 256) -> None:
        self.grammars = grammars
        self.capacity = capacity
        self._states: OrderedDict[str, tuple[Grammar, GrammarState]] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, session_id: str, grammar: Grammar) -> GrammarState:
        with self._lock:
            held = self._states.get(session_id)
            if held is not None and held[0] == grammar:
                self._states.move_to_end(session_id)
                return held[1]
        state = self.grammars.state(grammar)
        with self._lock:
            self._states[session_id] = (grammar, state)
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)
        return state

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._states.pop(session_id, None)
