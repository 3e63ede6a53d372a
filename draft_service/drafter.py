"""The draft model's side of speculative decoding: propose token paths cheaply.

:class:`BeamDrafter` runs beam search of ``beam_width`` beams, ``depth`` tokens deep, over the
session's cache; a width of 1 is the greedy chain of sequential mode. Beams grow as a token tree in
the cache (one forward per level over the ``beam_width`` newest nodes, tree attention mask), so the
context is never copied per beam. The explored tree stays cached as the session's tail: the next
request keeps the part of it the target accepted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from specdec.engine import tree_forward
from specdec.kv_cache import SessionStore


@dataclass
class Beam:
    tokens: list[int]  # [depth]
    logprob: float  # sum of the draft's log-probabilities along the beam


@dataclass
class DraftOutcome:
    beams: list[Beam]  # best first
    reused_tokens: int
    fed_tokens: int
    forward_s: float


class BeamDrafter:
    def __init__(self, model, store: SessionStore | None = None) -> None:
        self.model = model
        self.store = store if store is not None else SessionStore()
        self._model_lock = threading.Lock()

    def propose(self, session_id: str, context: list[int], beam_width: int, depth: int) -> DraftOutcome:
        if not context:
            raise ValueError("context must hold at least one token")
        session = self.store.get(session_id)
        with session.lock, self._model_lock:
            reused = session.sync(context)
            pending = context[reused:]
            start = time.perf_counter()
            fed = len(pending)
            logprobs = torch.log_softmax(tree_forward(self.model, session, pending), -1)  # [1, vocab]
            # A frontier entry: (tail index of its last node or -1, cumulative logprob, tokens).
            frontier: list[tuple[int, float, list[int]]] = [(-1, 0.0, [])]
            for level in range(depth):
                scores = torch.tensor([score for _, score, _ in frontier])[:, None] + logprobs  # [beams, vocab]
                top = scores.flatten().topk(min(beam_width, scores.numel()))
                vocab = scores.shape[-1]
                chosen = [(int(i) // vocab, int(i) % vocab, float(s)) for s, i in zip(top.values, top.indices)]
                next_frontier = [(frontier[b][0], s, frontier[b][2] + [t]) for b, t, s in chosen]
                if level == depth - 1:
                    frontier = next_frontier
                    break
                base = len(session.tail_tokens)
                tokens = [path[-1] for _, _, path in next_frontier]
                parents = [parent for parent, _, _ in next_frontier]
                logits = tree_forward(self.model, session, [], tokens, parents, logits_to_keep=len(tokens))
                logprobs = torch.log_softmax(logits, -1)
                fed += len(tokens)
                frontier = [(base + k, s, path) for k, (_, s, path) in enumerate(next_frontier)]
            forward_s = time.perf_counter() - start
        self.store.enforce_limits(keep=session_id)
        beams = [Beam(tokens=path, logprob=score) for _, score, path in frontier if path]
        return DraftOutcome(beams=beams, reused_tokens=reused, fed_tokens=fed, forward_s=forward_s)
