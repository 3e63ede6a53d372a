"""Rounds sent ahead (``send_ahead``): while the verify service checks a round, the next one is
drafted on the path that round most likely accepts whole and sent at once; its verdict is kept
only when the round before confirms that path. Output is exactly the target's one-token decoding
whichever verdicts hold, greedy or seeded, with any draft, budget, stop or processor; the cost
model sends rounds ahead only where the verify link's measured delay makes it pay."""

import time

import pytest

from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.cost import (SHARED_SLOWDOWN, Contention, CostCurve, Link, RoundCosts, ahead_pays, shares_device,
                          side_by_side_prior)
from specdec.processors import Processing
from specdec.sampling import SamplingParams
from specdec.speculation import Proposal, SpeculationPolicy
from tiny_models import EOS, reference_greedy, tiny_qwen2, truncated_copy

PROMPTS = [[11, 40, 3, 77, 25, 60, 8], list(range(20, 50))]


@pytest.fixture(scope="module")
def target():
    return tiny_qwen2(seed=0, layers=3, eos_token_id=EOS)


@pytest.fixture(scope="module")
def drafts(target):
    return {"self": target, "truncated": truncated_copy(target, 1), "stranger": tiny_qwen2(seed=7, layers=1)}


class FarVerify(LocalVerify):
    """The verify engine behind a link that takes ``delay_s`` per call, measured as the gRPC client
    measures it (the call's time less the service's)."""

    def __init__(self, model, delay_s: float) -> None:
        super().__init__(model)
        self.delay_s, self.link = delay_s, Link()

    def verify(self, *args, **kwargs):
        start = time.perf_counter()
        time.sleep(self.delay_s / 2)
        served = time.perf_counter()
        answer = super().verify(*args, **kwargs)
        service_ms = (time.perf_counter() - served) * 1e3
        time.sleep(self.delay_s / 2)
        self.link.observe((time.perf_counter() - start) * 1e3, service_ms)
        return answer


def controller(target, drafts, names, send_ahead="on", verify=None, **kwargs):
    return local_controller(verify or LocalVerify(target), [LocalDraft(n, drafts[n]) for n in names], eos_token_ids={EOS},
                            send_ahead=send_ahead, **kwargs)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("names", [["self"], ["truncated"], ["stranger"], ["truncated", "stranger"]])
@pytest.mark.parametrize("mode, spec", [("sequential", {"draft_length": 3}), ("tree", {"beam_width": 2, "beam_depth": 4}),
                                        ("tree", {"adaptive": True})])
def test_lossless_whichever_rounds_sent_ahead_hold(target, drafts, prompt, names, mode, spec):
    result = controller(target, drafts, names).generate(params(prompt, 24, mode, **spec))
    assert result.token_ids == reference_greedy(target, prompt, 24)
    assert len(result.token_ids) == 24 and result.finish_reason == "length"


def test_rounds_are_sent_ahead_kept_when_their_path_holds_and_dropped_when_not(target, drafts):
    held = controller(target, drafts, ["self"]).generate(params(PROMPTS[0], 40, "sequential", draft_length=3))
    ahead = [r for r in held.rounds if r.sent_ahead]
    assert ahead and all(r.new_tokens for r in ahead), "a draft the target always agrees with: every round sent ahead holds"
    assert sum(r.discarded_ahead for r in held.rounds) == 0
    missed = controller(target, drafts, ["stranger"]).generate(params(PROMPTS[0], 40, "sequential", draft_length=3))
    assert sum(r.discarded_ahead for r in missed.rounds) > 0, "a draft the target rarely agrees with: rounds sent ahead are dropped"
    assert missed.token_ids == held.token_ids == reference_greedy(target, PROMPTS[0], 40)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 8])
def test_the_budget_is_exact_with_a_round_in_flight(target, drafts, max_new_tokens):
    result = controller(target, drafts, ["self"]).generate(params(PROMPTS[0], max_new_tokens, "sequential", draft_length=3))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], max_new_tokens)


def test_stops_and_processors_hold_with_rounds_sent_ahead(target, drafts):
    reference = reference_greedy(target, PROMPTS[0], 30)
    eos = reference[9]
    c = local_controller(LocalVerify(target), [LocalDraft("self", target)], eos_token_ids={eos}, send_ahead="on")
    result = c.generate(params(PROMPTS[0], 30, "sequential", draft_length=4))
    assert result.token_ids == reference[:10] and result.finish_reason == "eos"
    processing = Processing(repetition_penalty=1.3, presence_penalty=0.5)
    off = controller(target, drafts, ["self"], send_ahead="off").generate(
        params(PROMPTS[0], 30, "tree", beam_width=2, beam_depth=3, processing=processing))
    on = controller(target, drafts, ["self"]).generate(params(PROMPTS[0], 30, "tree", beam_width=2, beam_depth=3,
                                                                     processing=processing))
    assert on.token_ids == off.token_ids
    assert any(r.sent_ahead for r in on.rounds), "the draft applies the processors too: rounds sent ahead hold"


def test_seeded_sampling_replays_with_rounds_sent_ahead(target, drafts):
    def run(send_ahead, seed, mode="tree"):
        c = controller(target, drafts, ["truncated", "stranger"], send_ahead=send_ahead)
        return c.generate(params(PROMPTS[1], 20, mode, beam_width=2, beam_depth=3,
                                 sampling=SamplingParams(temperature=1.0, seed=seed))).token_ids

    for seed in (1, 2, 3):
        assert run("on", seed) == run("off", seed) == run("off", seed, "autoregressive")


def test_sessions_are_released_after_a_round_left_in_flight(target, drafts):
    verify, draft = LocalVerify(target), LocalDraft("self", target)
    c = local_controller(verify, [draft], send_ahead="on")
    c.generate(params(PROMPTS[0], 12, "sequential", draft_length=3))
    deadline = time.monotonic() + 5
    while (len(verify.verifier.store) or len(draft.drafter.store)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(verify.verifier.store) == 0 and len(draft.drafter.store) == 0


def test_auto_sends_ahead_behind_a_slow_link_only(target, drafts):
    def costs():  # a verify pass priced as a real model's on a CPU
        return RoundCosts(verify=CostCurve.of([(1, 60.0), (64, 90.0)]))

    near = controller(target, drafts, ["truncated"], send_ahead="auto", verify=FarVerify(target, 0.0), costs=costs())
    assert not any(r.sent_ahead for r in near.generate(params(PROMPTS[0], 24, "sequential", draft_length=3)).rounds)
    far_verify = FarVerify(target, 0.08)
    far = controller(target, drafts, ["self"], send_ahead="auto", verify=far_verify, costs=costs())
    result = far.generate(params(PROMPTS[0], 24, "sequential", draft_length=3))
    assert far_verify.link.ms > 60, far_verify.link.ms
    assert any(r.sent_ahead for r in result.rounds)
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 24)


def test_the_cost_model_sends_ahead_where_the_link_pays_for_the_misses():
    # (hit, tokens a round, draft, link, verify): the embedded pair on two CPU cores behind 200 ms.
    assert not ahead_pays(0.9, 4.0, 66.0, 0.0, 220.0)  # no link: a round in flight only takes the pass from the next
    assert ahead_pays(0.9, 4.0, 66.0, 200.0, 220.0)  # code: paths that nearly always hold
    assert not ahead_pays(0.35, 2.5, 66.0, 200.0, 220.0, contention=2.0)  # prose on shared cores: the misses cost more
    assert ahead_pays(0.5, 2.5, 66.0, 200.0, 220.0)  # the same with a device for the drafts
    assert not ahead_pays(0.5, 3.0, 66.0, 20.0, 220.0)  # 20 ms: little to hide, one token less a round held
    assert ahead_pays(0.3, 3.0, 66.0, 600.0, 220.0)  # a link far longer than the pass: almost any hit pays
    assert not ahead_pays(1.0, 1.0, 66.0, 200.0, 220.0)  # a round of one token has none to spare
    # Two CPU cores, no link to speak of: drafting ahead runs against the pass (measured 1.8x alone).
    assert ahead_pays(0.95, 6.0, 66.0, 2.0, 220.0) and not ahead_pays(0.95, 6.0, 66.0, 2.0, 220.0, beside=1.8)
    contention = Contention()
    assert contention.ratio == 1.0
    for _ in range(5):
        contention.observe(120.0, 66.0)  # drafting beside a wasted pass took 1.8x its time alone
    assert 1.7 < contention.ratio < 1.85
    contention.observe(30.0, 66.0)  # faster than alone counts as alone
    assert contention.ratio > 1.4
    link = Link()
    link.observe(250.0, 40.0)
    link.observe(250.0, 60.0)
    assert 195 < link.ms < 210 and link.calls == 2
    link.observe(10.0, 20.0)  # the service's clock and the caller's disagree: never below zero
    assert link.ms >= 0


def test_the_assumed_path_is_the_prefix_most_likely_to_hold():
    policy = SpeculationPolicy(["d"], 1, 8, 64)
    for _ in range(40):  # the draft's first two tokens are accepted, the third rarely
        for accepted in (2, 2, 2, 3):
            policy.stats.record("d", 1, 6, accepted)
    path, hit = policy.assumed([Proposal("d", [[1, 2, 3, 4, 5, 6]])])
    assert path == [1, 2] and 0.5 < hit <= 1.0
    assert policy.assumed([]) == ([], 0.0)


def test_a_pass_slowed_by_drafting_beside_it_is_priced():
    """On two shared CPU cores the verify pass runs at about half speed while the next round is
    drafted beside it: then holding a round in flight gains nothing, and sending ahead is refused;
    with devices of their own (ratio 1) the same round is sent."""
    assert ahead_pays(0.9, 4.0, 100.0, 5.0, 116.0)
    assert not ahead_pays(0.9, 4.0, 100.0, 5.0, 116.0, verifying_beside=2.5)


class SlowPass(LocalVerify):
    """A verify pass that takes ``pass_s``, several times what its curve says: as a pass does while
    the next round is drafted beside it on the same two cores."""

    def __init__(self, model, pass_s: float) -> None:
        super().__init__(model)
        self.pass_s = pass_s

    def verify(self, *args, **kwargs):
        time.sleep(self.pass_s)
        return super().verify(*args, **kwargs)


def test_the_slow_down_of_a_pass_with_drafting_beside_it_is_measured(target, drafts):
    def costs():
        return RoundCosts(verify=CostCurve.of([(1, 40.0), (64, 50.0)]))

    c = controller(target, drafts, ["self"], send_ahead="on", verify=SlowPass(target, 0.12), costs=costs())
    result = c.generate(params(PROMPTS[0], 16, "sequential", draft_length=3))
    assert any(r.sent_ahead for r in result.rounds)
    assert c.verifying_beside.seen and c.verifying_beside.ratio > 2, c.verifying_beside.ratio
    alone = controller(target, drafts, ["self"], send_ahead="off", verify=SlowPass(target, 0.12), costs=costs())
    alone.generate(params(PROMPTS[0], 16, "sequential", draft_length=3))
    assert not alone.verifying_beside.seen  # nothing drafted beside a pass: nothing to learn


def test_drafts_on_the_verify_services_host_and_device_start_priced_as_sharing_it():
    """Before anything was drafted beside a pass, a draft that reports the verify service's host and
    device (GetInfo) prices work side by side at SHARED_SLOWDOWN for the time it overlaps the pass:
    next to the verify service all of it, so on two shared CPU cores the first generation keeps its
    rounds one after the other, as measuring would soon tell it; behind a link the drafting meets
    the pass less, and not at all when half the round trip outlasts it. The first measurement
    replaces the prior."""
    assert shares_device("h1", "cpu", [("h2", "cpu"), ("h1", "cpu")])
    assert not shares_device("h1", "cuda:0", [("h1", "cuda:1"), ("h2", "cuda:0")])  # a GPU each, or another host
    assert not shares_device("", "cpu", [("", "cpu")])  # services that do not say share nothing
    assert side_by_side_prior(False, 100.0, 116.0) == (1.0, 1.0)
    beside, verifying = side_by_side_prior(True, 100.0, 116.0)
    assert beside == SHARED_SLOWDOWN and 1.8 < verifying < SHARED_SLOWDOWN  # the drafting ends before the pass does
    assert 1.0 < side_by_side_prior(True, 100.0, 116.0, link_ms=100.0)[0] < beside
    assert side_by_side_prior(True, 100.0, 116.0, link_ms=200.0) == (1.0, 1.0)  # drafted while the round travels
    # (hit, tokens a round, draft, link, verify): code on two CPU cores, the verify service next door.
    def priced(hit, tokens, draft, link, verify, shared=True):  # as the controller prices it before measuring
        beside, verifying = side_by_side_prior(shared, draft, verify, link)
        return ahead_pays(hit, tokens, draft, link, verify, contention=beside, beside=beside, verifying_beside=verifying)

    assert priced(0.95, 6.0, 66.0, 2.0, 220.0, shared=False) and not priced(0.95, 6.0, 66.0, 2.0, 220.0)
    assert priced(0.9, 4.0, 100.0, 200.0, 116.0)  # far: the drafting happens while the round travels
    measured = Contention()
    assert measured.or_prior(SHARED_SLOWDOWN) == SHARED_SLOWDOWN
    measured.observe(70.0, 66.0)  # drafting beside a pass took about its time alone: a device of its own after all
    assert measured.or_prior(SHARED_SLOWDOWN) < 1.1 and measured.seen == 1
