"""One round of speculative decoding as small pure functions: merge the drafts' proposals into one
token tree, then accept what the target's verdict on that tree allows.

A round, and the words used for it (as in vLLM's spec-decode docs; see Leviathan et al.,
arXiv:2211.17192, and SpecInfer, arXiv:2305.09781, for trees):

- each draft makes a :class:`Proposal`: paths of *draft tokens* after the context (beam search, best
  first; when sampling, beams ranked under the target's noise: :mod:`specdec.sampling`);
- :func:`merge` joins every draft's paths into one de-duplicated :class:`DraftTree`, the tree the
  target verifies in one forward pass;
- :func:`accept` walks the tree with the target's answer and gives the :class:`Verdict`. The
  *accepted* tokens are the longest drafted path the target agrees with: each is the target's own
  token there (greedy: its argmax; sampled: its draw under the position's noise, a fixed function
  of the path, so sampled acceptance is the same token match). The *bonus token* is the target's
  own token after them, always kept, so a round yields at least one token. The bonus is a
  *correction* when some draft had proposed a token at that position and the target took another;
  otherwise it is a free extra token past the end of every proposal.

How wide and deep the next proposal should be is :class:`SpeculationPolicy`'s to say (from the
costs and acceptance statistics of ``specdec.cost``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.cost import AcceptanceStats, Choice, Company, EarlyStop, RoundCosts, choose, price, prompt_first, stop_below
from specdec.tree import TokenTree, TokenTrie, greedy_accept


@dataclass
class Proposal:
    """What one draft proposed in a round."""

    draft: str  # the draft's name (draft-0, draft-1, ...)
    paths: list[list[int]]  # [paths][<= depth] draft tokens, best first
    confidences: list[list[float]] | None = None  # model drafts: [paths][<= depth] the draft's probability of each token
    stats_key: str = ""  # what its acceptance is counted under, when not its draft's name (the lookup's, by match length)
    context_rows: int = 1  # context tokens the draft read before drafting (more than one: it caught up)

    def cut(self, depth: int) -> Proposal | None:
        """The non-empty paths, each cut to ``depth`` tokens; None when none is left."""
        keep = [i for i, path in enumerate(self.paths) if path]
        if not keep:
            return None
        return Proposal(
            self.draft,
            [self.paths[i][:depth] for i in keep],
            [self.confidences[i][:depth] for i in keep] if self.confidences is not None else None,
            self.stats_key,
            self.context_rows,
        )

    @property
    def depth(self) -> int:
        """Its longest path: the most tokens the round could accept from it."""
        return max(map(len, self.paths), default=0)


@dataclass
class DraftTree:
    """A round's proposals merged: the tree the target verifies."""

    tree: TokenTree
    drafts: list[str]  # names of the drafts that proposed; ``tree.sources`` holds indices into it


def merge(proposals: list[Proposal], max_nodes: int, vocab_size: int) -> DraftTree:
    """One trie of every draft's paths, capped at ``max_nodes``.

    Each draft's best path goes in first, then every draft's second, and so on: a node cap trims the
    least likely branches, never a draft's best guess before others' runner-ups. A draft with a
    larger vocabulary than the target's may propose tokens the target cannot take; a path is cut
    there. Sampled or greedy, the tree is the same kind: the target answers one token per place.
    """
    trie = TokenTrie(max_nodes)
    for rank in range(max((len(p.paths) for p in proposals), default=0)):
        for source, proposal in enumerate(proposals):
            if rank >= len(proposal.paths):
                continue
            path = proposal.paths[rank]
            valid = next((i for i, token in enumerate(path) if not 0 <= token < vocab_size), len(path))
            trie.insert(path[:valid], source)
    return DraftTree(trie.tree, [p.draft for p in proposals])


@dataclass
class Verdict:
    """What the target made of a round's tree (the words are defined in the module docstring)."""

    merged: DraftTree = field(repr=False)
    accepted_nodes: list[int]  # [accepted_len] tree nodes, root first
    bonus_token: int | None  # None when the round's output was cut before it (a stop, the budget)

    @property
    def accepted(self) -> list[int]:
        """[accepted_len] the accepted draft tokens."""
        return [self.merged.tree.tokens[node] for node in self.accepted_nodes]

    @property
    def tokens(self) -> list[int]:
        """What the round adds to the output: the accepted tokens, then the bonus token."""
        return self.accepted + ([self.bonus_token] if self.bonus_token is not None else [])

    @property
    def places(self) -> list[int]:
        """Where the target decided each of :attr:`tokens`: 0 at the context end, ``node + 1`` after
        a node (the index into the verify service's ``n + 1`` answers)."""
        return [0, *(node + 1 for node in self.accepted_nodes)][: len(self.tokens)]

    @property
    def correction(self) -> bool:
        """Whether the bonus token replaced a draft's proposal (some draft proposed a token at its position)."""
        at = self.accepted_nodes[-1] if self.accepted_nodes else -1
        return self.bonus_token is not None and at in self.merged.tree.parents

    @property
    def winning_draft(self) -> str:
        """The draft whose path was accepted (the first, when several proposed it); "" when none was."""
        if not self.accepted_nodes:
            return ""
        sources = self.merged.tree.sources[self.accepted_nodes[-1]]
        return self.merged.drafts[min(sources)] if sources else ""

    @property
    def accepted_by_draft(self) -> dict[str, int]:
        """How many of the accepted tokens each draft had proposed (the trie credits shared prefixes to all)."""
        sources = self.merged.tree.sources
        return {
            name: sum(1 for node in self.accepted_nodes if index in sources[node])
            for index, name in enumerate(self.merged.drafts)
        }

    def after(self, n_tokens: int) -> Verdict:
        """The verdict less its first ``n_tokens`` output tokens: what a round sent ahead adds when
        the round before already gave those (its tree was drafted after a prefix of them)."""
        if n_tokens <= 0:
            return self
        return Verdict(self.merged, self.accepted_nodes[n_tokens:],
                       self.bonus_token if n_tokens <= len(self.accepted_nodes) else None)

    def cut(self, n_tokens: int) -> Verdict:
        """The verdict on the first ``n_tokens`` output tokens only: a stop inside the accepted path
        cuts it, and the round accepted only what reached the output."""
        if n_tokens > len(self.accepted_nodes):
            return self
        return Verdict(self.merged, self.accepted_nodes[:n_tokens], None)


def accept(merged: DraftTree, target: list[int]) -> Verdict:
    """The accepted path and the bonus token. ``target`` is the verify service's answer, the target's
    token at the context end and after every node (``[nodes + 1]``; greedy or sampled alike)."""
    nodes, bonus = greedy_accept(merged.tree, target)
    return Verdict(merged, nodes, bonus)


class SpeculationPolicy:
    """The shape of each round's proposal in one generation: how many paths each draft proposes, how
    deep, and the merged tree's node cap.

    Fixed (``adaptive`` false): always the request's ``max_width`` × ``max_depth`` within
    ``max_nodes``. Adaptive: before each round, :func:`specdec.cost.choose` picks, within those
    bounds, the shape with the most expected tokens per second from the service's cost curves
    (``costs``) and the acceptance seen so far (``stats``, updated after every round by
    :meth:`update`); when no speculation is chosen, every ``probe_every`` rounds a one-token chain
    is tried anyway, so that acceptance can be seen to have come back.
    """

    def __init__(self, drafts: list[str], max_width: int, max_depth: int, max_nodes: int, adaptive: bool = True,
                 costs: RoundCosts | None = None, stats: AcceptanceStats | None = None, probe_every: int = 8,
                 shared: AcceptanceStats | None = None) -> None:
        self.drafts, self.max_width, self.max_depth, self.max_nodes = drafts, max_width, max_depth, max_nodes
        self.adaptive, self.probe_every = adaptive, probe_every
        self.costs = costs or RoundCosts()
        self.stats = stats if stats is not None else AcceptanceStats()
        # The estimates every generation shares, which this one's rounds also feed (``stats`` is then
        # this generation's own, seeded from them: AcceptanceStats.seeded).
        self.shared = shared
        self._quiet_rounds = 0  # rounds in a row chosen without speculation

    def next(self, room: int, company: Company = Company(), known: tuple[tuple[str, int], ...] = ()) -> Choice:
        """This round's shape, its depth within ``room`` (what the budget and context leave to draft),
        its passes shared with ``company`` (the other generations in flight). ``known``: proposals
        already in hand (draft, length of its one chain), of which the round takes a prefix (fixed
        shapes: all of it, within ``room``)."""
        known = tuple((d, min(n, room)) for d, n in known if min(n, room) > 0)
        if not self.adaptive:
            return price(self.costs, self.stats, self.drafts, self.max_width, min(self.max_depth, room), self.max_nodes,
                         company, known)
        choice = choose(self.costs, self.stats, self.drafts, self.max_width, min(self.max_depth, room), self.max_nodes,
                        company, known)
        if not choice.speculates and room > 0 and self.drafts:
            self._quiet_rounds += 1
            if self._quiet_rounds >= self.probe_every:
                choice = price(self.costs, self.stats, self.drafts, 1, 1, self.max_nodes, company)
        if choice.speculates:
            self._quiet_rounds = 0
        return choice

    def first(self, room: int, prompt_rows: int, company: Company = Company(),
              known: tuple[tuple[str, int], ...] = (), beside: float = 1.0) -> tuple[Choice, bool]:
        """A generation's first round: its shape, and whether the model drafts should instead read
        the prompt meanwhile (:func:`specdec.cost.prompt_first`, ``beside`` the measured slow-down of
        drafts and target running at once; then the shape has no model draft)."""
        choice = self.next(room, company, known)
        if not self.adaptive:
            return choice, False
        known = tuple((d, min(n, room)) for d, n in known if min(n, room) > 0)
        alone = choose(self.costs, self.stats, [], self.max_width, min(self.max_depth, room), self.max_nodes, company, known)
        if prompt_first(self.costs, self.drafts, prompt_rows, choice, alone, beside):
            return alone, True
        return choice, False

    def assumed(self, proposals: list[Proposal]) -> tuple[list[int], float]:
        """The path a round most likely accepts whole, for a round sent ahead of its verdict to
        build on, and the chance it is accepted whole: of every proposal's best path, the prefix
        with the most tokens expected to hold (its length times that chance, from each draft's
        acceptance by position as a chain). ``([], 0.0)`` when there is no proposal."""
        best: tuple[float, list[int], float] = (0.0, [], 0.0)
        for proposal in proposals:
            path = proposal.paths[0] if proposal.paths else []
            hit = 1.0
            for k, rate in enumerate(self.stats.rates(proposal.stats_key or proposal.draft, 1, len(path)), 1):
                hit *= rate
                if hit * k > best[0]:
                    best = (hit * k, path[:k], hit)
        return best[1], best[2]

    def early_stop(self, draft: str, choice: Choice) -> EarlyStop:
        """When ``draft`` stops growing this round's beams (:func:`specdec.cost.stop_below`); never
        with fixed shapes, which run as asked."""
        return stop_below(self.costs, self.stats, draft, choice) if self.adaptive else EarlyStop()

    def update(self, choice: Choice, proposals: list[Proposal], verdict: Verdict, draft_ms: float = 0.0,
               verify_ms: float = 0.0, first: bool = False) -> None:
        """Record how much of each draft's proposal the target accepted (``cut``: the output ended in
        the round, so what followed the accepted tokens was never judged), and what the round's
        drafting and verifying took (not for a generation's ``first`` round, which also reads the prompt)."""
        accepted = verdict.accepted_by_draft
        every = [self.stats] + ([self.shared] if self.shared is not None else [])
        for proposal in proposals:
            key = proposal.stats_key or proposal.draft
            # A proposal in hand is one chain, whatever the model drafts' width.
            width = 1 if choice.taken(key) else choice.width
            for stats in every:
                stats.record(key, width, proposal.depth, accepted.get(proposal.draft, 0), cut=verdict.bonus_token is None)
            if proposal.confidences:
                # The draft's best path against what the target made of it: how sure the draft was
                # of each token, and whether it was accepted (the first rejected one was judged too).
                path, taken = proposal.paths[0], verdict.tokens
                agreed = next((i for i, (a, b) in enumerate(zip(path, taken)) if a != b), min(len(path), len(taken)))
                judged = min(len(path), agreed + (1 if agreed < len(taken) else 0))
                for stats in every:
                    stats.record_confidence(proposal.draft, proposal.confidences[0], agreed, judged)
        # Only rounds alone correct the curves: in company a round's times include waiting for the
        # passes of others, which its own shape did not cost.
        if not first and verify_ms > 0 and not choice.company.sessions:
            # Each draft priced at the levels it ran: one that stopped early (early_stop) ran fewer.
            self.costs.observe(1 + len(verdict.merged.tree), verify_ms,
                               {p.draft: (choice.width, max(1, p.depth), p.context_rows) for p in proposals
                                if not choice.taken(p.stats_key or p.draft)},
                               draft_ms)
