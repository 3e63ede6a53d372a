"""Prompt lookup: a draft with no model (n-gram matching over the context).

Where the output repeats its input (code edits, answers quoting a document, repeated structure),
the tokens that followed an earlier occurrence of the context's last few tokens are a good guess
for what comes next, and finding them costs microseconds instead of a forward pass (Saxena, "Prompt
Lookup Decoding", 2023; vLLM's ``ngram_proposer.py`` does the same). The orchestrator runs it
in-process before each round (:class:`PromptLookup`), over the whole context (prompt and every
accepted token, so the generation's own output is searched too), with no per-session index: a scan
of a 2,000-token context takes well under a millisecond (see :func:`find_continuations`). Because its
proposal is known before the round's shape is chosen, the cost model prices it at what it really
is (a path of known length that costs verify rows only) and can skip the model drafts when the
lookup alone is the better round (:func:`specdec.cost.choose`).

Words used here:
- the *suffix* is the context's last ``n`` tokens, ``min_ngram <= n <= max_ngram``;
- a *match* is an earlier place where the suffix occurs; its *length* is how far the agreement with
  the context's end reaches back (at least ``n``, counted up to :data:`MATCH_HORIZON` tokens);
- its *continuation* is what followed it, read on past the context's end through the tokens it
  proposes itself, so a repeating pattern continues for the whole depth asked.

Under sampling its tokens are checked as every draft's are: a token is accepted when it is the
target's own sampled token there (:mod:`specdec.sampling`), so the output is the target's sampling
whatever the lookup proposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

NAME = "prompt-lookup"  # the draft's name in proposals, statistics and traces
PREDICTION = "prediction"  # its name when the chain comes from the request's prediction (Predicted Outputs)
GRAMMAR = "grammar"  # a chain of what the request's grammar forces (specdec.grammar), proposed by the orchestrator
SEPARATOR = -1  # between a reference text and the context: matches nothing, and a chain ends at it
MATCH_HORIZON = 64  # how far back a match's length is measured, to rank matches


def find_continuations(context, width: int, depth: int, max_ngram: int = 4, min_ngram: int = 2) -> list[list[int]]:
    """Up to ``width`` distinct continuations of ``depth`` tokens after ``context`` (token ids),
    best first: suffixes of ``max_ngram`` tokens down to ``min_ngram``, and for each, matches by
    length, then the most recent first. A continuation that is a prefix of one already chosen adds
    nothing to the trie and is skipped. Empty when the context's end occurs nowhere earlier."""
    return [continuation for continuation, _, _ in _ranked(context, width, depth, max_ngram, min_ngram)]


def _ranked(context, width: int, depth: int, max_ngram: int, min_ngram: int,
            first_before: int = 0) -> list[tuple[list[int], int, int]]:
    """:func:`find_continuations`, each with its match's length and where its continuation starts;
    among matches of one length, those whose continuation starts before ``first_before`` come first
    (a reference text before the context: see :meth:`PromptLookup.propose`)."""
    tokens = np.asarray(context, dtype=np.int64)  # [L]
    size = len(tokens)
    chosen: list[tuple[list[int], int, int]] = []
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        # Matches start at i <= size - n - 1: each is followed by at least one token of the context.
        starts = size - n
        hit = np.ones(starts, dtype=bool)
        for j in range(n):
            hit &= tokens[j:j + starts] == tokens[size - n + j]
        ends = np.flatnonzero(hit) + n  # [matches] where each continuation starts
        if not len(ends):
            continue
        lengths = _match_lengths(tokens, ends, n)
        for i in np.lexsort((-ends, ends >= first_before, -lengths)):
            continuation = _continue(tokens, int(ends[i]), depth)
            if continuation and not any(c[:len(continuation)] == continuation for c, _, _ in chosen):
                chosen.append((continuation, int(lengths[i]), int(ends[i])))
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
    if SEPARATOR in out:  # a match in a reference text reads on only to its end
        return out[:out.index(SEPARATOR)]
    for k in range(len(out), depth):
        out.append(out[start + k - len(tokens)])
    return out


@dataclass(frozen=True)
class Match:
    """The lookup's chain after a context, and how far back its match agrees with the context's end."""

    tokens: list[int]
    agreed: int
    source: str = NAME  # NAME: found in the context; PREDICTION: in the request's prediction

    @property
    def stats_key(self) -> str:
        """The name its acceptance is counted under: a match agreeing on 2-3 tokens is a guess, one
        agreeing on 16 a copy, and the cost model prices each kind by what such chains have given."""
        return f"{self.source}/{1 << min(self.agreed.bit_length() - 1, 5)}"


class PromptLookup:
    """The orchestrator's model-free draft: each round, the best continuation of the context as one
    chain (a second-best match is rarely accepted where the best one is not, and one chain is what
    the cost model prices). Pure and thread-safe."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: list[int], depth: int, reference: Sequence[int] = ()) -> Match | None:
        """Up to ``depth`` tokens after ``context``; None when its end occurs nowhere earlier. With a
        ``reference`` (a text the answer is expected to repeat: OpenAI's Predicted Outputs), its
        matches compete with the context's, the longest agreement first, and on a tie the
        reference's (the user sent it to be used: a prompt that quotes the file being edited
        holds the same text, and the chain is then credited to the prediction); a chain found
        there is named :data:`PREDICTION`."""
        if depth <= 0:
            return None
        searched = [*reference, SEPARATOR, *context] if reference else context
        found = _ranked(searched, 1, depth, self.max_ngram, self.min_ngram, first_before=len(reference) + 1 if reference else 0)
        if not found:
            return None
        tokens, agreed, start = found[0]
        return Match(tokens, agreed, PREDICTION if start <= len(reference) else NAME)
