"""Logits processors: the OpenAI / vLLM parameters that change the distribution a user asks for
(penalties, ``logit_bias``, ``min_p``, ``min_tokens``), applied to one row of logits with that
row's own history.

Speculation stays exact against the processed distribution because the verify service applies
them at every tree node with the node's own history (the context and the path to the node): the
target's token there is what one-token decoding with the same processors gives after the same
tokens. Drafts apply them too, to propose what the target will take. Each row is processed from its
own logits and history alone, so the batch does not change its bits.

Order, as vLLM applies them: the repetition penalty (over the prompt and the output, as
``transformers``' ``RepetitionPenaltyLogitsProcessor``), the frequency and presence penalties (over
the output only, as OpenAI defines them), ``logit_bias``, ``min_tokens`` (end-of-sequence tokens
barred until that many tokens are generated), ``bad_words`` (a word's last token barred where the
history ends with the rest of it, as vLLM does); then the sampling warpers (temperature, top-k,
top-p: :func:`specdec.sampling.warp_logits`), then ``min_p`` (tokens below ``min_p`` times the most
likely one's probability dropped). A grammar (structured output, :mod:`specdec.grammar`) masks
what it does not allow after the processors, before the warpers; it needs the service's tokenizer,
so the services apply it (:class:`specdec.grammar.GrammarState`), not :meth:`Processing.apply`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from specdec.errors import InvalidRequest
from specdec.grammar import Grammar

MAX_LOGIT_BIAS = 300  # entries: OpenAI allows 300
MAX_BAD_WORDS = 64  # token sequences
MAX_BAD_WORD_TOKENS = 32


@dataclass(frozen=True)
class Processing:
    """What a request asks of the logits before sampling; the default changes nothing."""

    presence_penalty: float = 0.0  # -2..2: subtracted once from every token the output holds
    frequency_penalty: float = 0.0  # -2..2: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0: a token of the prompt or the output has its logit divided (> 0) or multiplied (< 0) by it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, -100..100) added to its logit
    min_p: float = 0.0  # 0..1: drop tokens less likely than this share of the most likely one
    min_tokens: int = 0  # end-of-sequence tokens barred until this many tokens are generated
    # vLLM's bad_words, tokenised: a sequence's last token is barred where the history ends with the rest of it
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    eos_token_ids: tuple[int, ...] = field(default=(), compare=False)  # the model's, for min_tokens (the server fills them in)
    grammar: Grammar | None = None  # structured output: the output must match it (specdec.grammar), masked last

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # NaN fails too
                raise InvalidRequest(f"{name} = {getattr(self, name)} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise InvalidRequest(f"repetition_penalty = {self.repetition_penalty} must be in (0, 100]")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p = {self.min_p} must be in [0, 1]")
        if not 0 <= self.min_tokens < 1 << 31:
            raise InvalidRequest(f"min_tokens = {self.min_tokens} must be >= 0")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        if len(self.bad_words_ids) > MAX_BAD_WORDS:
            raise InvalidRequest(f"bad_words has {len(self.bad_words_ids)} token sequences; at most {MAX_BAD_WORDS}")
        for i, words in enumerate(self.bad_words_ids):
            if not 1 <= len(words) <= MAX_BAD_WORD_TOKENS or min(words) < 0:
                raise InvalidRequest(f"bad_words[{i}] must be 1 to {MAX_BAD_WORD_TOKENS} token ids of the vocabulary")
        for token, bias in self.logit_bias:
            if token < 0:
                raise InvalidRequest(f"logit_bias names token {token}, outside the vocabulary")
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequest(f"logit_bias[{token}] = {bias} must be in [-100, 100]")

    @classmethod
    def of(cls, logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = (),
           bad_words_ids: Sequence[Sequence[int]] = (), **fields) -> Processing:
        pairs = logit_bias.items() if isinstance(logit_bias, Mapping) else logit_bias
        return cls(logit_bias=tuple(sorted((int(t), float(b)) for t, b in pairs)),
                   bad_words_ids=tuple(tuple(int(t) for t in words) for words in bad_words_ids), **fields)

    @property
    def active(self) -> bool:
        """Whether anything changes the logits (else every row is left as it is)."""
        return self.transforms or bool(self.min_p or self.grammar)

    @property
    def transforms(self) -> bool:
        """Whether :meth:`apply` changes anything (``min_p`` and a grammar act elsewhere)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
                    or self.min_tokens or self.bad_words_ids)

    def check_vocabulary(self, vocab_size: int) -> None:
        for token, _ in self.logit_bias:
            if token >= vocab_size:
                raise InvalidRequest(f"logit_bias names token {token}, outside the vocabulary [0, {vocab_size})")
        for i, words in enumerate(self.bad_words_ids):
            if max(words) >= vocab_size:
                raise InvalidRequest(f"bad_words[{i}] names a token outside the vocabulary [0, {vocab_size})")

    def apply(self, logits: torch.Tensor, history: Sequence[int], prompt_len: int) -> torch.Tensor:
        """One row of logits (``[width]``, float32) processed for the token after ``history`` (the
        prompt's ``prompt_len`` tokens, then the output so far). Everything but ``min_p``, which
        acts on probabilities: :meth:`after_warping`."""
        if not self.transforms:  # a row copied only where a processor changes it
            return logits
        scores = logits.float().clone()
        width = scores.shape[-1]
        if self.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted({t for t in history if t < width}), dtype=torch.long, device=scores.device)
            if len(seen):
                values = scores[seen]
                scores[seen] = torch.where(values > 0, values / self.repetition_penalty, values * self.repetition_penalty)
        output = history[prompt_len:]
        if (self.frequency_penalty or self.presence_penalty) and output:
            counts = Counter(t for t in output if t < width)
            ids = torch.tensor(sorted(counts), dtype=torch.long, device=scores.device)
            n = torch.tensor([counts[t] for t in sorted(counts)], dtype=scores.dtype, device=scores.device)
            scores[ids] -= self.frequency_penalty * n + self.presence_penalty
        for token, bias in self.logit_bias:
            if token < width:
                scores[token] += bias
        if self.min_tokens and len(output) < self.min_tokens:
            for token in self.eos_token_ids:
                if token < width:
                    scores[token] = float("-inf")
        for words in self.bad_words_ids:
            *before, last = words
            if last < width and (not before or list(history[len(history) - len(before):]) == before):
                scores[last] = float("-inf")
        return scores

    def after_warping(self, scores: torch.Tensor) -> torch.Tensor:
        """``min_p`` on warped scores (one row): tokens whose probability is below ``min_p`` times
        the most likely one's are dropped (-inf); the most likely token always stays."""
        if not self.min_p:
            return scores
        logprobs = torch.log_softmax(scores, -1)
        return scores.masked_fill(logprobs < logprobs.max() + torch.log(torch.tensor(self.min_p)), float("-inf"))
