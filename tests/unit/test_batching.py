"""Continuous batching: several sessions in one forward pass get the bits they get alone, the
worker batches concurrent calls, feeds long contexts in chunks, and drops calls whose caller has
gone without leaving a session behind."""

import copy
import random
import threading
import time

import pytest
import torch

from specdec.batching import BatchWorker, Caller, feed
from specdec.draft_service.drafter import BeamDrafter
from specdec.engine import Part, forward_batch, tree_forward
from specdec.errors import Cancelled, DeadlineExceeded
from specdec.kv_cache import SessionKV, SessionStore
from specdec.tree import TokenTree
from specdec.verify_service.verifier import TreeVerifier
from test_batch_invariance import VARIANTS, invariant, random_tree, tiny_model


@pytest.fixture(scope="module", params=VARIANTS, ids="-".join)
def model(request):
    dtype, kernel = request.param
    return invariant(tiny_model(seed=3, layers=2, hidden=256, dtype=dtype), kernel)


def session_case(rng: random.Random, model, name: str):
    """A session with some context cached (or none), the context still to feed, and a tree (maybe empty)."""
    context = [rng.randrange(90) for _ in range(rng.randint(2, 30))]
    cached = rng.randint(0, len(context) - 1)
    tree = random_tree(rng, rng.randint(1, 12)) if rng.random() < 0.8 else TokenTree()
    session = SessionKV(name)
    if cached:
        tree_forward(model, session, context[:cached])
    return session, context[cached:], tree


@pytest.mark.parametrize("seed", range(6))
def test_sessions_in_one_pass_get_the_bits_they_get_alone(model, seed):
    rng = random.Random(seed)
    cases = [session_case(rng, model, f"s{i}") for i in range(rng.randint(2, 7))]
    alone = []
    for session, pending, tree in cases:
        twin = SessionKV("twin")
        twin.cache, twin.prefix_tokens = copy.deepcopy(session.cache), list(session.prefix_tokens)
        alone.append(tree_forward(model, twin, pending, tree.tokens, tree.parents, logits_to_keep=len(tree) + 1))
    parts = [Part(session, pending, tree.tokens, tree.parents, keep=len(tree) + 1) for session, pending, tree in cases]
    batched = forward_batch(model, parts)
    for i, (mine, reference) in enumerate(zip(batched, alone)):
        assert torch.equal(mine, reference), f"session {i} differs from its pass alone"
    for (session, pending, tree), part in zip(cases, parts):
        assert session.tail_tokens == tree.tokens and session.cached_len == session.cache.get_seq_length()


def test_a_context_fed_in_chunks_gives_the_same_bits(model):
    context = [(5 * i + 1) % 90 for i in range(40)]
    tree = TokenTree(tokens=[3, 4, 5], parents=[-1, 0, 0])
    whole = tree_forward(model, SessionKV("whole"), context, tree.tokens, tree.parents, logits_to_keep=4)
    session, steps = SessionKV("chunks"), None
    steps = feed(session, context, tree.tokens, tree.parents, keep=4, chunk=8)
    part, sizes = next(steps), []
    while True:
        sizes.append(part.rows)
        try:
            part = steps.send(forward_batch(model, [part])[0])
        except StopIteration as done:
            chunked = done.value
            break
    assert max(sizes) <= 8 and sum(sizes) == len(context) + len(tree)
    assert torch.equal(chunked, whole)


def test_concurrent_verify_calls_share_passes_and_match_sequential_calls(model):
    rng = random.Random(7)
    requests = [([rng.randrange(90) for _ in range(rng.randint(3, 20))], random_tree(rng, rng.randint(1, 10))) for _ in range(8)]
    sequential = TreeVerifier(model, gather_s=0.0)
    expected = [sequential.verify(f"s{i}", ctx, tree).target_tokens for i, (ctx, tree) in enumerate(requests)]
    verifier = TreeVerifier(model, gather_s=0.05)
    results, batches = [None] * len(requests), []
    start = threading.Barrier(len(requests))

    def call(i):
        start.wait()
        outcome = verifier.verify(f"s{i}", *requests[i])
        results[i] = outcome.target_tokens
        batches.append(outcome.batch.sessions)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
    assert max(batches) > 1, "concurrent calls should have shared a pass"


def test_concurrent_beam_searches_match_each_alone(model):
    contexts = [[(3 * i + k) % 90 for k in range(5 + i)] for i in range(5)]
    alone = [BeamDrafter(model).propose("s", ctx, 3, 4).beams for ctx in contexts]
    drafter, results = BeamDrafter(model, gather_s=0.05), [None] * len(contexts)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, drafter.propose(f"s{i}", contexts[i], 3 - i % 3, 4 + i % 2)))
               for i in range(len(contexts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ctx in enumerate(contexts):
        reference = BeamDrafter(model).propose("s", ctx, 3 - i % 3, 4 + i % 2).beams
        assert [b.tokens for b in results[i].beams] == [b.tokens for b in reference]
    assert [b.tokens for b in alone[0]] == [b.tokens for b in results[0].beams]


def test_a_call_whose_caller_has_gone_never_runs_nor_creates_a_session(model):
    verifier = TreeVerifier(model)
    with pytest.raises(Cancelled):
        verifier.verify("gone", [1, 2, 3], TokenTree(), caller=Caller(alive=lambda: False))
    with pytest.raises(DeadlineExceeded):
        verifier.verify("late", [1, 2, 3], TokenTree(), caller=Caller(deadline=time.monotonic() - 1))
    assert len(verifier.store) == 0


def test_a_caller_leaving_mid_call_leaves_no_session_it_created(model):
    store = SessionStore()
    parts_seen = []

    def forward(parts):
        parts_seen.append(len(parts))
        return forward_batch(model, parts)

    worker = BatchWorker(forward, store, max_rows=4)
    here = {"alive": True}

    def job():
        session = store.get("s")
        result = yield from feed(session, list(range(1, 20)), chunk=4)  # five passes
        return result

    def leave_after_two_passes(parts):
        out = forward(parts)
        if len(parts_seen) == 2:
            here["alive"] = False
        return out

    worker.forward = leave_after_two_passes
    with pytest.raises(Cancelled):
        worker.submit(job, "s", Caller(alive=lambda: here["alive"]))
    assert len(parts_seen) == 2 and len(store) == 0


def test_release_during_a_call_drops_the_session_when_it_ends(model):
    drafter = BeamDrafter(model)
    release_now = threading.Event()
    original = drafter.worker.forward

    def slow_forward(parts):
        release_now.set()
        time.sleep(0.05)
        return original(parts)

    drafter.worker.forward = slow_forward
    thread = threading.Thread(target=lambda: (release_now.wait(), drafter.release("s")))
    thread.start()
    outcome = drafter.propose("s", [1, 2, 3, 4], 2, 5)
    thread.join()
    assert outcome.beams and len(drafter.store) == 0


def test_a_failing_part_fails_only_its_own_call(model):
    verifier = TreeVerifier(model, gather_s=0.05)
    errors, good = [], []

    def bad():
        try:  # a tree whose node ids are outside the embedding: the batched pass fails, then it alone
            verifier.verify("bad", [1, 2], TokenTree(tokens=[10**6], parents=[-1]))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def fine():
        good.append(verifier.verify("good", [1, 2, 3], TokenTree(tokens=[4], parents=[-1])).target_tokens)

    threads = [threading.Thread(target=bad), threading.Thread(target=fine)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and len(good) == 1 and len(good[0]) == 2
    assert verifier.store.peek("bad") is None


def test_passes_stay_within_the_row_limit(model):
    rows = []
    verifier = TreeVerifier(model, max_batch_rows=16, gather_s=0.05, observe=lambda info, queued: rows.append(info.rows))
    threads = [threading.Thread(target=verifier.verify, args=(f"s{i}", list(range(1, 30)), TokenTree(tokens=[1, 2], parents=[-1, 0])))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rows and max(rows) <= 16


def test_the_check_catches_a_path_that_is_not_batch_invariant():
    """On the stock float32 path (products of any row count) the same comparison finds sessions
    whose bits changed in company, so the exactness test above can fail."""
    stock, differing = tiny_model(seed=3, layers=2, hidden=256, dtype="float32"), 0
    for seed in range(4):
        rng = random.Random(seed)
        cases = [session_case(rng, stock, f"s{i}") for i in range(rng.randint(2, 7))]
        alone = []
        for session, pending, tree in cases:
            twin = SessionKV("twin")
            twin.cache, twin.prefix_tokens = copy.deepcopy(session.cache), list(session.prefix_tokens)
            alone.append(tree_forward(stock, twin, pending, tree.tokens, tree.parents, logits_to_keep=len(tree) + 1))
        batched = forward_batch(stock, [Part(s, p, t.tokens, t.parents, keep=len(t) + 1) for s, p, t in cases])
        differing += sum(not torch.equal(a, b) for a, b in zip(batched, alone))
    assert differing > 0


def test_a_new_session_starts_from_a_shared_prefix_with_the_same_bits(model):
    """A second session whose context begins like the first's copies those tokens' cache instead of
    computing them, and scores its tree with exactly the bits of a session that computed them all."""
    system = [(7 * i + 2) % 90 for i in range(20)]
    tree = TokenTree(tokens=[3, 4, 5], parents=[-1, 0, 0])
    verifier = TreeVerifier(model)
    verifier.verify("first", system + [11, 12], tree)
    shared = verifier.verify("second", system + [40, 41, 42], tree)
    assert shared.reused_tokens == len(system) and verifier.store.shared_tokens == len(system)
    alone = TreeVerifier(model).verify("alone", system + [40, 41, 42], tree)
    assert alone.reused_tokens == 0 and shared.target_tokens == alone.target_tokens
    session = SessionKV("check")
    reference = tree_forward(model, session, system + [40, 41, 42], tree.tokens, tree.parents, logits_to_keep=4)
    store = SessionStore()
    donor = store.get("donor")
    tree_forward(model, donor, system + [11, 12])
    fresh = store.get("fresh")
    assert store.share_prefix(fresh, system + [40, 41, 42]) == len(system)
    logits = tree_forward(model, fresh, [40, 41, 42], tree.tokens, tree.parents, logits_to_keep=4)
    assert torch.equal(logits, reference)


def test_the_pass_schedule_is_a_policy_apart():
    """PassSchedule alone (no thread, no model): which calls a pass takes, and when it starts."""
    import types

    from specdec.batching import PassSchedule

    schedule = PassSchedule(max_rows=10, gather_s=0.0, company_wait=0.5)
    jobs = [types.SimpleNamespace(served_at=t, part=types.SimpleNamespace(rows=r)) for t, r in [(3.0, 4), (1.0, 8), (2.0, 2)]]
    assert schedule.choose(jobs) == [jobs[1], jobs[2]]  # least recently served first; the 4-row part waits
    assert schedule.choose([jobs[0]]) == [jobs[0]]
    big = types.SimpleNamespace(served_at=0.0, part=types.SimpleNamespace(rows=50))
    assert schedule.choose([big]) == [big]  # the first call always goes, whatever its rows
    # A session that comes back 0.1 s after its calls end is waited for, within half a pass.
    schedule.passed(1.0)
    schedule.ended("s", 10.0)
    schedule.arrived("s", 10.1)
    schedule.ended("s", 20.0)
    assert abs(schedule.start_at(20.05) - 20.1) < 1e-9
    assert schedule.start_at(20.2) == 20.2  # late: not waited for
    schedule.forget("s")
    schedule.ended("t", 30.0)  # never seen away: nothing to wait for
    assert schedule.start_at(30.05) == 30.05
