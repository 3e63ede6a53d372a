"""The target model's side of speculative decoding: check a whole token tree in one forward pass.

:class:`TreeVerifier` is plain Python over a ``transformers`` model (no gRPC; the server in
``verify_service.server`` converts messages at the edge). For each request it reuses the
session's cache (accepted path kept, rejected branches dropped, see ``specdec.kv_cache``), feeds
the context tokens the cache lacks plus every tree node, and returns the target's prediction at the
context end and after every node: ``n + 1`` entries for a tree of ``n`` nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specdec import telemetry
from specdec.cost import CALIBRATION_CONTEXT, CALIBRATION_ROWS, CostCurve
from specdec.engine import ModelWorker, calibrate_forward, on_model_thread, tree_forward
from specdec.kernels import make_batch_invariant
from specdec.kv_cache import SessionStore
from specdec.sampling import SamplingParams, distribution
from specdec.tree import TokenTree, validate_parents


@dataclass
class VerifyOutcome:
    target_tokens: list[int]  # [n + 1], argmax after the context and after each node
    reused_tokens: int  # context tokens whose KV came from the cache
    fed_tokens: int  # tokens in the forward pass (missing context + tree nodes)
    cached_tokens: int  # cache length after the call (context + tree)
    target_probs: torch.Tensor | None = None  # [n + 1, vocab] float32, the warped distributions (sampling only)
    forward_s: float = 0.0


class TreeVerifier:
    """Safe to call from any thread: :meth:`verify` runs one call at a time on its own model thread."""

    def __init__(self, model, store: SessionStore | None = None) -> None:
        # Every row's logits are made independent of the rows around it, so speculative output is
        # the model's own one-token greedy output bit for bit, in every dtype (README, "Exactness").
        self.model = model
        self.kernel = make_batch_invariant(model)
        self.store = store if store is not None else SessionStore()
        self.worker = ModelWorker()

    @on_model_thread
    def verify(self, session_id: str, context: list[int], tree: TokenTree, sampling: SamplingParams | None = None) -> VerifyOutcome:
        """Score the tree; with ``sampling`` (temperature > 0) also return the target's warped
        distributions, which the acceptance rule needs."""
        if not context:
            raise ValueError("context must hold at least one token")
        validate_parents(tree.parents)
        session = self.store.get(session_id)
        reused = session.sync(context)
        pending = context[reused:]
        start = time.perf_counter()
        with telemetry.span("specdec.forward") as span:
            logits = tree_forward(self.model, session, pending, tree.tokens, tree.parents, logits_to_keep=len(tree) + 1)
            span.set_attribute("specdec.fed_tokens", len(pending) + len(tree))
            span.set_attribute("specdec.tree.nodes", len(tree))
        forward_s = time.perf_counter() - start
        outcome = VerifyOutcome(
            target_tokens=logits.argmax(-1).tolist(),
            reused_tokens=reused,
            fed_tokens=len(pending) + len(tree),
            cached_tokens=session.cached_len,
            target_probs=distribution(logits.cpu(), sampling) if sampling and not sampling.greedy else None,
            forward_s=forward_s,
        )
        self.store.enforce_limits(keep=session_id)
        return outcome

    @on_model_thread
    def calibrate(self, rows=CALIBRATION_ROWS, reps: int = 3, context_len: int = CALIBRATION_CONTEXT) -> CostCurve:
        """What a verify pass of each row count costs here (the bonus token plus ``rows - 1`` nodes)."""
        return calibrate_forward(self.model, self.store, rows, reps, context_len)
