"""The speculative sampling rule on hand-built distributions: exact outcomes, and a statistical
check that sampled trees from several drafts reproduce the target's distribution exactly (while a
deliberately broken rule is caught by the same test)."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from specdec.sampling import Candidate, SamplingParams, accept_sampled_tree, distribution, residual, warp_logits
from specdec.tree import TokenTrie


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def dist(*values):
    t = torch.tensor(values, dtype=torch.float32)
    return t / t.sum()


def test_certain_accept_then_bonus_from_child():
    # p puts everything on token 1 at the root, and on token 2 after it.
    p = torch.stack([dist(0, 1, 0), dist(0, 0, 1)])
    outcome = accept_sampled_tree([1], p, {-1: [Candidate(0, dist(1, 1, 1))]}, gen())
    assert outcome == ([0], 2)


def test_certain_reject_samples_from_the_residual():
    # The target never emits token 0; the draft proposed it. Residual of p minus q keeps token 2 only.
    p = torch.stack([dist(0, 1, 3), dist(1, 1, 1)])
    q = dist(2, 1, 0)
    assert residual(p[0], q).tolist() == pytest.approx([0, 0, 1])
    for seed in range(20):
        assert accept_sampled_tree([0], p, {-1: [Candidate(0, q)]}, gen(seed)) == ([], 2)


def test_second_candidate_competes_for_the_residual():
    # Candidate A (token 0) is always rejected; candidate B (token 1) is then accepted for sure,
    # because after removing q_A the residual puts all its mass on token 1.
    p = torch.stack([dist(0, 1, 0), dist(1, 0, 0), dist(0, 0, 1)])
    cands = {-1: [Candidate(0, dist(1, 0, 0)), Candidate(1, dist(0, 1, 0))]}
    assert accept_sampled_tree([0, 1], p, cands, gen()) == ([1], 2)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_whole_chain_accepted_when_draft_equals_target(depth):
    p_row = dist(1, 2, 3, 4)
    tokens = [3, 1, 2, 0][:depth]
    p = p_row.repeat(depth + 1, 1)
    cands = {i - 1: [Candidate(i, p_row)] for i in range(depth)}
    accepted, bonus = accept_sampled_tree(tokens, p, cands, gen())
    assert accepted == list(range(depth)) and 0 <= bonus < 4


def test_warping_matches_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=gen(1))
    for t, k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.9)]:
        expected = TemperatureLogitsWarper(t)(None, logits)
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = warp_logits(logits, SamplingParams(temperature=t, top_k=k, top_p=top_p))
        assert torch.equal(got, expected)


# ---- statistical check: a toy world of conditional distributions --------------------------------

V = 5


def world(seed: int, sharp: float):
    """A deterministic conditional distribution p(. | prefix) for short prefixes."""
    def cond(prefix: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, prefix)) % (2**31))
        return distribution(torch.randn(V, generator=g) * sharp, SamplingParams(temperature=1.0))
    return cond


TARGET, DRAFTS = world(1, 1.5), [world(2, 1.5), world(3, 2.5)]


def speculative_two_tokens(g: torch.Generator, n_drafts: int, chains: int, depth: int, rule=accept_sampled_tree):
    """Generate two tokens with sampled draft chains merged into a tree, round after round."""
    out: list[int] = []
    while len(out) < 2:
        trie, cands = TokenTrie(), {}
        for d in range(n_drafts):
            for _ in range(chains):
                prefix, node = tuple(out), -1
                path = []
                for _ in range(depth):
                    q = DRAFTS[d](prefix)
                    x = int(torch.multinomial(q, 1, generator=g))
                    path.append(x)
                    trie.insert(path, d)
                    child = trie.child(node, x)
                    cands.setdefault(node, []).append(Candidate(child, q))
                    prefix, node = prefix + (x,), child
        tree = trie.tree
        p = torch.stack([TARGET(tuple(out))] + [TARGET(tuple(out) + tuple(tree.tokens[i] for i in tree.path_to(n))) for n in range(len(tree))])
        accepted, bonus = rule(tree.tokens, p, cands, g)
        out += [tree.tokens[i] for i in accepted] + [bonus]
    return tuple(out[:2])


def always_accept(tokens, p, cands, g):
    node, accepted = -1, []
    while cands.get(node):
        node = cands[node][0].node
        accepted.append(node)
    return accepted, int(torch.multinomial(p[node + 1], 1, generator=g))


def joint_test(n_drafts, chains, depth, rule, samples=4000):
    g = gen(1234)
    counts = {pair: 0 for pair in itertools.product(range(V), repeat=2)}
    for _ in range(samples):
        counts[speculative_two_tokens(g, n_drafts, chains, depth, rule)] += 1
    expected = {(a, b): float(TARGET(())[a] * TARGET((a,))[b]) * samples for a, b in counts}
    observed = [counts[k] for k in counts]
    return chisquare(observed, [expected[k] for k in counts]).pvalue


@pytest.mark.parametrize("n_drafts, chains, depth", [(1, 1, 1), (1, 1, 3), (2, 1, 2), (1, 3, 2), (2, 2, 3)])
def test_output_follows_target_distribution(n_drafts, chains, depth):
    # Significance 0.001: a correct rule fails this one time in a thousand (seeded, so never flaky).
    assert joint_test(n_drafts, chains, depth, accept_sampled_tree) > 1e-3


def test_broken_rule_is_detected():
    assert joint_test(2, 2, 3, always_accept, samples=2000) < 1e-6
