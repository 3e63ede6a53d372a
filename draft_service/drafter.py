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
from specdec.grammar import Grammars, GrammarState, GrammarStates, mask_scores
from specdec.processors import Processing
from specdec.quantize import Int4Linear, Int8Linear, W8A8Linear
from specdec.sampling import SamplingParams, noised, warp_logits


@dataclass
class Beam:
    tokens: list[int]  # [depth]
    logprob: float  # sum of the draft's log-probabilities along the beam
    probabilities: list[float] = field(default_factory=list)  # [depth] each token's probability under the draft (sampled: warped)


@dataclass
class DraftOutcome:
    beams: list[Beam]  # best first
    reused_tokens: int
    fed_tokens: int
    forward_s: float
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
    if isinstance(head, (Int8Linear, Int4Linear, W8A8Linear)):
        return head.dequantized_rows(vocab_limit)  # widened once; the rest of the model stays quantized
    return head.weight[:vocab_limit]


class BeamDrafter:
    """``vocab_limit``: greedy drafting scores only token ids below it. Byte-level BPE vocabularies
    (Qwen, Llama 3, GPT) number tokens by merge rank, so the first ids are the most frequent; a
    smaller output layer makes every draft step cheaper (for the 0.5B embedded draft the full
    151,936-row layer is a fifth of a step) and costs acceptance only where the target's next token
    is rarer. Losslessness is unaffected: the target checks every token, sampled or greedy.

    Safe to call from any thread: calls run on one model thread, batched across sessions
    (:class:`specdec.batching.BatchWorker`): each level of every waiting beam search (and each
    sampled chain step) shares one forward pass, up to ``max_batch_rows`` rows."""

    def __init__(self, model, store: SessionStore | None = None, vocab_limit: int = 0, max_batch_rows: int = 256,
                 gather_s: float = 0.002, observe=None, grammars: Grammars | None = None) -> None:
        self.model = model
        self.store = store if store is not None else SessionStore()
        self.kernel = pack_linears(model)  # speed only: a draft need not be batch-invariant
        self.head = output_rows(model, vocab_limit)  # after packing: a view of the weight it keeps
        self.max_batch_rows = max_batch_rows
        self.worker = BatchWorker(functools.partial(forward_batch, model), self.store, max_batch_rows, gather_s, observe)
        # Structured output: each session's place in its grammar, to propose only what it allows.
        self.grammar_states = GrammarStates(grammars) if grammars is not None else None

    def _run(self, steps, session_id: str, context: list[int], caller: Caller | None) -> DraftOutcome:
        if not context:
            raise ValueError("context must hold at least one token")
        outcome, stats = self.worker.submit(steps, session_id, caller)
        outcome.queue_s, outcome.batch = stats.queue_s, stats.batch
        return outcome

    def release(self, session_id: str) -> bool:
        if self.grammar_states is not None:
            self.grammar_states.forget(session_id)
        return self.worker.release(session_id)

    def propose(self, session_id: str, context: list[int], beam_width: int, depth: int, caller: Caller | None = None,
                stop: EarlyStop = EarlyStop(), sampling: SamplingParams = SamplingParams(),
                processing: Processing | None = None, prompt_len: int = 0) -> DraftOutcome:
        """Beam search: up to ``beam_width`` beams of up to ``depth`` tokens, best first. Fewer levels
        once the best beam's calibrated probability is below ``stop.min_path_probability``
        (:class:`specdec.cost.EarlyStop`); the level that showed it is kept (it cost nothing more).

        Sampled (``sampling.temperature`` > 0): the beams rank the draft's warped log-probabilities
        plus the noise the target samples with at each position (:mod:`specdec.sampling`), so the
        best beam is the draft's own sample under the target's noise and the runner-ups its next
        guesses at the target's. With ``processing``, each row's logits are processed first with its
        own history (the context and the beam so far), as the target's will be, and a grammar masks
        what it does not allow (where this service has the tokenizer for it)."""
        processing = processing if processing is not None and processing.active else None
        grammar = processing.grammar if processing is not None and self.grammar_states is not None else None
        level = functools.partial(_level, sampling=sampling, processing=processing, context=context, prompt_len=prompt_len,
                                  grammar=self.grammar_states.of(session_id, grammar) if grammar is not None else None)
        return self._run(lambda: self._beams(session_id, context, beam_width, depth, stop, level), session_id, context, caller)

    def _beams(self, session_id: str, context: list[int], beam_width: int, depth: int, stop: EarlyStop, level):
        session, reused = self.store.open(session_id, context)
        pending = context[reused:]
        start = time.perf_counter()
        fed = len(pending)
        logits = yield from feed(session, pending, head=self.head, chunk=self.max_batch_rows)
        logprobs, ranked = level(logits, [[]])  # [1, vocab] each
        # A frontier entry: (tail index of its last node or -1, cumulative rank score, tokens, each token's probability).
        frontier: list[tuple[int, float, list[int], list[float]]] = [(-1, 0.0, [], [])]
        for depth_now in range(depth):
            scores = torch.tensor([entry[1] for entry in frontier], device=ranked.device)[:, None] + ranked  # [beams, vocab]
            top = scores.flatten().topk(min(beam_width, scores.numel()))
            vocab = scores.shape[-1]
            chosen = [(int(i) // vocab, int(i) % vocab, float(s)) for s, i in zip(top.values, top.indices)]
            next_frontier = [(frontier[b][0], s, frontier[b][2] + [t], frontier[b][3] + [math.exp(float(logprobs[b, t]))])
                             for b, t, s in chosen if s > float("-inf")]
            if not next_frontier:  # nothing the draft may propose here (a grammar allows none of its tokens)
                break
            best = next_frontier[0][3]
            if depth_now == depth - 1 or math.prod(calibrated(p, stop.calibration) for p in best) < stop.min_path_probability:
                frontier = next_frontier
                break
            base = len(session.tail_tokens)
            tokens = [entry[2][-1] for entry in next_frontier]
            parents = [entry[0] for entry in next_frontier]
            logits = yield Part(session, [], tokens, parents, keep=len(tokens), head=self.head)
            logprobs, ranked = level(logits, [entry[2] for entry in next_frontier])
            fed += len(tokens)
            frontier = [(base + k, *entry[1:]) for k, entry in enumerate(next_frontier)]
        forward_s = time.perf_counter() - start
        beams = [Beam(tokens=path, logprob=score, probabilities=probs) for _, score, path, probs in frontier if path]
        return DraftOutcome(beams=beams, reused_tokens=reused, fed_tokens=fed, forward_s=forward_s)

    def calibrate(self, rows=CALIBRATION_ROWS, reps: int = 3, context_len: int = CALIBRATION_CONTEXT) -> CostCurve:
        """What one beam-search level of each width costs here (greedy drafting's output layer)."""
        return self.worker.run(calibrate_forward, self.model, self.store, rows, reps, context_len, head=self.head)


def _level(logits: torch.Tensor, paths: list[list[int]], sampling: SamplingParams, processing: Processing | None,
           context: list[int], prompt_len: int, grammar: GrammarState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One beam-search level's rows (row i after ``context + paths[i]``; all rows of a level at one
    position): the draft's log-probabilities (processed and warped as the request says) and what
    the beams rank by (greedy: the same; sampled: plus the position's noise)."""
    if processing is not None:
        logits = torch.stack([processing.apply(row, context + path, prompt_len) for row, path in zip(logits, paths)])
    if grammar is not None:
        logits = torch.stack([mask_scores(row, grammar.allowed(context[prompt_len:] + path)) for row, path in zip(logits, paths)])
    if sampling.greedy:
        logprobs = torch.log_softmax(logits, -1)
        return logprobs, logprobs
    warped = warp_logits(logits, sampling)
    if processing is not None:
        warped = torch.stack([processing.after_warping(row) for row in warped])
    logprobs = torch.log_softmax(warped, -1)
    return logprobs, noised(logprobs, sampling.seed, len(context) + len(paths[0]))
