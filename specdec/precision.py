"""Which exact numeric path a verify service runs, chosen at start-up by measurement (``--dtype auto``).

Costs differ several-fold between the machines this runs on (README, "Machines differ"): on a CPU
with native bfloat16 (AMX, or AVX-512 with bfloat16) the exact bfloat16 pass is the cheapest and
about flat in rows; on a CPU with AVX2 only it costs in proportion to rows and float32 through
oneDNN is the fastest exact path. No constant can know which machine it is on, so every candidate
dtype is loaded, made batch-invariant (:func:`specdec.kernels.make_batch_invariant`: its products
checked row-invariant on the model's own weights, or cut into fixed-row blocks), checked end to
end (a tree pass against one-token steps, bit for bit: a candidate that fails is never kept), and
its cost curve measured; the one whose *round* gives the most tokens per second
(:func:`specdec.cost.fastest_curve`) is kept, the others dropped.

Lossless output is exact against the chosen dtype's own one-token decoding: the dtype is part of
the model the user gets, and the start-up line, ``GetInfo`` and ``/v1/models`` say which was
chosen and why (:meth:`PrecisionChoice.summary`).
"""

from __future__ import annotations

import gc
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from specdec.cost import CALIBRATION_CONTEXT, CALIBRATION_ROWS, Choice, CostCurve, fastest_curve
from specdec.engine import calibrate_forward, mismatched_nodes, tree_forward
from specdec.kernels import make_batch_invariant
from specdec.kv_cache import SessionKV, SessionStore
from specdec.model_store import ModelStoreError
from specdec.tree import TokenTree

log = logging.getLogger("specdec")

#: The dtypes tried, in order of preference on a tie. float16 is left out: on CPUs it has no fast
#: exact product, and on GPUs bfloat16 is as fast with float32's range.
CANDIDATES = ("bfloat16", "float32")
#: The end-to-end check: a tree of this many nodes with random parents after this many context
#: tokens, every node against its path stepped one token per forward.
CHECK_NODES = 6
CHECK_CONTEXT = 4


def default_dtype(device: str) -> str:
    """What ``--dtype auto`` means for a service that does not measure (a draft: the target decides
    every token, so only speed matters, and an int8 draft multiplies in bfloat16 anyway): float32
    on a CPU, bfloat16 elsewhere."""
    return "float32" if device == "cpu" else "bfloat16"


@dataclass
class Candidate:
    dtype: str
    kernel: str = ""  # what make_batch_invariant chose for its products
    exact: bool = False  # the tree pass matched one-token steps bit for bit
    curve: CostCurve = field(default_factory=lambda: CostCurve(()))
    best_round: Choice | None = None  # its fastest round as priced at start-up
    error: str = ""  # why it could not be measured (load or kernel failure)

    def describe(self) -> str:
        if self.error:
            return f"{self.dtype}: {self.error}"
        if not self.exact:
            return f"{self.dtype} ({self.kernel}): not exact here, refused"
        text = f"{self.dtype} ({self.kernel}): one row {self.curve.ms(1):.0f} ms, 8 rows {self.curve.ms(8):.0f} ms"
        r = self.best_round
        if r is not None:
            text += f", best round {f'{r.width}x{r.depth}' if r.width else 'no speculation'} {r.tokens_per_s:.2f} tokens/s"
        return text


@dataclass
class PrecisionChoice:
    dtype: str
    candidates: list[Candidate]
    seconds: float = 0.0

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.dtype == self.dtype)

    def summary(self) -> str:
        """One line: what was chosen, and every candidate's figures (the why)."""
        others = "; ".join(c.describe() for c in self.candidates if c.dtype != self.dtype)
        return (f"{self.dtype}, the fastest exact round measured here ({self.chosen.describe()})"
                + (f"; over {others}" if others else ""))


def tree_matches_steps(model, vocab: int, seed: int = 0) -> bool:
    """Whether a tree pass gives every node the bits of stepping its path one token per forward."""
    rng = random.Random(seed)
    context = [rng.randrange(vocab) for _ in range(CHECK_CONTEXT)]
    steps = SessionKV("precision-steps")
    last = [tree_forward(model, steps, [token])[-1] for token in context][-1]
    tree = TokenTree(tokens=[rng.randrange(vocab) for _ in range(CHECK_NODES)],
                     parents=[rng.randint(-1, i - 1) for i in range(CHECK_NODES)])
    return not mismatched_nodes(model, tree, context, 1, (steps, last))


def measure(model, dtype: str, rows=CALIBRATION_ROWS, reps: int = 3) -> Candidate:
    """One candidate, made batch-invariant in place, checked and timed."""
    candidate = Candidate(dtype, kernel=make_batch_invariant(model))
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.inference_mode():
        candidate.exact = tree_matches_steps(model, vocab)
    if candidate.exact:
        candidate.curve = calibrate_forward(model, SessionStore(), rows, reps, CALIBRATION_CONTEXT)
    return candidate


def choose_precision(load: Callable[[str], object], dtypes=CANDIDATES, rows=CALIBRATION_ROWS,
                     reps: int = 3) -> tuple[object, PrecisionChoice]:
    """Load the model in each of ``dtypes`` (``load(dtype)``), measure each (:func:`measure`), and
    return the fastest exact one, made batch-invariant, with the choice. Raises RuntimeError when
    none is exact.

    At most two models are held at once: the fastest so far and the one being measured (a 1.5B
    target in float32, bfloat16 and int4 at once would take three times the memory it runs in).
    The ranking prices the draft at a share of the cheapest one-row pass among all candidates, so
    a later candidate can re-rank earlier ones; the winner is then loaded again and checked again."""
    start = time.perf_counter()
    kept: tuple[str, object] | None = None  # the fastest exact candidate so far, and its model
    candidates = []
    for dtype in dtypes:
        try:
            model = load(dtype)
        except ModelStoreError:
            raise  # no model at all: the service says so and stops
        except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a dtype this device cannot hold
            candidates.append(Candidate(dtype, error=f"could not load ({exc})"))
            continue
        candidate = measure(model, dtype, rows, reps)
        candidates.append(candidate)
        log.info("precision: %s", candidate.describe())
        if candidate.exact and (kept is None or _fastest(candidates) == dtype):
            kept = (dtype, model)  # the model kept before is let go
        del model
        gc.collect()
    if kept is None:
        raise RuntimeError("no exact path: " + "; ".join(c.describe() for c in candidates))
    best, rounds = fastest_curve({c.dtype: c.curve for c in candidates if c.exact})
    for c in candidates:
        c.best_round = rounds.get(c.dtype)
    chosen = kept[1]
    if kept[0] != best:
        log.info("precision: %s ranks first once every candidate is priced; loading it again", best)
        kept = chosen = None
        gc.collect()
        chosen = load(best)
        if not measure(chosen, best, rows[:1], 1).exact:
            raise RuntimeError(f"{best} passed the exactness check once and failed it when loaded again")
    return chosen, PrecisionChoice(best, candidates, time.perf_counter() - start)


def _fastest(candidates: list[Candidate]) -> str:
    return fastest_curve({c.dtype: c.curve for c in candidates if c.exact})[0]
