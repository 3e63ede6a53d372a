"""The tree forward pass, the verifier and the drafter on tiny models, against sequential runs."""

import math

import pytest
import torch

from specdec.draft_service.drafter import BeamDrafter
from specdec.engine import tree_forward
from specdec.kv_cache import SessionKV, SessionStore
from specdec.tree import TokenTree, greedy_accept
from tiny_models import reference_greedy, tiny_qwen2
from specdec.verify_service.verifier import TreeVerifier

PROMPT = [11, 40, 3, 77, 25, 60, 8]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2(seed=3, layers=2)


def path_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits of a plain causal forward, no cache: the ground truth."""
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float()


def test_tree_forward_matches_each_path(model):
    tree = TokenTree(tokens=[5, 6, 7, 8, 9, 10], parents=[-1, 0, 1, 0, -1, 4])
    session = SessionKV("s")
    tree_forward(model, session, PROMPT[:4])  # part of the context cached first
    logits = tree_forward(model, session, PROMPT[4:], tree.tokens, tree.parents, logits_to_keep=len(tree) + 1)
    assert torch.allclose(logits[0], path_logits(model, PROMPT)[-1], atol=1e-4)
    for node in range(len(tree)):
        path = PROMPT + [tree.tokens[i] for i in tree.path_to(node)]
        assert torch.allclose(logits[node + 1], path_logits(model, path)[-1], atol=1e-4), node


def test_compacted_cache_continues_like_a_sequential_run(model):
    tree = TokenTree(tokens=[5, 6, 7, 8], parents=[-1, 0, -1, 2])
    session = SessionKV("s")
    tree_forward(model, session, PROMPT, tree.tokens, tree.parents, logits_to_keep=5)
    # The target accepted node 2 then 3 (tokens 7, 8); its bonus token is 30.
    context = PROMPT + [7, 8, 30]
    reused = session.sync(context)
    assert reused == len(PROMPT) + 2 and session.cached_len == reused
    logits = tree_forward(model, session, context[reused:])
    assert torch.allclose(logits[-1], path_logits(model, context)[-1], atol=1e-4)


@pytest.mark.parametrize("max_new_tokens", [1, 9, 25])
def test_verifier_rounds_reuse_the_cache_and_match_generate(model, max_new_tokens):
    """Plain decoding through the verifier, with a tree of wrong guesses each round."""
    reference = reference_greedy(model, PROMPT, max_new_tokens)
    verifier = TreeVerifier(model)
    output = []
    while len(output) < max_new_tokens:
        context = PROMPT + output
        guess = TokenTree(tokens=[(reference[len(output)] + 1) % 96, 2], parents=[-1, 0])
        outcome = verifier.verify("s", context, guess)
        # Only the newest token is fed besides the tree: the rest of the context is cached.
        assert outcome.fed_tokens == (len(PROMPT) if not output else 1) + len(guess)
        assert outcome.cached_tokens == len(context) + len(guess)
        accepted, bonus = greedy_accept(guess, outcome.target_tokens)
        output += [guess.tokens[i] for i in accepted] + [bonus]
    assert output[:max_new_tokens] == reference


def test_verifier_cache_miss_gives_identical_tokens(model):
    verifier = TreeVerifier(model, SessionStore(max_sessions=1))
    tree = TokenTree(tokens=[1, 2, 3], parents=[-1, 0, -1])
    first = verifier.verify("a", PROMPT, tree).target_tokens
    verifier.verify("b", PROMPT[:3], tree)  # evicts "a"
    assert verifier.store.peek("a") is None
    again = verifier.verify("a", PROMPT, tree)
    assert again.reused_tokens == 0 and again.target_tokens == first


def test_greedy_chain_is_the_drafts_greedy_generate(model):
    drafter = BeamDrafter(model)
    beams = drafter.propose("s", PROMPT, beam_width=1, depth=12).beams
    assert [b.tokens for b in beams] == [reference_greedy(model, PROMPT, 12)]


def test_drafter_keeps_the_accepted_part_of_its_chain(model):
    drafter = BeamDrafter(model)
    chain = drafter.propose("s", PROMPT, 1, 6).beams[0].tokens
    context = PROMPT + chain[:3] + [99 % 96]  # three accepted, then a correction
    outcome = drafter.propose("s", context, 1, 6)
    assert outcome.reused_tokens == len(PROMPT) + 3
    assert outcome.fed_tokens == 1 + 5  # the correction, then one forward per new chain token but the last
    assert outcome.beams[0].tokens == reference_greedy(model, context, 6)


@pytest.mark.parametrize("width, depth", [(2, 3), (3, 4), (4, 2)])
def test_beam_search_matches_transformers(model, width, depth):
    drafter = BeamDrafter(model)
    beams = drafter.propose("s", PROMPT, width, depth).beams
    ids = torch.tensor([PROMPT])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=depth, min_new_tokens=depth, num_beams=width,
        num_return_sequences=width, do_sample=False, early_stopping=True, length_penalty=0.0, pad_token_id=0,
    )
    assert [b.tokens for b in beams] == out[:, len(PROMPT):].tolist()
    scores = [b.logprob for b in beams]
    assert scores == sorted(scores, reverse=True)


def test_beams_cache_extends_with_accepted_nodes(model):
    drafter = BeamDrafter(model)
    beams = drafter.propose("s", PROMPT, 3, 4).beams
    best = beams[0].tokens
    context = PROMPT + best[:2] + [0]
    outcome = drafter.propose("s", context, 3, 4)
    # Both accepted tokens were fed while growing the beams: they are kept, only the bonus is new.
    assert outcome.reused_tokens == len(PROMPT) + 2
    fresh = BeamDrafter(model).propose("s", context, 3, 4)
    assert [b.tokens for b in outcome.beams] == [b.tokens for b in fresh.beams]


def test_store_evicts_by_count_and_bytes(model):
    store = SessionStore(max_sessions=2)
    verifier = TreeVerifier(model, store)
    for sid in "abc":
        verifier.verify(sid, PROMPT, TokenTree())
    assert store.peek("a") is None and len(store) == 2
    one = store.peek("c").nbytes
    store.max_bytes = one  # room for exactly one session's cache
    store.enforce_limits(keep="c")
    assert len(store) == 1 and store.peek("c") is not None
    assert store.evictions == 2
    assert store.release("c") and len(store) == 0


def test_limited_draft_vocabulary_scores_only_the_first_ids():
    """With vocab_limit the drafter is greedy search over ids below the limit: the same as the
    full model's greedy search with every other id's logit pushed to -inf."""
    model = tiny_qwen2(seed=3, layers=2)  # as a draft service loads it (a verifier packs its head away)
    limit = 48
    drafter = BeamDrafter(model, vocab_limit=limit)
    assert drafter.head is not None and drafter.head.shape[0] == limit
    assert drafter.head.data_ptr() == model.get_output_embeddings().weight.data_ptr()  # a view, no copy
    chain = drafter.propose("s", PROMPT, beam_width=1, depth=10).beams[0].tokens
    expected, context = [], list(PROMPT)
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([context])).logits[0, -1]
            token = int(logits[:limit].argmax())
            expected.append(token)
            context.append(token)
    assert chain == expected and max(chain) < limit
    beams = drafter.propose("t", PROMPT, beam_width=3, depth=4).beams
    assert len(beams) == 3 and all(t < limit for b in beams for t in b.tokens)


def test_limit_at_or_above_the_vocabulary_is_the_whole_vocabulary(model):
    assert BeamDrafter(model, vocab_limit=0).head is None
    assert BeamDrafter(model, vocab_limit=10**6).head is None


@pytest.mark.parametrize("width", [1, 3])
def test_beams_stop_growing_below_the_path_probability_asked(model, width):
    """Early stop: the level already scored is kept, no deeper level is fed once the best beam's
    calibrated probability is below ``min_path_probability``; the default grows to the depth asked."""
    from specdec.cost import EarlyStop

    full = BeamDrafter(model).propose("s", PROMPT, width, 6)
    assert {len(b.tokens) for b in full.beams} == {6}
    assert all(len(b.probabilities) == 6 and all(0 < p <= 1 for p in b.probabilities) for b in full.beams)
    assert math.exp(full.beams[0].logprob) == pytest.approx(math.prod(full.beams[0].probabilities), rel=1e-4)
    stopped = BeamDrafter(model).propose("s", PROMPT, width, 6, stop=EarlyStop(1.0))
    assert {len(b.tokens) for b in stopped.beams} == {1}  # every path is below certainty
    assert stopped.fed_tokens == len(PROMPT)  # the prompt only: no level was fed
    assert [b.tokens for b in stopped.beams] == [b.tokens for b in BeamDrafter(model).propose("s", PROMPT, width, 1).beams]
    # Calibrated as always accepted, the same paths grow to the whole depth.
    trusted = BeamDrafter(model).propose("s", PROMPT, width, 6, stop=EarlyStop(0.99, (1.0,) * 10))
    assert [b.tokens for b in trusted.beams] == [b.tokens for b in full.beams]
