"""The target model's side of speculative decoding: check a whole token tree in one forward pass.

:class:`TreeVerifier` is plain Python over a ``transformers`` model (no gRPC; the server in
``verify_service.server`` converts messages at the edge). For each request it reuses the
session's cache (accepted path kept, rejected branches dropped, see ``specdec.kv_cache``), feeds
the context tokens the cache lacks plus every tree node, and returns the target's prediction at the
context end and after every node: ``n + 1`` entries for a tree of ``n`` nodes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from specdec.batching import BatchInfo, BatchWorker, Caller, feed
from specdec.cost import CALIBRATION_CONTEXT, CALIBRATION_ROWS, CostCurve
from specdec.engine import calibrate_forward, forward_batch
from specdec.kernels import make_batch_invariant
from specdec.kv_cache import SessionStore
from specdec.errors import InvalidRequest
from specdec.grammar import Grammars, GrammarState, GrammarStates, mask_scores
from specdec.processors import Processing
from specdec.sampling import SamplingParams, pick, warp_logits
from specdec.tree import TokenTree, validate_parents


@dataclass
class VerifyOutcome:
    target_tokens: list[int]  # [n + 1], the target's token after the context and after each node (greedy: argmax; sampled: specdec.sampling.pick)
    reused_tokens: int  # context tokens whose KV came from the cache
    fed_tokens: int  # tokens in the forward pass (missing context + tree nodes)
    cached_tokens: int  # cache length after the call (context + tree)
    # [n + 1] (token ids, log-probabilities), most likely first (with top_logprobs only; sampled:
    # of the warped distribution the token was drawn from)
    top_logprobs: list[tuple[list[int], list[float]]] | None = None
    forward_s: float = 0.0  # from the call's first pass to its last
    queue_s: float = 0.0  # waiting for the model before its first pass
    batch: BatchInfo = field(default_factory=BatchInfo)  # the pass that scored the tree


class TreeVerifier:
    """Safe to call from any thread: calls run on one model thread, batched across sessions
    (:class:`specdec.batching.BatchWorker`): each pass scores the trees of every session waiting,
    up to ``max_batch_rows`` rows, and a long context is fed in passes of at most that many."""

    def __init__(self, model, store: SessionStore | None = None, max_batch_rows: int = 256, gather_s: float = 0.002,
                 observe=None, grammars: Grammars | None = None) -> None:
        # Every row's logits are made independent of the rows around it, so speculative output is
        # the model's own one-token greedy output bit for bit, in every dtype, alone or batched with
        # other sessions (README, "Exactness").
        self.model = model
        self.kernel = make_batch_invariant(model)
        self.store = store if store is not None else SessionStore()
        self.max_batch_rows = max_batch_rows
        self.worker = BatchWorker(functools.partial(forward_batch, model), self.store, max_batch_rows, gather_s, observe)
        # Structured output: each session's place in its grammar (None: no tokenizer, no grammars).
        self.grammar_states = GrammarStates(grammars) if grammars is not None else None

    def verify(self, session_id: str, context: list[int], tree: TokenTree, sampling: SamplingParams | None = None,
               caller: Caller | None = None, top_logprobs: int = 0, processing: Processing | None = None,
               prompt_len: int = 0) -> VerifyOutcome:
        """Score the tree: the target's token at each place, greedy (argmax) or, with ``sampling``
        (temperature > 0), sampled by the noise of ``sampling.seed`` at that place's position
        (:mod:`specdec.sampling`); with ``top_logprobs`` > 0 also the most likely tokens at each
        place and their log-probabilities; with ``processing``, the logits processed first at each
        place with its own history (the context and the path to the node; the output begins after
        ``prompt_len`` tokens). ``caller``: dropped unrun once it has gone."""
        if not context:
            raise ValueError("context must hold at least one token")
        validate_parents(tree.parents)
        processing = processing if processing is not None and processing.active else None
        if processing is not None and processing.grammar is not None:
            if self.grammar_states is None:
                raise InvalidRequest("this verify service has no tokenizer to apply a grammar with")
            processing.grammar.llguidance()  # compiled (or refused) here, not on the model thread
        outcome, stats = self.worker.submit(lambda: self._verify(session_id, context, tree, sampling, top_logprobs, processing,
                                                                 prompt_len), session_id, caller)
        outcome.queue_s, outcome.batch = stats.queue_s, stats.batch
        return outcome

    def _verify(self, session_id: str, context: list[int], tree: TokenTree, sampling: SamplingParams | None, top: int,
                processing: Processing | None = None, prompt_len: int = 0):
        session, reused = self.store.open(session_id, context)
        pending = context[reused:]
        start = time.perf_counter()
        row_by_row = (sampling is not None and not sampling.greedy) or processing is not None
        reduce = None if row_by_row else functools.partial(_argmax_and_top, k=top) if top > 0 else _argmax
        scored = yield from feed(session, pending, tree.tokens, tree.parents, keep=len(tree) + 1,
                                 reduce=reduce, chunk=self.max_batch_rows)
        if row_by_row:
            grammar = processing.grammar if processing is not None else None
            state = self.grammar_states.of(session_id, grammar) if grammar is not None else None
            tokens, tops = _decide(scored, context, tree, sampling or SamplingParams(), processing or Processing(), prompt_len, top,
                                   state)
        elif top > 0:
            tops = [(row[1 : top + 1].long().tolist(), row[top + 1 :].tolist()) for row in scored]
            tokens = scored[:, 0].long().tolist()
        else:
            tokens, tops = scored.tolist(), None
        return VerifyOutcome(
            target_tokens=tokens,
            reused_tokens=reused,
            fed_tokens=len(pending) + len(tree),
            cached_tokens=session.cached_len,
            forward_s=time.perf_counter() - start,
            top_logprobs=tops,
        )

    def release(self, session_id: str) -> bool:
        if self.grammar_states is not None:
            self.grammar_states.forget(session_id)
        return self.worker.release(session_id)

    def calibrate(self, rows=CALIBRATION_ROWS, reps: int = 3, context_len: int = CALIBRATION_CONTEXT) -> CostCurve:
        """What a verify pass of each row count costs here (the bonus token plus ``rows - 1`` nodes)."""
        return self.worker.run(calibrate_forward, self.model, self.store, rows, reps, context_len)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _argmax_and_top(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, in one float64 tensor (exact for token ids): the argmax (what decides the output,
    taken as :func:`_argmax` takes it, whatever order ``topk`` gives ties), then the ``k`` most
    likely token ids and their log-probabilities."""
    top = torch.log_softmax(logits, -1).topk(k, -1)
    return torch.cat([_argmax(logits)[:, None].double(), top.indices.double(), top.values.double()], -1)


def _decide(logits: torch.Tensor, context: list[int], tree: TokenTree, sampling: SamplingParams, processing: Processing,
            prompt_len: int, k: int, grammar: GrammarState | None = None):
    """Per place, the target's token: its logits processed with the place's own history, then the
    argmax (greedy) or the draw at the place's position (sampled: :func:`specdec.sampling.pick`);
    with ``k`` > 0 also the ``k`` most likely tokens of that distribution and their
    log-probabilities, the chosen token's own appended when it is not among them. With ``grammar``,
    what it does not allow after the place's output is masked after the processors. Row by row:
    each place's answer comes from its row's logits and history alone, whatever else the pass held."""
    tokens, tops = [], []
    positions = tree.answer_positions(len(context))
    for place, (row, position) in enumerate(zip(logits.cpu(), positions)):
        scores = row
        if processing.active:  # the place's own history, built only when a processor reads it
            history = context if place == 0 else context + [tree.tokens[n] for n in tree.path_to(place - 1)]
            scores = processing.apply(row, history, prompt_len)
            if grammar is not None:
                scores = mask_scores(scores, grammar.allowed(history[prompt_len:]))
        if sampling.greedy:
            token = int(scores.argmax())
        else:
            scores = processing.after_warping(warp_logits(scores, sampling))
            token = pick(scores, sampling.seed, position)
        tokens.append(token)
        if k > 0:
            logprobs = torch.log_softmax(scores, -1)
            top = logprobs.topk(k)
            ids, values = top.indices.tolist(), top.values.tolist()
            if token not in ids:
                ids.append(token)
                values.append(float(logprobs[token]))
            tops.append((ids, values))
    return tokens, tops if k > 0 else None
