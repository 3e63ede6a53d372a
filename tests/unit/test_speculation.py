"""One round on hand-built proposals: merge, accept, the verdict's words, and
the speculation policy."""

import pytest

from specdec.speculation import Proposal, accept, merge

VOCAB = 10


GREEDY = [Proposal("A", [[1, 2, 3], [1, 4]]), Proposal("B", [[1, 2, 5], [6]])]


def test_merge_puts_every_drafts_best_path_first():
    merged = merge(GREEDY, max_nodes=100, vocab_size=VOCAB)
    assert merged.tree.tokens == [1, 2, 3, 5, 4, 6]
    assert merged.tree.parents == [-1, 0, 1, 1, 0, -1]
    assert merged.tree.sources == [{0, 1}, {0, 1}, {0}, {1}, {0}, {1}]
    assert merged.drafts == ["A", "B"]


def test_merge_cap_drops_runner_ups_before_best_paths():
    merged = merge(GREEDY, max_nodes=4, vocab_size=VOCAB)
    assert merged.tree.tokens == [1, 2, 3, 5]


def test_merge_cuts_paths_at_tokens_outside_the_target_vocabulary():
    merged = merge(GREEDY, max_nodes=100, vocab_size=5)
    assert merged.tree.tokens == [1, 2, 3, 4]
    assert merged.tree.sources[1] == {0, 1}


@pytest.mark.parametrize(
    "target, accepted, bonus, correction, winner, by_draft",
    [
        ([1, 2, 5, 0, 9, 0, 0], [1, 2, 5], 9, False, "B", {"A": 2, "B": 3}),  # past every proposal: a free token
        ([1, 7, 0, 0, 0, 0, 0], [1], 7, True, "A", {"A": 1, "B": 1}),  # the target took another token
        ([8, 0, 0, 0, 0, 0, 0], [], 8, True, "", {"A": 0, "B": 0}),  # nothing accepted
    ],
)
def test_greedy_verdict(target, accepted, bonus, correction, winner, by_draft):
    verdict = accept(merge(GREEDY, 100, VOCAB), target)
    assert verdict.accepted == accepted and verdict.bonus_token == bonus
    assert verdict.tokens == accepted + [bonus]
    assert verdict.correction == correction
    assert verdict.winning_draft == winner
    assert verdict.accepted_by_draft == by_draft


def test_cut_verdict_keeps_only_what_reached_the_output():
    verdict = accept(merge(GREEDY, 100, VOCAB), [1, 2, 5, 0, 9, 0, 0])
    assert verdict.cut(4) is verdict
    cut = verdict.cut(1)
    assert cut.accepted == [1] and cut.bonus_token is None and cut.tokens == [1]
    assert not cut.correction and cut.winning_draft == "A" and cut.accepted_by_draft == {"A": 1, "B": 1}


def test_proposal_cut():
    proposal = Proposal("A", [[1, 2, 3], [], [4]], confidences=[[0.9, 0.8, 0.7], [], [0.5]])
    cut = proposal.cut(2)
    assert cut.paths == [[1, 2], [4]] and cut.confidences == [[0.9, 0.8], [0.5]] and cut.depth == 2
    assert Proposal("A", [[], []]).cut(3) is None


def test_speculation_policy():
    from specdec.cost import CostCurve, RoundCosts
    from specdec.speculation import SpeculationPolicy, Verdict

    def verdict(accepted: int, drafted: int) -> Verdict:
        proposal = Proposal("A", [list(range(drafted))])
        return Verdict(merge([proposal], 64, VOCAB), list(range(accepted)), 0)

    fixed = SpeculationPolicy(["A"], max_width=3, max_depth=4, max_nodes=64, adaptive=False)
    assert (fixed.next(room=10).width, fixed.next(room=10).depth, fixed.next(room=10).nodes) == (3, 4, 12)
    assert fixed.next(room=2).depth == 2 and fixed.next(room=0).width == 0

    # A steep verify curve and a cheap draft: a well-accepted chain grows, a rejected one stops.
    costs = RoundCosts(CostCurve.of([(1, 100), (16, 400)]), {"A": CostCurve.of([(1, 10), (16, 12)])})
    policy = SpeculationPolicy(["A"], max_width=1, max_depth=8, max_nodes=64, costs=costs, probe_every=3)
    for _ in range(20):
        choice = policy.next(room=100)
        policy.update(choice, [Proposal("A", [list(range(choice.depth))])], verdict(choice.depth, choice.depth))
    assert policy.next(room=100).depth == 8 and policy.next(room=5).depth == 5
    for _ in range(40):
        choice = policy.next(room=100)
        if choice.width:
            policy.update(choice, [Proposal("A", [list(range(choice.depth))])], verdict(0, choice.depth))
    assert policy.next(room=100).width == 0
    # Off, it still probes with a one-token chain now and then, so a recovery can be seen.
    shapes = [(c.width, c.depth) for c in (policy.next(room=100) for _ in range(6))]
    assert (1, 1) in shapes and shapes.count((0, 0)) >= 4
