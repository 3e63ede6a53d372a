"""Sampling by position-keyed noise: every sampled token is a function of (seed, position, the
target's distribution there), so speculation samples exactly what the target alone would, token
for token, whatever the mode, the round's shape or the other traffic in the pass.

Words used here:
- the *distribution* at a position is the target's after temperature, top-k and top-p, applied as
  ``transformers`` applies them (temperature, then top-k, then top-p, each keeping at least one
  token), so "the target's distribution" means exactly what ``transformers`` sampling with those
  parameters means;
- the *noise* of a position is a vector of independent standard Gumbel variables, one per token id,
  drawn from a counter-based stream keyed by ``(seed, position)`` alone (:func:`gumbel_noise`);
- the *sampled token* at a position is the argmax of the warped scores plus that position's noise
  (:func:`pick`).

This is the Gumbel-max form of sampling: for any scores ``s``, ``argmax(s + G)`` with ``G`` i.i.d.
Gumbel is distributed as ``softmax(s)``. The noise of each position is independent of every other
position's, and of the tokens before it, so a whole output drawn this way is distributed as the
target's own sampling. Because the draw no longer consumes a random stream, the verify pass can
decide each tree node exactly as in greedy decoding: the target's sampled token after a node is a
fixed function of that node's path, and a drafted token is accepted exactly when it is that token.
A draft that proposes under the same noise (its own warped scores plus the same ``G``) is accepted
as often as its distribution agrees with the target's (a coupling; SpecTr, arXiv:2310.15141, and
Daliri et al., arXiv:2408.07978, study its acceptance). Nothing distribution-sized ever crosses the
wire: the verify service answers one token per node, sampled or greedy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from specdec.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 (or 0) = off
    seed: int = 0  # the noise's key; 0 = none given (the orchestrator draws one per generation)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also catches NaN
            raise InvalidRequest(f"temperature = {self.temperature} must be >= 0")
        if not 0 <= self.top_p <= 1:
            raise InvalidRequest(f"top_p = {self.top_p} must be in [0, 1]")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k = {self.top_k} must be >= 0")
        if not 0 <= self.seed < 1 << 64:
            raise InvalidRequest(f"seed = {self.seed} must be in [0, 2**64)")
        if self.top_p == 0:  # 0 means off, as 1 does
            object.__setattr__(self, "top_p", 1.0)

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

# Noise is drawn in blocks of this many token ids, each block from its own stream keyed by (seed,
# position, block): a model whose vocabulary (or output layer) is narrower than another's gets the
# same noise on the ids both have.
NOISE_BLOCK = 4096
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit key from integers (SplitMix64's finaliser over each in turn): distinct inputs give
    unrelated keys, so neighbouring positions draw unrelated noise."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = (h ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


@functools.lru_cache(maxsize=64)
def gumbel_noise(seed: int, position: int, width: int) -> torch.Tensor:
    """Standard Gumbel noise for token ids ``0 .. width - 1`` at ``position`` (float32 ``[width]``),
    a function of ``(seed, position)`` alone. Cached: a round reads the same few positions again."""
    blocks = []
    for start in range(0, width, NOISE_BLOCK):
        generator = torch.Generator().manual_seed(_mix(seed, position, start))
        blocks.append(torch.rand(NOISE_BLOCK, generator=generator, dtype=torch.float64))
    uniform = torch.cat(blocks)[:width]
    # A draw of exactly 0 gives -inf: that token is never picked, as with probability 0.
    return (-torch.log(-torch.log(uniform))).float()


def pick(scores: torch.Tensor, seed: int, position: int) -> int:
    """The sampled token of one position: ``argmax(scores + noise)``, ``scores`` one row of warped
    logits (``[width]``, -inf where the warping excluded a token)."""
    return int((scores + gumbel_noise(seed, position, scores.shape[-1]).to(scores.device)).argmax())


def noised(logprobs: torch.Tensor, seed: int, position: int) -> torch.Tensor:
    """Rows of warped log-probabilities (``[rows, width]``, all at one ``position``) plus that
    position's noise: their argmax is the row's sampled token, their order a draft's ranking."""
    return logprobs + gumbel_noise(seed, position, logprobs.shape[-1]).to(logprobs.device)


def top_of(probs: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` most likely tokens of a distribution and their log-probabilities, best first."""
    top = probs.topk(k) if k > 0 else None
    return (top.indices.tolist(), top.values.log().tolist()) if top is not None else ([], [])
