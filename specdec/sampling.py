"""Sampling distributions and the lossless acceptance rule for sampled token trees.

Words used here:
- ``p``: the target's distribution at a position, ``q``: the draft's distribution it sampled from;
  both after the same temperature / top-k / top-p warping, applied as ``transformers`` applies them
  (temperature, then top-k, then top-p, each keeping at least one token), so "the target's
  distribution" means exactly what ``transformers`` sampling with those parameters means;
- a *candidate* at a tree node is one draft sample of a child token, with the ``q`` it was drawn
  from; the same token drawn twice is two candidates of one node.

The rule is SpecInfer's multi-step speculative sampling (Miao et al., arXiv:2305.09781, Alg. 2;
with one draft and one chain it is the standard rule of Leviathan et al., arXiv:2211.17192 and
Chen et al., arXiv:2302.01318): at a node, try its candidates in order; accept candidate ``x``
with probability ``min(1, p(x) / q(x))``; on rejection replace ``p`` by the residual
``norm(max(p - q, 0))`` and try the next; if a candidate is accepted, move to that child and
repeat with the target's distribution there; when no candidate is left, sample the bonus token
from the current (residual) ``p``. Every output token is then distributed exactly as the target's
own sampling would draw it, whatever the drafts proposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 (or 0) = off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p over the last axis, as transformers' logits warpers do them."""
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0 < params.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution (float32, sums to 1 over the last axis)."""
    return warp_logits(logits, params).softmax(-1)


#: The most alternatives a request may ask for at each position (``top_logprobs``), as OpenAI allows.
MAX_TOP_LOGPROBS = 20


def top_of(probs: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` most likely tokens of a distribution and their log-probabilities, best first."""
    top = probs.topk(k) if k > 0 else None
    return (top.indices.tolist(), top.values.log().tolist()) if top is not None else ([], [])


def draft_distribution(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft's distribution as it is sampled from and as it is sent: ``(q, q16)``.

    The draft samples from ``q = q16 / sum(q16)`` computed in float64, and sends ``q16``; the
    receiver repeats the same normalisation. Every float16 value is a multiple of 2**-24 and the
    sum stays below 2, so float64 adds them exactly in any order: both ends hold bit-identical q.
    """
    q16 = distribution(logits, params).half()
    return normalise16(q16), q16


def normalise16(q16: torch.Tensor) -> torch.Tensor:
    q = q16.double()
    return q / q.sum(-1, keepdim=True)


def pack(probs: torch.Tensor) -> tuple[bytes, list[int]]:
    """Little-endian bytes of a distribution (float16 or float32, as given); sparse (values of the
    nonzero tokens, and their ids) when that is smaller, e.g. after top-k / top-p."""
    nonzero = torch.nonzero(probs, as_tuple=True)[0]
    if 2 * len(nonzero) < len(probs):  # an id costs 4 bytes; sparse wins below about half
        return probs[nonzero].numpy().astype(probs.numpy().dtype.newbyteorder("<")).tobytes(), nonzero.tolist()
    return probs.numpy().astype(probs.numpy().dtype.newbyteorder("<")).tobytes(), []


def unpack(data: bytes, token_ids: list[int], vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`pack`: the dense distribution, in ``dtype``."""
    import numpy as np

    values = torch.from_numpy(np.frombuffer(data, dtype=np.dtype(str(dtype).removeprefix("torch.")).newbyteorder("<")).copy())
    if not token_ids:
        if len(values) != vocab_size:
            raise ValueError(f"a dense distribution has {len(values)} values for a vocabulary of {vocab_size}")
        return values
    if len(values) != len(token_ids):
        raise ValueError(f"a sparse distribution has {len(values)} values for {len(token_ids)} token ids")
    dense = torch.zeros(vocab_size, dtype=dtype)
    dense[torch.tensor(token_ids, dtype=torch.long)] = values
    return dense


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))``: what is left of p once q's proposals are rejected."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    # Zero only when p <= q everywhere, i.e. p == q: then rejection had probability 0 and p stands.
    return r / total if total > 0 else p


@dataclass
class Candidate:
    node: int  # the child node this sample landed on
    q: torch.Tensor  # [vocab] the distribution it was drawn from


def accept_sampled_tree(
    tokens: list[int],
    target_probs: torch.Tensor,
    candidates: dict[int, list[Candidate]],
    generator: torch.Generator,
) -> tuple[list[int], int]:
    """Multi-step speculative sampling over a token tree.

    ``target_probs[0]`` is p at the context end and ``target_probs[i + 1]`` p after node i;
    ``candidates[u]`` lists, in the order they are tried, the draft samples of u's children
    (``u = -1`` for the root). Returns the accepted nodes (root first) and the bonus token.
    """
    accepted: list[int] = []
    node = -1
    while True:
        p = target_probs[node + 1]
        for cand in candidates.get(node, []):
            x = tokens[cand.node]
            q_x = float(cand.q[x])
            # Accept x with probability min(1, p(x) / q(x)).
            if q_x > 0 and float(torch.rand((), generator=generator)) * q_x < float(p[x]):
                accepted.append(cand.node)
                node = cand.node
                break
            # Rejected: the next candidate competes for what q did not already cover.
            p = residual(p, cand.q)
        else:
            # No candidate left: the bonus token comes from the (residual) target distribution.
            return accepted, sample(p, generator)
