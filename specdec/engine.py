"""One forward pass of a causal LM over a session's cache, with tree attention, and the one
thread every model call runs on.

Both services run their model through :func:`tree_forward`: the verify service to score the
pending context tokens plus a whole token tree in one pass, the draft service to prefill and then
grow its beams level by level. The mask and positions come from :mod:`specdec.tree`; the cache
layout and its bookkeeping from :mod:`specdec.kv_cache`. The engines (``BeamDrafter``,
``TreeVerifier``) each own a :class:`ModelWorker` and run their public methods on it
(:func:`on_model_thread`), whoever calls them: a gRPC servicer's threads or a test's.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from concurrent.futures import ThreadPoolExecutor

import torch

from specdec import telemetry
from specdec.kv_cache import SessionKV
from specdec.tree import tree_attention_mask, tree_positions


class ModelWorker:
    """Runs a model's calls one at a time on one dedicated thread.

    gRPC hands each call to whichever worker thread is free; on a CPU each calling thread gets an
    OpenMP team of its own, and teams left spinning in other threads steal the cores the next
    forward needs. Concurrent forwards would also only split the same cores (or the same GPU
    stream). One thread keeps a single team warm, and since every call that touches a session's
    KV cache runs on it, no cache is ever changed by two calls at once: no lock is needed. The
    caller's context (its trace span) is carried over, so spans made inside stay children of the
    call's span.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def run(self, fn, *args, **kwargs):
        return self._pool.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()


def on_model_thread(method):
    """Run an engine's method on the engine's ``worker`` (a :class:`ModelWorker`)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return self.worker.run(method, self, *args, **kwargs)

    return run


@torch.inference_mode()
def tree_forward(
    model,
    session: SessionKV,
    pending: list[int],
    new_tokens: list[int] = (),
    new_parents: list[int] = (),
    logits_to_keep: int = 1,
    head: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``pending`` sequential context tokens, then ``new_tokens`` as tree nodes appended to the
    session's tail (``new_parents`` index the whole tail, -1 = child of the last prefix token).

    Returns float32 logits ``[logits_to_keep, vocab]`` for the last positions fed, and records the
    fed tokens in the session so the next :meth:`SessionKV.sync` knows what the cache holds.
    ``head``: rows of the output layer to score instead of the whole vocabulary (logits
    ``[logits_to_keep, len(head)]``, for the token ids ``0 .. len(head) - 1``).
    """
    new_tokens, new_parents = list(new_tokens), list(new_parents)
    if pending and session.tail_tokens:
        raise ValueError("sequential tokens cannot follow tree nodes in the cache")
    prefix_len, cached_len = len(session.prefix_tokens), session.cached_len
    q = len(pending) + len(new_tokens)
    device = model.device
    input_ids = torch.tensor([pending + new_tokens], dtype=torch.long, device=device)
    cache_position = torch.arange(cached_len, cached_len + q, dtype=torch.long, device=device)
    if new_tokens:
        with telemetry.span("specdec.tree_mask") as span:
            tail_parents = session.tail_parents + new_parents
            mask = tree_attention_mask(prefix_len, len(pending), tail_parents, len(new_tokens)).to(device)
            position_ids = tree_positions(prefix_len + len(pending), len(pending), tail_parents, len(new_tokens)).to(device)
            span.set_attribute("specdec.tree.nodes", len(new_tokens))
            span.set_attribute("specdec.cached_tokens", cached_len)
    else:
        # Plain causal extension: let the model build its own (faster, is_causal) mask. A
        # batch-invariant model (specdec.kernels.make_batch_invariant) attends row by row to the same keys either
        # way, so this path and the tree path give every row the same bits.
        mask, position_ids = None, cache_position[None]
    inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache_position=cache_position,
                  use_cache=True, **{_cache_kwarg(model): session.cache})
    if head is None:
        logits = model(**inputs, logits_to_keep=logits_to_keep).logits[0]
    else:
        hidden = model.get_decoder()(**inputs).last_hidden_state[0, -logits_to_keep:]
        logits = hidden @ head.T
    # The DynamicCache was updated in place (reading it back from the output only warns).
    session.extend_prefix(pending)
    session.extend_tail(new_tokens, new_parents)
    return logits.float()


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    name = getattr(model, "_specdec_cache_kwarg", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model._specdec_cache_kwarg = name
    return name


def calibrate_forward(model, store, rows, reps: int, context_len: int, head: torch.Tensor | None = None):
    """The model's :class:`specdec.cost.CostCurve`: one forward of each row count, timed as a round
    runs it (the newest context token, then ``rows - 1`` tree nodes, over ``context_len`` cached
    tokens), in a session of its own that is dropped after. Running it warms the model too."""
    from specdec.cost import measure_curve

    vocab = (head if head is not None else model.get_output_embeddings().weight).shape[0]
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(vocab, (context_len + 1,), generator=generator).tolist()
    nodes = torch.randint(vocab, (max(rows),), generator=generator).tolist()
    session_id = "calibration"
    session = store.get(session_id)

    def forward(n: int) -> None:
        session.sync(context)  # back to the cached context, whatever the last pass appended
        tree_forward(model, session, context[-1:], nodes[: n - 1], [-1] * (n - 1), logits_to_keep=n, head=head)

    try:
        tree_forward(model, session, context[:-1])
        return measure_curve(forward, rows, reps)
    finally:
        store.release(session_id)
