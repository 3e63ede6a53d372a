"""How big a round should be: what a forward costs, how much of a proposal the target accepts, and
the proposal with the most expected tokens per second.

- A :class:`CostCurve` maps the rows fed in one forward pass to its milliseconds, as a model
  service measured them at start-up on its own device and dtype (:func:`measure_curve`; the
  services report the curve in ``GetInfo``). On a CPU in float32 a 16-row pass costs about 2.5
  one-row passes; in bfloat16 or on a GPU the curve stays nearly flat: the same tree is a bargain
  on one device and a loss on another.
- :class:`AcceptanceStats` keeps, per draft and proposal width, the probability that position
  ``i`` of a draft's path is accepted given that positions ``1 .. i-1`` were (a Beta estimate with
  a prior, slowly forgetting old rounds so it follows the text).
- :func:`choose` weighs the two: for every shape allowed (``width`` paths per draft of ``depth``
  tokens; width 1 is a chain), the expected tokens of a round (accepted tokens plus the bonus
  token) over its cost (the drafts' ``depth`` forwards, then one verify pass over the bonus token
  plus every node), and no speculation at all (one verify row, one token). A chain is a tree of
  width 1, so a tree-mode choice is never predicted slower than a sequential one.

Under load the services batch the rounds of every generation in flight into shared passes
(``specdec.batching``). A round's shape is then priced for the whole batch (its :class:`Company`:
the other generations in flight), as if every generation in it took the same shape, which they do
when their acceptance is alike (the statistics are shared): the verify pass over every
generation's rows, each draft level over every generation's beams, against the tokens all of them
get. As the batch grows and a pass stops being bound by reading the weights, trees shrink, down to
no speculation; alone, nothing changes. (Pricing a shape for one generation against the others'
current choice would trap them: when none drafts, a lone draft pays a whole draft pass for one
token, so none starts, even where all drafting together is faster.)

Nothing here looks at a round's own draws: the shape comes from earlier rounds only, so sampled
generation stays distributed exactly as the target's (the acceptance rule is unchanged).
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)
CALIBRATION_CONTEXT = 64  # cached tokens the calibration's forwards attend to
# When a service reports no curve (calibration off, or an older service): a verify pass in units of
# a one-row pass, growing a little per row, and a draft forward at this share of it.
ASSUMED_ROW_SLOPE = 0.05
ASSUMED_DRAFT_SHARE = 0.3


@dataclass(frozen=True)
class CostCurve:
    """Milliseconds of one forward by rows fed: ``points`` are (rows, ms), rows ascending."""

    points: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, pairs) -> CostCurve:
        return cls(tuple(sorted((int(r), float(ms)) for r, ms in pairs)))

    def __bool__(self) -> bool:
        return bool(self.points)

    def ms(self, rows: int) -> float:
        """Interpolated between measured row counts; below the first, its cost; past the last, the
        last segment's slope continued (never falling)."""
        pts = self.points
        if rows <= pts[0][0] or len(pts) == 1:
            return pts[0][1] if rows <= pts[0][0] else pts[0][1] * rows / pts[0][0]
        for (r0, m0), (r1, m1) in zip(pts, pts[1:]):
            if rows <= r1:
                return m0 + (m1 - m0) * (rows - r0) / (r1 - r0)
        (r0, m0), (r1, m1) = pts[-2], pts[-1]
        return m1 + max(0.0, (m1 - m0) / (r1 - r0)) * (rows - r1)


def measure_curve(forward: Callable[[int], None], rows=CALIBRATION_ROWS, reps: int = 3) -> CostCurve:
    """Time ``forward(n)`` (one forward pass of ``n`` rows) for each row count: one untimed run to
    warm it, then the fastest of ``reps`` (interference only ever adds time), never below the cost
    of fewer rows (a pass over more rows does all the work of one over fewer: a dip is noise, and
    the chooser would take it for a bargain)."""
    points, floor = [], 0.0
    for n in sorted(rows):
        forward(n)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            forward(n)
            times.append((time.perf_counter() - start) * 1e3)
        floor = max(floor, min(times))
        points.append((n, floor))
    return CostCurve.of(points)


class Corrections:
    """What rounds really cost against what the curves predicted: per curve and row count (or draft
    width), a running mean of measured / predicted, with old rounds fading. A service calibrates
    while its neighbours load or calibrate too, and a round pays for calls and merging the curve
    never saw; the ratios fix both as rounds come. A shape never run borrows the ratio of the
    nearest row count that was. Safe to share between threads."""

    def __init__(self, weight: float = 0.2, clamp: tuple[float, float] = (0.25, 4.0)) -> None:
        self.weight, self.clamp = weight, clamp
        self._ratios: dict[str, dict[int, float]] = {}
        self._lock = threading.Lock()

    def observe(self, key: str, rows: int, predicted_ms: float, measured_ms: float) -> None:
        if predicted_ms <= 0 or measured_ms <= 0:
            return
        ratio = min(max(measured_ms / predicted_ms, self.clamp[0]), self.clamp[1])
        with self._lock:
            ratios = self._ratios.setdefault(key, {})
            old = ratios.get(rows)
            ratios[rows] = ratio if old is None else old + self.weight * (ratio - old)

    def factor(self, key: str, rows: int) -> float:
        with self._lock:
            ratios = self._ratios.get(key)
            if not ratios:
                return 1.0
            return ratios[min(ratios, key=lambda r: (abs(r - rows), r))]


class Link:
    """What a service's calls cost outside its model: the network both ways and the RPC's own work,
    measured per call as the caller's time less what the service reports it spent queued and in
    its passes; a running mean, old calls fading. A far verify service shows here, and a round
    pays it once whatever its shape, so it earns deeper rounds (and rounds sent ahead:
    :func:`ahead_pays`). Safe to share between threads (one float, replaced whole)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.ms = 0.0
        self.calls = 0

    def observe(self, call_ms: float, service_ms: float) -> None:
        sample = max(0.0, call_ms - service_ms)
        self.ms = sample if not self.calls else self.ms + self.weight * (sample - self.ms)
        self.calls += 1


@dataclass
class RoundCosts:
    """The curves a round is priced with: the verify service's, and each draft's by name, each times
    what rounds have shown it really costs (:class:`Corrections`, from :meth:`observe`). A draft
    without a curve is priced at ``ASSUMED_DRAFT_SHARE`` of a one-row verify pass per forward; with
    no verify curve every price is in units of a one-row verify pass."""

    verify: CostCurve = field(default_factory=lambda: CostCurve(()))
    drafts: dict[str, CostCurve] = field(default_factory=dict)
    overhead_ms: float = 0.0  # per round: merging, accepting
    corrections: Corrections = field(default_factory=Corrections)
    link: Link = field(default_factory=Link)  # the verify calls' time outside the service (the verify client's)
    # Whether a draft service runs on the verify service's host and device (their GetInfo says):
    # work side by side there is priced by side_by_side_prior until it is measured (Contention).
    shared_device: bool = False

    def round_ms(self, rows: int) -> float:
        """A round's fixed and verify costs: its verify pass over ``rows`` rows, the link (milliseconds:
        only beside a measured curve), the overhead."""
        return self.verify_ms(rows) + (self.link.ms if self.verify else 0.0) + self.overhead_ms

    def verify_ms(self, rows: int, corrected: bool = True) -> float:
        if self.verify:
            return self.verify.ms(rows) * (self.corrections.factor("verify", rows) if corrected else 1.0)
        return 1.0 + ASSUMED_ROW_SLOPE * (rows - 1)

    def draft_ms(self, draft: str, width: int, depth: int, corrected: bool = True, batch: int = 1,
                 context_rows: int = 1) -> float:
        """Beam search ``depth`` deep: a forward over the new context token (``context_rows``: the
        context tokens it reads first, more than one where the draft catches up on a context it has
        not seen), then ``depth - 1`` over ``width`` rows, for each of ``batch`` generations drafting
        together."""
        curve = self.drafts.get(draft) if self.verify else None
        if not curve:
            return (depth + context_rows - 1) * ASSUMED_DRAFT_SHARE * self.verify_ms(1)
        factor = self.corrections.factor(draft, width * batch) if corrected else 1.0
        return (curve.ms(batch + context_rows - 1) + (depth - 1) * curve.ms(width * batch)) * factor

    def observe(self, verify_rows: int, verify_ms: float, drafts: dict[str, tuple[int, ...]] | None = None,
                draft_ms: float = 0.0) -> None:
        """A round's measured times, alone: its verify call over ``verify_rows`` rows, and its drafting
        (``drafts``: each draft's (width, depth) or (width, depth, context rows it read first: a draft
        that caught up on the context is priced with that, so the catch-up never reads as a slow
        draft); they run side by side, so the slowest is charged)."""
        if not self.verify:
            return
        # The link is priced apart (:class:`Link`): the curve's correction is for the pass alone.
        self.corrections.observe("verify", verify_rows, self.verify_ms(verify_rows, corrected=False),
                                 verify_ms - self.link.ms)
        if drafts:
            shapes = {name: (shape + (1,))[:3] for name, shape in drafts.items()}
            name, (width, depth, rows) = max(shapes.items(),
                                             key=lambda kv: self.draft_ms(kv[0], kv[1][0], kv[1][1], context_rows=kv[1][2]))
            if self.drafts.get(name):
                self.corrections.observe(name, width, self.draft_ms(name, width, depth, corrected=False, context_rows=rows),
                                         draft_ms)


@dataclass(frozen=True)
class Company:
    """The other generations in flight, whose rounds share the services' passes with a round's."""

    sessions: int = 0

    @property
    def batch(self) -> int:
        """Generations in each pass, the round's own included."""
        return 1 + self.sessions


class Traffic:
    """The generations in flight: the :class:`Company` any one of them keeps. Safe to share between threads."""

    def __init__(self) -> None:
        self._generations: set[str] = set()
        self._lock = threading.Lock()

    def join(self, generation: str) -> None:
        with self._lock:
            self._generations.add(generation)

    def leave(self, generation: str) -> None:
        with self._lock:
            self._generations.discard(generation)

    def company(self, generation: str) -> Company:
        with self._lock:
            return Company(len(self._generations - {generation}))

    def __len__(self) -> int:
        with self._lock:
            return len(self._generations)


#: Judged draft positions (decayed) before a draft's confidence is trusted to stop its beams early.
CONFIDENCE_MIN_POSITIONS = 16
#: Bins of the draft's probability of a token, by which its acceptance is counted.
CONFIDENCE_BINS = 10


@dataclass(frozen=True)
class EarlyStop:
    """When a greedy draft stops growing its beams (``DraftBeamsRequest``): once the best beam's
    calibrated probability is below ``min_path_probability``; a token the draft gave probability
    ``p`` counts as ``calibration[floor(p * len(calibration))]`` (:func:`calibrated`). The default
    never stops."""

    min_path_probability: float = 0.0
    calibration: tuple[float, ...] = ()


def calibrated(p: float, calibration) -> float:
    """How likely the target is to accept a draft token the draft gave probability ``p``."""
    if not calibration:
        return p
    return calibration[min(int(p * len(calibration)), len(calibration) - 1)]


class AcceptanceStats:
    """Per draft and width, for each path position ``i`` (1-based): P(position i accepted | i - 1 were).

    Each estimate is a Beta posterior with ``prior_weight`` pseudo-rounds at a prior mean: for the
    first position of a chain ``prior_mean``; for a later position, the estimate of the one before
    (positions deep in a path are seen rarely, and acceptance changes slowly with depth); for the
    first position at a width above one, the chain's estimate as if its paths were ``sqrt(width)``
    independent tries (``1 - (1 - a) ** sqrt(width)``: beams overlap) until rounds of that width say
    otherwise. Every observation
    first discounts the old ones by ``decay``, so the estimates follow the text being written.
    Safe to share between threads.
    """

    def __init__(self, prior_mean: float = 0.8, prior_weight: float = 1.0, decay: float = 0.98) -> None:
        self.prior_mean, self.prior_weight, self.decay = prior_mean, prior_weight, decay
        self._cells: dict[tuple[str, int], list[list[float]]] = {}  # (draft, width) -> [position][hits, trials]
        self._confidence: dict[str, list[list[float]]] = {}  # draft -> [bin of its probability][accepted, judged], decayed
        self._lock = threading.Lock()

    def copy(self) -> AcceptanceStats:
        with self._lock:
            other = copy.copy(self)
            other._cells = copy.deepcopy(self._cells)
            other._confidence = copy.deepcopy(self._confidence)
            other._lock = threading.Lock()
        return other

    def seeded(self, rounds: float) -> AcceptanceStats:
        """A copy whose every estimate weighs at most ``rounds`` rounds: what a new generation starts
        from. The estimates shared by every generation remember some 50 rounds of other texts (a
        chat answer before a code completion); a generation's own rounds should outweigh them after
        a few rounds, since acceptance follows the text being written."""
        other = self.copy()
        for cells in [*other._cells.values(), *other._confidence.values()]:
            for cell in cells:
                if cell[1] > rounds:
                    cell[0], cell[1] = cell[0] * rounds / cell[1], rounds
        return other

    def rates(self, draft: str, width: int, depth: int) -> list[float]:
        """[depth] the conditional acceptance of positions 1 .. depth."""
        chain = self._rates(draft, 1, self._chain_priors(draft, depth))
        if width == 1:
            return chain
        return self._rates(draft, width, [1 - (1 - chain[0]) ** width**0.5] + [None] * (depth - 1))

    def _chain_priors(self, draft: str, depth: int) -> list[float | None]:
        """A chain's priors: ``prior_mean`` at position 1, or what the most-run wider proposals imply
        (their first position held as ``sqrt(width)`` tries of a chain's, inverted; deeper positions,
        conditional on the ones before, as they were seen), so that rounds of one width price the
        other widths too: a policy that runs trees still learns what a long chain would give."""
        with self._lock:
            wider = [(cells, w) for (d, w), cells in self._cells.items() if d == draft and w > 1 and cells]
        if not wider:
            return [self.prior_mean] + [None] * (depth - 1)
        cells, w = max(wider, key=lambda item: item[0][0][1])
        seen = self._rates(draft, w, [self.prior_mean] + [None] * (len(cells) - 1))
        first = 1 - (1 - seen[0]) ** (1 / w**0.5)
        return [first] + [seen[i] if i < len(cells) else None for i in range(1, depth)]

    def _rates(self, draft: str, width: int, priors: list[float | None]) -> list[float]:
        with self._lock:
            cells = self._cells.get((draft, width), [])
            out = []
            for i, prior in enumerate(priors):
                prior = out[-1] if prior is None else prior
                hits, trials = cells[i] if i < len(cells) else (0.0, 0.0)
                out.append((hits + prior * self.prior_weight) / (trials + self.prior_weight))
            return out

    def record(self, draft: str, width: int, drafted: int, accepted: int, cut: bool = False) -> None:
        """A round where the draft's longest path had ``drafted`` tokens and ``accepted`` of them were
        accepted. ``cut``: the output ended inside the round (a stop, the budget), so what came after
        the accepted tokens was never judged."""
        if drafted <= 0:
            return
        judged = accepted if cut else min(drafted, accepted + 1)
        with self._lock:
            cells = self._cells.setdefault((draft, width), [])
            while len(cells) < judged:
                cells.append([0.0, 0.0])
            for i in range(judged):
                cells[i][0] = cells[i][0] * self.decay + (1.0 if i < accepted else 0.0)
                cells[i][1] = cells[i][1] * self.decay + 1.0

    def record_confidence(self, draft: str, probabilities: list[float], accepted: int, judged: int) -> None:
        """A draft path's first ``judged`` tokens were judged by the target and the first ``accepted``
        of them accepted; ``probabilities`` are the draft's own for each token."""
        with self._lock:
            bins = self._confidence.setdefault(draft, [[0.0, 0.0] for _ in range(CONFIDENCE_BINS)])
            for cell in bins:
                cell[0] *= self.decay
                cell[1] *= self.decay
            for i, p in enumerate(probabilities[:judged]):
                cell = bins[min(int(p * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)]
                cell[0] += 1.0 if i < accepted else 0.0
                cell[1] += 1.0

    def confidence_calibration(self, draft: str) -> tuple[float, ...] | None:
        """Per bin of the draft's probability of a token, how often the target accepted such tokens
        (a histogram calibration; a bin seldom seen leans on the draft's overall rate). None until
        ``CONFIDENCE_MIN_POSITIONS`` tokens have been judged: a draft's confidence is trusted only
        once measured (a small draft can be right far more often than it is sure, or less)."""
        with self._lock:
            bins = [list(cell) for cell in self._confidence.get(draft, ())]
        judged = sum(n for _, n in bins)
        if judged < CONFIDENCE_MIN_POSITIONS:
            return None
        overall = sum(a for a, _ in bins) / judged
        return tuple((a + overall * self.prior_weight) / (n + self.prior_weight) for a, n in bins)


def stop_below(costs: RoundCosts, stats: AcceptanceStats, draft: str, choice: Choice) -> EarlyStop:
    """When ``draft`` should stop growing this round's beams (greedy drafts).

    One more level costs a draft forward over the round's beams and ``width`` more verify rows; it
    can add at most the probability that the path so far is accepted (the draft's calibrated
    probability of it: :meth:`AcceptanceStats.confidence_calibration`), worth the round's milliseconds per token. Once even
    that does not pay, deeper levels do not either. Within the round's chosen shape this lets a
    path's depth follow the draft's confidence token by token (as EAGLE-2's dynamic trees and
    transformers' assistant_confidence_threshold do), at a threshold that comes from measured costs
    and acceptance, not a constant. Never stops for a round without speculation, a single level,
    or a draft whose confidence has not been measured yet."""
    calibration = stats.confidence_calibration(draft)
    if calibration is None or choice.width <= 0 or choice.depth <= 1 or choice.expected_tokens <= 0 or choice.cost_ms <= 0:
        return EarlyStop()
    batch = choice.company.batch
    # A level's own price, from the measured curves as they are: the corrections (measured over
    # predicted round times) also carry what a call costs whatever its depth (the call, feeding the
    # accepted tokens), and charging that to each level would make a draft that stops early look
    # dearer per level, and so stop earlier still.
    level_ms = (costs.draft_ms(draft, choice.width, 2, corrected=False, batch=batch)
                - costs.draft_ms(draft, choice.width, 1, corrected=False, batch=batch))
    rows = batch * choice.verify_rows
    level_ms += costs.verify_ms(rows + batch * choice.width, corrected=False) - costs.verify_ms(rows, corrected=False)
    return EarlyStop(min(max(level_ms * choice.expected_tokens / choice.cost_ms, 0.0), 1.0), calibration)


@dataclass(frozen=True)
class Choice:
    """A round's proposal shape and what it is expected to give."""

    width: int  # paths per model draft (1: a chain); 0: no model draft runs
    depth: int  # tokens per path
    nodes: int  # the merged tree's node cap
    expected_tokens: float  # accepted tokens plus the bonus token
    cost_ms: float  # drafting, then verifying (units of a one-row verify pass when no curve is known)
    company: Company = Company()  # the other generations sharing the round's passes (cost_ms is the batch's)
    known: tuple[tuple[str, int], ...] = ()  # (draft, tokens taken) of proposals in hand before the round (prompt lookup)

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of one generation (the batch's, over the generations in it)."""
        return self.expected_tokens / self.cost_ms * 1e3 if self.cost_ms > 0 else float("inf")

    @property
    def verify_rows(self) -> int:
        return 1 + self.nodes

    @property
    def speculates(self) -> bool:
        """Whether the round verifies any draft token (a model draft's or one in hand)."""
        return self.width > 0 or bool(self.known)

    def taken(self, draft: str) -> int:
        """Tokens of the in-hand proposal of ``draft`` the round verifies (0: none)."""
        return dict(self.known).get(draft, 0)


def expected_tokens(rates_by_draft: list[list[float]]) -> float:
    """Accepted tokens plus the bonus token, when each draft's paths hold position ``i`` with the given
    conditional rates (drafts taken as independent: a position is lost when every draft misses it;
    a draft whose paths are shorter misses every position past them)."""
    total, reach = 1.0, 1.0
    for per_draft in itertools.zip_longest(*rates_by_draft, fillvalue=0.0):
        miss = 1.0
        for rate in per_draft:
            miss *= 1.0 - rate
        reach *= 1.0 - miss
        total += reach
    return total


def price(costs: RoundCosts, stats: AcceptanceStats, drafts: list[str], width: int, depth: int, max_nodes: int,
          company: Company = Company(), known: tuple[tuple[str, int], ...] = ()) -> Choice:
    """One shape's expected tokens and cost, every generation of the batch (``company`` and this
    one) taking it; width or depth 0 prices a round without a model draft. ``known``: proposals
    already in hand (draft, tokens taken from its one chain), which cost verify rows only."""
    model = [(d, stats.rates(d, width, depth)) for d in drafts] if width > 0 and depth > 0 else []
    return _price(costs, model, width, depth, [(d, stats.rates(d, 1, n)) for d, n in known], max_nodes, company)


def _price(costs: RoundCosts, model: list[tuple[str, list[float]]], width: int, depth: int,
           known: list[tuple[str, list[float]]], max_nodes: int, company: Company) -> Choice:
    """:func:`price` from each draft's conditional acceptance rates (``model``: of the model drafts,
    ``depth`` long; ``known``: of the proposals in hand, as long as taken)."""
    batch = company.batch
    known = [(d, rates) for d, rates in known if rates]
    if not model and not known:
        return Choice(0, 0, 0, 1.0, costs.round_ms(batch), company)
    nodes = min(width * depth * len(model) + sum(len(rates) for _, rates in known), max_nodes)
    tokens = expected_tokens([rates for _, rates in model + known])
    # Drafts run side by side: the slowest model draft is charged; a proposal in hand costs nothing more.
    draft_ms = max((costs.draft_ms(d, width, depth, batch=batch) for d, _ in model), default=0.0)
    return Choice(width if model else 0, depth if model else 0, nodes, tokens,
                  draft_ms + costs.round_ms(batch * (1 + nodes)), company,
                  tuple((d, len(rates)) for d, rates in known))


def choose(costs: RoundCosts, stats: AcceptanceStats, drafts: list[str], max_width: int, max_depth: int,
           max_nodes: int, company: Company = Company(), known: tuple[tuple[str, int], ...] = ()) -> Choice:
    """The shape with the most expected tokens per second among no speculation and every ``width`` ×
    ``depth`` within the bounds (the smaller shape on a tie), for the batch it shares with ``company``.

    ``known``: proposals in hand before the round (draft, the length of its one chain); for each
    model shape (none included) every cut of it is priced too, so a long lookup match can be
    verified alone, without waiting for a model draft, or beside a shallower one."""
    # Rates are conditional per position, so a shorter path's are a prefix of a longer one's.
    known_rates = [(d, stats.rates(d, 1, n)) for d, n in known if n > 0]
    known_cuts = list(itertools.product(*(range(len(rates) + 1) for _, rates in known_rates)))

    def best_with(model: list[tuple[str, list[float]]], width: int, depth: int, best: Choice | None) -> Choice | None:
        for cut in known_cuts:
            candidate = _price(costs, model, width, depth, [(d, rates[:n]) for (d, rates), n in zip(known_rates, cut)],
                               max_nodes, company)
            if best is None or candidate.tokens_per_s > best.tokens_per_s * (1 + 1e-9):
                best = candidate
        return best

    best = best_with([], 0, 0, None)
    for width in range(1, max_width + 1):
        if width * len(drafts) > max_nodes or not drafts:
            break  # a tree this wide does not fit even one level
        full = {d: stats.rates(d, width, max_depth) for d in drafts}
        for depth in range(1, max_depth + 1):
            if width > 1 and width * depth * len(drafts) > max_nodes:
                break  # the node cap would cut its paths: priced as whole, it would look better than it is
            best = best_with([(d, full[d][:depth]) for d in drafts], width, depth, best)
    return best


def ahead_pays(hit: float, tokens: float, draft_ms: float, link_ms: float, verify_ms: float,
               contention: float = 1.0, beside: float = 1.0, verifying_beside: float = 1.0) -> bool:
    """Whether to send a generation's next round before the verdict on the one in flight, built on
    the path that one accepts whole with probability ``hit`` (:meth:`SpeculationPolicy.assumed`):
    whether the expected tokens per second beat those of rounds one after the other, each
    ``draft_ms + link_ms + verify_ms`` for ``tokens`` tokens.

    - A round sent ahead on a path that held finds the verify service as it finishes the round
      before: two rounds in flight, each takes the larger of the pass and half a round, plus what
      drafting it beside the round before costs more than alone (``beside``: the measured ratio of
      drafting ahead, 1 where the drafts have a device of their own or the link hides the drafting).
      Its first position re-checks the token the round before ended on, so it adds one token fewer.
      The pass it waits for runs beside its drafting, that much slower (``verifying_beside``: the
      measured ratio, 1 on devices of their own; on two shared CPU cores the two halve each other).
    - One on a rejected path is dropped; the next round starts over, later by what the wasted pass
      still holds the verify service for, and by how much slower drafting is while that pass runs
      (``contention``: :class:`Contention`; 1 where the drafts have a device of their own)."""
    if link_ms <= 0 or tokens <= hit:
        return False
    alone = draft_ms + link_ms + verify_ms
    held = max(verify_ms * verifying_beside, alone / 2) + draft_ms * max(0.0, beside - 1.0)
    late = max(0.0, verify_ms - link_ms - draft_ms) + draft_ms * max(0.0, contention - 1.0)
    return (tokens - hit) / (hit * held + (1 - hit) * (alone + late)) > tokens / alone


#: What work side by side on one device is priced at before it has been measured: two processes
#: that each keep all of a device's processors busy get about half of them each while both run, so
#: each takes about twice as long. Only a prior (the first measurement replaces it), and only where
#: the services say they share a host and device; elsewhere the prior is 1.
SHARED_SLOWDOWN = 2.0


def side_by_side_prior(shared: bool, draft_ms: float, verify_ms: float, link_ms: float = 0.0) -> tuple[float, float]:
    """Before anything was measured, how much slower (drafting beside a pass, the pass beside that
    drafting) run than alone: on a shared device, ``SHARED_SLOWDOWN`` for the time they overlap.
    A round drafted ahead starts as the round before is sent; that round's pass starts half a
    link's round trip later, so only drafting that outlasts the way there meets the pass. (1, 1)
    on devices of their own."""
    if not shared or draft_ms <= 0 or verify_ms <= 0:
        return 1.0, 1.0
    overlap = max(0.0, min(draft_ms - link_ms / 2, verify_ms))
    return 1 + (SHARED_SLOWDOWN - 1) * overlap / draft_ms, 1 + (SHARED_SLOWDOWN - 1) * overlap / verify_ms


def shares_device(target_host: str, target_device: str, drafts: list[tuple[str, str]]) -> bool:
    """Whether any draft, given as (host, device) from its GetInfo, runs on the verify service's own
    host and device (an empty host, from a service that does not say, shares nothing)."""
    return bool(target_host) and any(host == target_host and device == target_device for host, device in drafts)


class Contention:
    """How much slower the drafts run while the verify service works on a pass of the same
    generation than their curves say they do alone (a round drafted ahead, beside the pass of the
    round before; a round drafted right after a round sent ahead was dropped, beside its wasted
    pass), or a verify pass while the drafts work beside it. About 1 where drafts and verify
    service have devices of their own, or where the link's delay comes before the pass; up to 2
    and more where they share two CPU cores. A running mean of the ratio; safe to share between
    threads."""

    def __init__(self, weight: float = 0.3) -> None:
        self.weight, self.ratio, self.seen = weight, 1.0, 0

    def or_prior(self, prior: float) -> float:
        """The measured ratio, or ``prior`` until there is one (:func:`side_by_side_prior`)."""
        return self.ratio if self.seen else prior

    def observe(self, overlapped_ms: float, alone_ms: float) -> None:
        if alone_ms <= 0 or overlapped_ms <= 0:
            return
        ratio = max(1.0, overlapped_ms / alone_ms)
        self.ratio = ratio if not self.seen else self.ratio + self.weight * (ratio - self.ratio)
        self.seen += 1


def prompt_first(costs: RoundCosts, drafts: list[str], prompt_rows: int, speculate: Choice, alone: Choice,
                 beside: float = 1.0) -> bool:
    """Whether a generation's first round should leave the model drafts out (``alone``: the target
    reads the prompt and verifies only proposals in hand) while the drafts read the prompt at the
    same time, rather than draft then verify one after the other (``speculate``).

    In the first round each model reads the whole prompt: ``prompt_rows`` more rows through the
    draft (before its proposal) and then through the target. Side by side the round costs the
    slower of the two, and while both run each is ``beside`` times slower (the measured
    :class:`Contention`: 1 on devices of their own; on two shared CPU cores about 2, where side by
    side is no faster than one after the other); the tokens the drafts would have proposed come in
    the next rounds instead, at ``speculate``'s rate."""
    if not speculate.width or not drafts or not costs.verify:
        return False
    rows = prompt_rows - 1  # the context's last token is a row of every round anyway
    reading = max(costs.draft_ms(d, 1, 1, batch=rows) - costs.draft_ms(d, 1, 1) for d in drafts)
    verify_reading = costs.verify_ms(rows + speculate.verify_rows) - costs.verify_ms(speculate.verify_rows)
    serial_ms = speculate.cost_ms + reading + verify_reading
    target_ms = alone.cost_ms + costs.verify_ms(rows + alone.verify_rows) - costs.verify_ms(alone.verify_rows)
    side_by_side_ms = max(reading, target_ms) + min(reading, target_ms) * max(0.0, beside - 1.0)
    later_ms = max(speculate.expected_tokens - alone.expected_tokens, 0.0) / speculate.tokens_per_s * 1e3
    return side_by_side_ms + later_ms < serial_ms


# --------------------------------------------------------------------------- choosing a precision
# A verify service with ``--dtype auto`` measures each exact path it can run (specdec.precision) and
# keeps the one whose *round* is fastest, not the one with the cheapest single row: on a CPU whose
# bfloat16 product costs in proportion to rows, a cheaper one-row step still loses to a flat
# float32 curve once a round verifies a few nodes.

#: What a round is priced with before any draft or text has been seen: the draft's forward at this
#: share of the fastest candidate's one-row pass (the same milliseconds for every candidate: the
#: draft's cost does not depend on the target's precision), accepted at the prior rate, shaped
#: within these bounds.
SELECTION_DRAFT_SHARE = ASSUMED_DRAFT_SHARE
SELECTION_ACCEPTANCE = 0.8
SELECTION_SHAPE = (2, 6, 64)  # width, depth, nodes at most


def best_round(verify: CostCurve, draft_ms: float, acceptance: float = SELECTION_ACCEPTANCE,
               shape: tuple[int, int, int] = SELECTION_SHAPE) -> Choice:
    """The best round :func:`choose` finds on ``verify`` with one draft costing ``draft_ms`` a forward
    (whatever its rows) whose paths are accepted at ``acceptance`` each position."""
    costs = RoundCosts(verify=verify, drafts={"draft": CostCurve.of([(1, draft_ms)])})
    return choose(costs, AcceptanceStats(prior_mean=acceptance), ["draft"], *shape)


def fastest_curve(curves: dict[str, CostCurve], draft_ms: float | None = None) -> tuple[str, dict[str, Choice]]:
    """The candidate (by name) whose best round gives the most tokens per second, and every
    candidate's best round. ``draft_ms``: the draft's forward, by default
    ``SELECTION_DRAFT_SHARE`` of the cheapest one-row pass among the candidates. Ties go to the
    first named."""
    if not curves:
        raise ValueError("no candidate to choose from")
    if draft_ms is None:
        draft_ms = SELECTION_DRAFT_SHARE * min(curve.ms(1) for curve in curves.values())
    rounds = {name: best_round(curve, draft_ms) for name, curve in curves.items()}
    best = max(rounds, key=lambda name: (rounds[name].tokens_per_s, -list(rounds).index(name)))
    return best, rounds
