"""The draft model's side of speculative decoding: propose token paths cheaply.

:class:`BeamDrafter` runs beam search of ``beam_width`` beams, ``depth`` tokens deep, over the
session's cache; a width of 1 is the greedy chain of sequential mode. Beams grow as a token tree in
the cache (one forward per level over the ``beam_width`` newest nodes, tree attention mask), so the
context is never copied per beam. The explored tree stays cached as the session's tail: the next
request keeps the part of it the target accepted.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import torch

from specdec.batching import BatchInfo, BatchWorker, Caller, feed
from specdec.cost import CALIBRATION_CONTEXT, CALIBRATION_ROWS, CostCurve, EarlyStop, calibrated
from specdec.engine import Part, calibrate_forward, forward_batch
from specdec.kernels import pack_linears
from specdec.kv_cache import SessionStore
from specdec.quantize import Int8Linear
from specdec.sampling import SamplingParams, draft_distribution, sample


@dataclass
class Beam:
    tokens: list[int]  # [depth]
    logprob: float  # sum of the draft's log-probabilities along the beam
    probabilities: list[float] = field(default_factory=list)  # greedy: [depth] each token's probability under the draft


@dataclass
class DraftOutcome:
    beams: list[Beam]  # best first (sampling: in the order drawn)
    reused_tokens: int
    fed_tokens: int
    forward_s: float
    # Sampling only: each distinct distribution drawn from, as sent (float16) and as used (float64),
    # and for each beam, the index of the distribution each of its tokens was drawn from.
    sent_distributions: list[torch.Tensor] | None = None
    distributions: list[torch.Tensor] | None = None
    distribution_index: list[list[int]] | None = None
    queue_s: float = 0.0  # waiting for the model before its first pass
    batch: BatchInfo = field(default_factory=BatchInfo)  # the last pass of the call


def output_rows(model, vocab_limit: int) -> torch.Tensor | None:
    """The first ``vocab_limit`` rows of the model's output layer (a view, no copy), or None for the
    whole vocabulary (also when the model's head is not a plain bias-free linear layer or keeps no
    weight of its own)."""
    head = model.get_output_embeddings() if vocab_limit > 0 else None
    if head is None or getattr(head, "bias", None) is not None or vocab_limit >= head.weight.shape[0]:
        return None
    if head.weight.is_meta:  # packed for a verify pass (specdec.kernels), its weight gone
        return None
    if type(model).__name__.startswith(("Gemma", "Cohere")):  # heads with soft-capping or scaling
        return None
    if isinstance(head, Int8Linear):
        return head.dequantized_rows(vocab_limit)  # widened once; the rest of the model stays int8
    return head.weight[:vocab_limit]


class BeamDrafter:
    """``vocab_limit``: greedy drafting scores only token ids below it. Byte-level BPE vocabularies
    (Qwen, Llama 3, GPT) number tokens by merge rank, so the first ids are the most frequent; a
    smaller output layer makes every draft step cheaper (for the 0.5B embedded draft the full
    151,936-row layer is a fifth of a step) and costs acceptance only where the target's next token
    is rarer. Losslessness is unaffected: the target checks every token. Sampling always uses the
    whole vocabulary (its acceptance rule needs the draft's true distribution).

    Safe to call from any thread: calls run on one model thread, batched across sessions
    (:class:`specdec.batching.BatchWorker`): each level of every waiting beam search (and each
    sampled chain step) shares one forward pass, up to ``max_batch_rows`` rows."""

    def __init__(self, model, store: SessionStore | None = None, vocab_limit: int = 0, max_batch_rows: int = 256,
                 gather_s: float = 0.002, observe=None) -> None:
        self.model = model
        self.store = store if store is not None else SessionStore()
        self.kernel = pack_linears(model)  # speed only: a draft need not be batch-invariant
        self.head = output_rows(model, vocab_limit)  # after packing: a view of the weight it keeps
        self.max_batch_rows = max_batch_rows
        self.worker = BatchWorker(functools.partial(forward_batch, model), self.store, max_batch_rows, gather_s, observe)

    def _run(self, steps, session_id: str, context: list[int], caller: Caller | None) -> DraftOutcome:
        if not context:
            raise ValueError("context must hold at least one token")
        outcome, stats = self.worker.submit(steps, session_id, caller)
        outcome.queue_s, outcome.batch = stats.queue_s, stats.batch
        return outcome

    def release(self, session_id: str) -> bool:
        return self.worker.release(session_id)

    def propose(self, session_id: str, context: list[int], beam_width: int, depth: int, caller: Caller | None = None,
                stop: EarlyStop = EarlyStop()) -> DraftOutcome:
        """Beam search: up to ``beam_width`` beams of up to ``depth`` tokens, best first. Fewer levels
        once the best beam's calibrated probability is below ``stop.min_path_probability``
        (:class:`specdec.cost.EarlyStop`); the level that showed it is kept (it cost nothing more)."""
        return self._run(lambda: self._beams(session_id, context, beam_width, depth, stop), session_id, context, caller)

    def _beams(self, session_id: str, context: list[int], beam_width: int, depth: int, stop: EarlyStop = EarlyStop()):
        session, reused = self.store.open(session_id, context)
        pending = context[reused:]
        start = time.perf_counter()
        fed = len(pending)
        logits = yield from feed(session, pending, head=self.head, chunk=self.max_batch_rows)
        logprobs = torch.log_softmax(logits, -1)  # [1, vocab]
        # A frontier entry: (tail index of its last node or -1, cumulative logprob, tokens, each token's probability).
        frontier: list[tuple[int, float, list[int], list[float]]] = [(-1, 0.0, [], [])]
        for level in range(depth):
            scores = torch.tensor([entry[1] for entry in frontier], device=logprobs.device)[:, None] + logprobs  # [beams, vocab]
            top = scores.flatten().topk(min(beam_width, scores.numel()))
            vocab = scores.shape[-1]
            chosen = [(int(i) // vocab, int(i) % vocab, float(s)) for s, i in zip(top.values, top.indices)]
            next_frontier = [(frontier[b][0], s, frontier[b][2] + [t], frontier[b][3] + [math.exp(s - frontier[b][1])])
                             for b, t, s in chosen]
            best = next_frontier[0][3]
            if level == depth - 1 or math.prod(calibrated(p, stop.calibration) for p in best) < stop.min_path_probability:
                frontier = next_frontier
                break
            base = len(session.tail_tokens)
            tokens = [entry[2][-1] for entry in next_frontier]
            parents = [entry[0] for entry in next_frontier]
            logits = yield Part(session, [], tokens, parents, keep=len(tokens), head=self.head)
            logprobs = torch.log_softmax(logits, -1)
            fed += len(tokens)
            frontier = [(base + k, *entry[1:]) for k, entry in enumerate(next_frontier)]
        forward_s = time.perf_counter() - start
        beams = [Beam(tokens=path, logprob=score, probabilities=probs) for _, score, path, probs in frontier if path]
        return DraftOutcome(beams=beams, reused_tokens=reused, fed_tokens=fed, forward_s=forward_s)

    def calibrate(self, rows=CALIBRATION_ROWS, reps: int = 3, context_len: int = CALIBRATION_CONTEXT) -> CostCurve:
        """What one beam-search level of each width costs here (greedy drafting's output layer)."""
        return self.worker.run(calibrate_forward, self.model, self.store, rows, reps, context_len, head=self.head)

    def sample_chains(self, session_id: str, context: list[int], chains: int, depth: int, sampling: SamplingParams,
                      seed: int, caller: Caller | None = None) -> DraftOutcome:
        """Draw ``chains`` independent chains of ``depth`` tokens from the draft's warped distribution.

        Under sampling the acceptance rule needs independent draws with known distributions, so
        this replaces beam search. Chains that agree so far share a cache node (and a distribution);
        each chain still draws its own next token.
        """
        return self._run(lambda: self._chains(session_id, context, chains, depth, sampling, seed), session_id, context, caller)

    def _chains(self, session_id: str, context: list[int], chains: int, depth: int, sampling: SamplingParams, seed: int):
        generator = torch.Generator().manual_seed(seed)
        session, reused = self.store.open(session_id, context)
        pending = context[reused:]
        start = time.perf_counter()
        first = yield from feed(session, pending, chunk=self.max_batch_rows)
        q, q16 = draft_distribution(first[-1].cpu(), sampling)
        sent, used = [q16], [q]
        dist_of_node = {-1: 0}  # tail node (-1: the context end) -> its distribution's index
        node_of = {}  # (parent tail node, token) -> tail node
        at = [-1] * chains  # each chain's current tail node
        paths: list[list[int]] = [[] for _ in range(chains)]
        index: list[list[int]] = [[] for _ in range(chains)]
        fed = len(pending)
        for level in range(depth):
            for c in range(chains):
                d = dist_of_node[at[c]]
                paths[c].append(sample(used[d], generator))
                index[c].append(d)
            if level == depth - 1:
                break
            new = []  # (parent, token) pairs not in the cache yet, in first-drawn order
            for c in range(chains):
                key = (at[c], paths[c][-1])
                if key not in node_of and key not in new:
                    new.append(key)
            base = len(session.tail_tokens)
            if new:
                # Drawn on the CPU: the seeded generator is a CPU one and the distributions leave as bytes.
                logits = (yield Part(session, [], [t for _, t in new], [p for p, _ in new], keep=len(new))).cpu()
                fed += len(new)
                for k, key in enumerate(new):
                    node_of[key] = base + k
                    q, q16 = draft_distribution(logits[k], sampling)
                    dist_of_node[base + k] = len(sent)
                    sent.append(q16)
                    used.append(q)
            at = [node_of[(at[c], paths[c][-1])] for c in range(chains)]
        forward_s = time.perf_counter() - start
        return DraftOutcome(
            beams=[Beam(tokens=path, logprob=0.0) for path in paths],
            reused_tokens=reused,
            fed_tokens=fed,
            forward_s=forward_s,
            sent_distributions=sent,
            distributions=used,
            distribution_index=index,
        )
