"""One forward pass of a causal LM over the caches of one or more sessions, with tree attention.

Both services run their model through :func:`forward_batch`: the verify service to score each
session's pending context tokens plus its whole token tree, the draft service to prefill and then
grow beams level by level, for every session waiting at that moment in one pass
(:mod:`specdec.batching` schedules them). :func:`tree_forward` is the same for one session. The
mask and positions come from :mod:`specdec.tree`; the cache layout and its bookkeeping from
:mod:`specdec.kv_cache`; the attention over several sessions' caches from :mod:`specdec.kernels`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from opentelemetry import trace

from specdec import telemetry
from specdec.kernels import BatchCache, Segments, segmented_attention
from specdec.kv_cache import SessionKV
from specdec.tree import TokenTree, tree_attention_mask, tree_positions


@dataclass
class Part:
    """One session's share of a batched forward pass (:func:`forward_batch`): feed ``pending``
    sequential context tokens, then ``new_tokens`` as tree nodes appended to the session's tail
    (``new_parents`` index the whole tail, -1 = child of the last prefix token), and keep the logits
    of the last ``keep`` positions fed. ``reduce`` (e.g. an argmax) is applied to those logits as they
    are made, so that a large tree never holds all of its rows' logits at once. ``head``: score only
    token ids ``0 .. len(head) - 1`` with these rows of the output layer (logits ``[keep, len(head)]``)."""

    session: SessionKV
    pending: list[int]
    new_tokens: list[int] = field(default_factory=list)
    new_parents: list[int] = field(default_factory=list)
    keep: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    head: torch.Tensor | None = None  # rows of the output layer to score instead of the whole vocabulary
    span: object = None  # the call's own span for this pass (its tree mask's parent), when a scheduler made one

    @property
    def rows(self) -> int:
        return len(self.pending) + len(self.new_tokens)


#: Rows of the output layer computed at once when a pass keeps many rows' logits (a tree of
#: thousands of nodes would otherwise hold gigabytes of logits).
HEAD_BLOCK_ROWS = 32


@torch.inference_mode()
def forward_batch(model, parts: list[Part]) -> list[torch.Tensor]:
    """One forward pass over several sessions, each with its own cache and tree mask, flattened into
    one sequence: every linear product reads the weights once for all of them, while attention runs
    per session (:func:`segmented`). Returns, per part, float32 logits ``[keep, vocab]`` (or what its
    ``reduce`` made of them; ``keep`` 0: an empty tensor), and records the fed tokens in each session.

    With a batch-invariant model (:func:`specdec.kernels.make_batch_invariant`) every part's logits
    have the bits it gets alone. All parts of a pass must be distinct sessions.
    """
    segmented_attention(model)
    device = model.device
    ids, positions, masks = [], [], []
    for part in parts:
        session = part.session
        if part.pending and session.tail_tokens:
            raise ValueError("sequential tokens cannot follow tree nodes in the cache")
        if not 0 <= part.keep <= part.rows:
            raise ValueError(f"cannot keep {part.keep} of {part.rows} rows")
        prefix_len, cached_len = len(session.prefix_tokens), session.cached_len
        ids += part.pending + list(part.new_tokens)
        if part.new_tokens:
            parent = None if part.span is None else trace.set_span_in_context(part.span)
            with telemetry.span("specdec.tree_mask", context=parent) as span:
                tail_parents = session.tail_parents + list(part.new_parents)
                masks.append(tree_attention_mask(prefix_len, len(part.pending), tail_parents, len(part.new_tokens)).to(device))
                positions.append(tree_positions(prefix_len + len(part.pending), len(part.pending), tail_parents, len(part.new_tokens))[0])
                span.set_attribute("specdec.tree.nodes", len(part.new_tokens))
                span.set_attribute("specdec.cached_tokens", cached_len)
        else:
            # Plain causal extension: None lets attention take its causal path where that is right
            # (one row, or a fresh cache), else the causal mask over the cache. A batch-invariant
            # model attends row by row to the same keys either way, so every row gets the same bits.
            causal = part.rows == 1 or cached_len == 0
            masks.append(None if causal else tree_attention_mask(prefix_len, len(part.pending), [], 0).to(device))
            positions.append(torch.arange(cached_len, cached_len + part.rows, dtype=torch.long))
    lengths = [part.rows for part in parts]
    segments = Segments(lengths, masks)
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    # A scheduler gives each call its own span over the pass (specdec.batching); a direct call gets one here.
    own_span = all(part.span is None for part in parts)
    with telemetry.span("specdec.forward") if own_span else contextlib.nullcontext() as span:
        if own_span:
            forward_attributes(span, parts[0], len(parts), len(ids))
        hidden = model.get_decoder()(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            attention_mask={kind: segments for kind in layer_types},
            position_ids=torch.cat(positions)[None].to(device),
            use_cache=True,
            **{_cache_kwarg(model): BatchCache([part.session.cache for part in parts], lengths)},
        ).last_hidden_state[0]
        outputs = _kept_logits(model, hidden, parts)
    # Each session's DynamicCache was updated in place.
    for part in parts:
        part.session.extend_prefix(part.pending)
        part.session.extend_tail(list(part.new_tokens), list(part.new_parents))
    return outputs


def forward_attributes(span, part: Part, sessions: int, rows: int) -> None:
    """What a ``specdec.forward`` span says of one call's part of a pass, and of the whole pass."""
    span.set_attribute("specdec.fed_tokens", part.rows)
    span.set_attribute("specdec.tree.nodes", len(part.new_tokens))
    span.set_attribute("specdec.batch.sessions", sessions)
    span.set_attribute("specdec.batch.rows", rows)


def _kept_logits(model, hidden: torch.Tensor, parts: list[Part]) -> list[torch.Tensor]:
    """Each part's kept rows through its output layer, ``HEAD_BLOCK_ROWS`` rows of the pass at a time
    (parts scoring the same rows of the layer share each block)."""
    ends = torch.tensor([part.rows for part in parts]).cumsum(0).tolist()
    pieces: list[list[torch.Tensor]] = [[] for _ in parts]
    groups: dict[int, list[int]] = {}
    for i, part in enumerate(parts):
        groups.setdefault(id(part.head), []).append(i)
    for members in groups.values():
        head = parts[members[0]].head
        rows = torch.cat([torch.arange(ends[i] - parts[i].keep, ends[i]) for i in members]).to(hidden.device)
        owner = [i for i in members for _ in range(parts[i].keep)]
        for start in range(0, len(owner), HEAD_BLOCK_ROWS):
            block = hidden.index_select(0, rows[start : start + HEAD_BLOCK_ROWS])
            logits = (block @ head.T if head is not None else model.get_output_embeddings()(block)).float()
            block_owner = owner[start : start + HEAD_BLOCK_ROWS]
            for i in dict.fromkeys(block_owner):
                first = block_owner.index(i)
                mine = logits[first : first + block_owner.count(i)]
                pieces[i].append(parts[i].reduce(mine) if parts[i].reduce is not None else mine)
    return [torch.cat(p) if p else hidden.new_zeros(0, 0, dtype=torch.float32) for p in pieces]


def tree_forward(
    model,
    session: SessionKV,
    pending: list[int],
    new_tokens: list[int] = (),
    new_parents: list[int] = (),
    logits_to_keep: int = 1,
    head: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`forward_batch` for one session: float32 logits ``[logits_to_keep, vocab]`` for the last
    positions fed."""
    part = Part(session, list(pending), list(new_tokens), list(new_parents), logits_to_keep, head=head)
    return forward_batch(model, [part])[0]


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    name = getattr(model, "_specdec_cache_kwarg", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model._specdec_cache_kwarg = name
    return name


def mismatched_nodes(model, tree: TokenTree, context: list[int], cached: int, stepped: tuple[SessionKV, torch.Tensor]) -> list[int]:
    """Nodes (-1: the context end) whose tree-pass logits differ in any bit from stepping their path
    one token per forward. ``stepped``: the context already stepped one token per forward (its
    session and last logits); each node's steps continue from a copy of its parent's cache. The
    tree pass prefills ``context[:cached]``, then feeds the rest with the tree in one pass."""
    session = SessionKV("tree")
    if cached:
        tree_forward(model, session, context[:cached])
    logits = tree_forward(model, session, context[cached:], tree.tokens, tree.parents, logits_to_keep=len(tree) + 1)
    sessions, expected = {-1: stepped[0]}, {-1: stepped[1]}
    for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        sessions[node] = copy.deepcopy(sessions[parent])
        expected[node] = tree_forward(model, sessions[node], [token])[-1]
    return [node for node in range(-1, len(tree)) if not torch.equal(logits[node + 1], expected[node])]


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
