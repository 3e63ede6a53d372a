"""A model-free draft: prompt lookup (n-gram matching) over the context.

Where the output repeats its input (code edits, answers quoting a document, repeated structure),
the tokens that followed an earlier occurrence of the context's last few tokens are a good guess
for what comes next, and finding them costs microseconds instead of a forward pass (Saxena, "Prompt
Lookup Decoding", 2023; vLLM's ``ngram_proposer.py`` does the same). Every request carries the
whole context (prompt and every accepted token), so the session's earlier output is searched too,
with no per-session index: a scan of a 2,000-token context takes well under a millisecond (see
:func:`find_continuations`).

Words used here:
- the *suffix* is the context's last ``n`` tokens, ``min_ngram <= n <= max_ngram``;
- a *match* is an earlier place where the suffix occurs; its *length* is how far the agreement with
  the context's end reaches back (at least ``n``, counted up to :data:`MATCH_HORIZON` tokens);
- its *continuation* is what followed it, read on past the context's end through the tokens it
  proposes itself, so a repeating pattern continues for the whole depth asked.

Proposals are served through the same ``DraftBeams`` contract as a model's beams and join the same
token trie. Greedy: up to ``beam_width`` distinct continuations, longest match first, then most
recent. Sampling: the same continuations, each token with a one-hot distribution, which is what a
deterministic proposer draws from. Under the acceptance rule (:mod:`specdec.sampling`) a token
``x`` with ``q = one-hot(x)`` is accepted with probability ``min(1, p(x) / 1) = p(x)`` and, when
rejected, leaves the residual ``norm(max(p - q, 0))``, i.e. ``p`` with ``x`` removed: the output
is still distributed exactly as the target's own sampling.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import torch

from specdec import config
from specdec.draft_service.drafter import Beam, DraftOutcome
from specdec.kv_cache import SessionStore
from specdec.sampling import SamplingParams, normalise16
from specdec.service_info import ModelDescription, eos_token_ids

NAME = config.PROMPT_LOOKUP  # the --draft-model that selects it
MATCH_HORIZON = 64  # how far back a match's length is measured, to rank matches


def find_continuations(context, width: int, depth: int, max_ngram: int = 4, min_ngram: int = 2) -> list[list[int]]:
    """Up to ``width`` distinct continuations of ``depth`` tokens after ``context`` (token ids),
    best first: suffixes of ``max_ngram`` tokens down to ``min_ngram``, and for each, matches by
    length, then the most recent first. A continuation that is a prefix of one already chosen adds
    nothing to the trie and is skipped. Empty when the context's end occurs nowhere earlier."""
    tokens = np.asarray(context, dtype=np.int64)  # [L]
    size = len(tokens)
    chosen: list[list[int]] = []
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        # Matches start at i <= size - n - 1: each is followed by at least one token of the context.
        starts = size - n
        hit = np.ones(starts, dtype=bool)
        for j in range(n):
            hit &= tokens[j:j + starts] == tokens[size - n + j]
        ends = np.flatnonzero(hit) + n  # [matches] where each continuation starts
        if not len(ends):
            continue
        for end in ends[np.lexsort((-ends, -_match_lengths(tokens, ends, n)))]:
            continuation = _continue(tokens, int(end), depth)
            if not any(c[:len(continuation)] == continuation for c in chosen):
                chosen.append(continuation)
                if len(chosen) == width:
                    return chosen
    return chosen


def _match_lengths(tokens: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """For matches ending before ``ends``, how many tokens agree with the context's end, counting
    back from it (``n`` already do), up to MATCH_HORIZON."""
    size = len(tokens)
    lengths = np.full(len(ends), n)
    alive = np.ones(len(ends), dtype=bool)
    for k in range(n, min(MATCH_HORIZON, size)):
        at = ends - k - 1  # the token k back from the match's end
        alive &= at >= 0
        alive[alive] = tokens[at[alive]] == tokens[size - k - 1]
        if not alive.any():
            break
        lengths[alive] += 1
    return lengths


def _continue(tokens: np.ndarray, start: int, depth: int) -> list[int]:
    """``depth`` tokens read from ``start``; past the context's end, from the tokens proposed so far
    (a match that overlaps the end repeats its period)."""
    out = tokens[start:start + depth].tolist()
    for k in range(len(out), depth):
        out.append(out[start + k - len(tokens)])
    return out


class PromptLookup:
    """The draft service's engine when ``--draft-model prompt-lookup``: the same ``propose`` and
    ``sample_chains`` as :class:`~specdec.draft_service.drafter.BeamDrafter`, with no model and no
    cache (``store`` stays empty; it is there for GetInfo and ReleaseSession), and nothing to
    calibrate (the service reports a cost of zero). Pure and thread-safe."""

    def __init__(self, vocab_size: int, store: SessionStore | None = None, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.vocab_size = vocab_size  # of the one-hot distributions sent under sampling
        self.store = store if store is not None else SessionStore()
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, session_id: str, context: list[int], beam_width: int, depth: int, caller=None,
                stop=None) -> DraftOutcome:
        """``stop`` is a model draft's early stop: a lookup costs no forward, so it always proposes
        the whole continuation it found."""
        if not context:
            raise ValueError("context must hold at least one token")
        start = time.perf_counter()
        paths = find_continuations(context, beam_width, depth, self.max_ngram, self.min_ngram)
        # No probability to report: a lookup is a guess the target accepts or not.
        return DraftOutcome(beams=[Beam(tokens=p, logprob=0.0) for p in paths], reused_tokens=0, fed_tokens=0,
                            forward_s=time.perf_counter() - start)

    def release(self, session_id: str) -> bool:
        return self.store.release(session_id)

    def sample_chains(self, session_id: str, context: list[int], chains: int, depth: int, sampling: SamplingParams,
                      seed: int, caller=None) -> DraftOutcome:
        """The greedy continuations, each token with the one-hot distribution it is "drawn" from
        (see the module docstring for why that keeps sampling exact)."""
        outcome = self.propose(session_id, context, chains, depth)
        distinct = list(dict.fromkeys(t for beam in outcome.beams for t in beam.tokens))
        sent = []
        for token in distinct:
            q16 = torch.zeros(self.vocab_size, dtype=torch.float16)
            q16[token] = 1.0
            sent.append(q16)
        slot = {t: i for i, t in enumerate(distinct)}
        outcome.sent_distributions = sent
        outcome.distributions = [normalise16(q16) for q16 in sent]
        outcome.distribution_index = [[slot[t] for t in beam.tokens] for beam in outcome.beams]
        return outcome


def describe_tokenizer(service: str, tokenizer_name: str) -> ModelDescription:
    """What GetInfo reports for a model-free draft: the tokenizer, vocabulary size, end-of-sequence
    ids and context length of the model ``tokenizer_name`` (the target), read from its tokenizer
    and config files without loading weights, so the orchestrator's fingerprint check passes."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from specdec.model_store import resolve_model, tokenizer_fingerprint

    path = resolve_model(tokenizer_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_config = AutoConfig.from_pretrained(path)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the model config and tokenizer say it
        generation_config = None
    return ModelDescription(
        service=service,
        model=NAME,
        vocab_size=int(getattr(model_config, "vocab_size", 0) or len(tokenizer)),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        device="cpu",
        dtype="none",
        max_context=int(getattr(model_config, "max_position_embeddings", 0) or 0),
        eos_token_ids=eos_token_ids(SimpleNamespace(generation_config=generation_config, config=model_config), tokenizer),
    )
