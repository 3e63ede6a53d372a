"""The cost model on synthetic curves: interpolation, acceptance statistics, and the chooser's picks
(a flat verify curve picks big trees, a steep one short chains, zero acceptance no speculation, and
a tree is never predicted slower than the best chain)."""

import itertools
import random

import pytest

from specdec.cost import AcceptanceStats, CostCurve, RoundCosts, choose, expected_tokens, fastest_curve, measure_curve, price, prompt_first, stop_below

FLAT = CostCurve.of([(1, 100), (2, 100), (4, 101), (8, 102), (16, 104)])  # a GPU, or bfloat16 on a CPU
STEEP = CostCurve.of([(1, 100), (2, 150), (4, 250), (8, 450), (16, 850)])  # every row costs half a step
CHEAP_DRAFT = CostCurve.of([(1, 5), (16, 6)])


def stats_with(rate: float, draft: str = "draft-0", width: int = 1, depth: int = 16, rounds: int = 400) -> AcceptanceStats:
    """Statistics after many rounds where each position was accepted with probability ``rate``."""
    stats, rng = AcceptanceStats(), random.Random(0)
    for _ in range(rounds):
        accepted = next((i for i in range(depth) if rng.random() >= rate), depth)
        stats.record(draft, width, depth, accepted)
    return stats


def test_curve_interpolates_and_extrapolates():
    curve = CostCurve.of([(4, 30), (1, 10), (2, 20)])
    assert curve.points == ((1, 10.0), (2, 20.0), (4, 30.0))
    assert curve.ms(1) == 10 and curve.ms(3) == 25 and curve.ms(0) == 10
    assert curve.ms(8) == 50  # the last segment's slope, continued
    assert CostCurve.of([(1, 10), (2, 5)]).ms(9) == 5  # never falls past the last point
    assert CostCurve.of([(1, 0.0)]).ms(16) == 0 and not CostCurve(())


def test_measure_curve_times_every_row_count():
    calls = []
    curve = measure_curve(calls.append, rows=(1, 4), reps=3)
    assert calls == [1] * 4 + [4] * 4  # one warm run, then the timed ones
    assert [r for r, _ in curve.points] == [1, 4] and all(ms >= 0 for _, ms in curve.points)


def test_acceptance_stats_follow_observations():
    stats = AcceptanceStats(prior_mean=0.8, prior_weight=2.0, decay=1.0)
    assert stats.rates("a", 1, 3) == pytest.approx([0.8, 0.8, 0.8])  # the prior, position by position
    stats.record("a", 1, drafted=3, accepted=1)  # position 1 accepted, position 2 rejected, 3 never judged
    r1, r2, r3 = stats.rates("a", 1, 3)
    assert r1 == pytest.approx(2.6 / 3) and r2 == pytest.approx(r1 * 2 / 3)  # its prior: the position before
    assert r3 == pytest.approx(r2)  # unseen: the position before it
    stats.record("a", 1, drafted=3, accepted=1, cut=True)  # the output ended there: nothing was rejected
    r1, r2 = stats.rates("a", 1, 2)
    assert r1 == pytest.approx(3.6 / 4) and r2 == pytest.approx(r1 * 2 / 3)  # position 2: still one rejection in one trial
    stats.record("b", 1, drafted=0, accepted=0)  # nothing drafted: no evidence
    assert stats.rates("b", 1, 1) == pytest.approx([0.8])
    # A wider proposal starts from the chain's estimate with fewer misses, then follows its own rounds.
    assert stats.rates("a", 4, 1)[0] == pytest.approx(1 - (1 - r1) ** 2)
    for _ in range(50):
        stats.record("a", 4, drafted=2, accepted=0)
    assert stats.rates("a", 4, 1)[0] < 0.05


def test_stats_forget_old_rounds():
    stats = AcceptanceStats(decay=0.9)
    for _ in range(100):
        stats.record("a", 1, 1, 1)
    for _ in range(30):
        stats.record("a", 1, 1, 0)
    assert stats.rates("a", 1, 1)[0] < 0.2  # without forgetting: about 0.75


def test_expected_tokens():
    assert expected_tokens([[1.0, 1.0, 1.0]]) == 4  # every token accepted, then the bonus
    assert expected_tokens([[0.0, 1.0]]) == 1
    assert expected_tokens([[0.5, 0.5]]) == pytest.approx(1.75)
    assert expected_tokens([[0.5], [0.5]]) == pytest.approx(1.75)  # either of two drafts may hold it


def test_flat_verify_curve_picks_big_trees():
    choice = choose(RoundCosts(FLAT, {"draft-0": CHEAP_DRAFT}), stats_with(0.7), ["draft-0"], 4, 8, 64)
    assert choice.width > 1 and choice.depth >= 4 and choice.nodes >= 16


def test_steep_verify_curve_picks_short_chains():
    choice = choose(RoundCosts(STEEP, {"draft-0": CHEAP_DRAFT}), stats_with(0.7), ["draft-0"], 4, 8, 64)
    assert choice.width == 1 and 1 <= choice.depth <= 2


def test_zero_acceptance_turns_speculation_off():
    for verify in (FLAT, STEEP):
        choice = choose(RoundCosts(verify, {"draft-0": CHEAP_DRAFT}), stats_with(0.0), ["draft-0"], 4, 8, 64)
        assert choice.width == 0 and choice.depth == 0 and choice.expected_tokens == 1


def test_expensive_draft_turns_speculation_off():
    slow_draft = CostCurve.of([(1, 90), (16, 95)])
    choice = choose(RoundCosts(STEEP, {"draft-0": slow_draft}), stats_with(0.5), ["draft-0"], 4, 8, 64)
    assert choice.width == 0


def test_tree_never_predicted_slower_than_sequential():
    rng = random.Random(1)
    for _ in range(200):
        rows = [1, 2, 4, 8, 16]
        verify = CostCurve.of(zip(rows, itertools.accumulate(rng.uniform(0, 80) for _ in rows)))
        draft = CostCurve.of(zip(rows, itertools.accumulate(rng.uniform(0, 40) for _ in rows)))
        stats = stats_with(rng.random(), rounds=50)
        costs = RoundCosts(verify, {"draft-0": draft})
        tree = choose(costs, stats, ["draft-0"], 4, 8, rng.choice([4, 16, 64]))
        chain = choose(costs, stats, ["draft-0"], 1, 8, 64)
        assert tree.tokens_per_s >= chain.tokens_per_s * (1 - 1e-9)


def test_node_cap_bounds_trees():
    choice = choose(RoundCosts(FLAT, {"draft-0": CHEAP_DRAFT}), stats_with(0.9), ["draft-0"], 8, 8, 10)
    assert choice.width == 1 or choice.width * choice.depth <= 10


def test_unmeasured_costs_are_priced_relative_to_a_step():
    costs = RoundCosts()
    assert price(costs, stats_with(0.0), ["d"], 0, 0, 64).cost_ms == 1.0
    chain = price(costs, stats_with(1.0, "d"), ["d"], 1, 4, 64)
    assert chain.cost_ms == pytest.approx(4 * 0.3 + 1 + 0.05 * 4)
    assert chain.expected_tokens == pytest.approx(5, abs=0.1)
    # A model-free draft (a zero curve) costs nothing beside a measured verify pass.
    free = RoundCosts(STEEP, {"d": CostCurve.of([(1, 0.0)])})
    assert price(free, stats_with(1.0, "d"), ["d"], 1, 2, 64).cost_ms == pytest.approx(STEEP.ms(3))


def test_engines_calibrate_on_their_model_and_leave_no_session():
    from specdec.draft_service.drafter import BeamDrafter
    from specdec.verify_service.verifier import TreeVerifier
    from tiny_models import VOCAB, tiny_qwen2

    model = tiny_qwen2(seed=0, layers=1)
    for engine in (TreeVerifier(model), BeamDrafter(model, vocab_limit=VOCAB // 2)):
        curve = engine.calibrate(rows=(1, 3, 16), reps=2, context_len=8)
        assert [r for r, _ in curve.points] == [1, 3, 16] and all(ms > 0 for _, ms in curve.points)
        assert len(engine.store) == 0


def test_round_times_correct_the_curves():
    """A calibration taken while the machine was busy says the draft costs three times what rounds
    show: after a few rounds the prices follow the rounds, at the row counts run and near them."""
    costs = RoundCosts(FLAT, {"draft-0": CostCurve.of([(1, 300), (16, 330)])})
    for _ in range(20):
        costs.observe(9, FLAT.ms(9) * 1.5, {"draft-0": (2, 4)}, draft_ms=costs.draft_ms("draft-0", 2, 4, corrected=False) / 3)
    assert costs.verify_ms(9) == pytest.approx(FLAT.ms(9) * 1.5, rel=0.02)
    assert costs.verify_ms(12) == pytest.approx(FLAT.ms(12) * 1.5, rel=0.02)  # the nearest row count's ratio
    assert costs.draft_ms("draft-0", 2, 3) == pytest.approx(costs.draft_ms("draft-0", 2, 3, corrected=False) / 3, rel=0.02)
    assert costs.draft_ms("draft-0", 1, 3) == pytest.approx(costs.draft_ms("draft-0", 1, 3, corrected=False) / 3, rel=0.02)


def test_a_cheaper_draft_than_calibrated_deepens_the_rounds():
    stats = stats_with(0.9)
    slow = RoundCosts(CostCurve.of([(1, 500), (16, 900)]), {"draft-0": CostCurve.of([(1, 450), (16, 500)])})
    before = choose(slow, stats, ["draft-0"], 1, 8, 64)
    for _ in range(20):
        slow.observe(1 + before.depth, slow.verify_ms(1 + before.depth, corrected=False), {"draft-0": (1, max(before.depth, 1))},
                     draft_ms=slow.draft_ms("draft-0", 1, max(before.depth, 1), corrected=False) / 4)
    assert choose(slow, stats, ["draft-0"], 1, 8, 64).depth > before.depth


def test_deeper_positions_follow_the_first_at_every_width():
    stats = AcceptanceStats()
    for _ in range(40):
        stats.record("d", 2, 1, 1)  # only one-token paths of width 2 run so far, all accepted
    assert min(stats.rates("d", 2, 4)) > 0.95


# A pass bound by reading the weights up to 8 rows, then every row costs a tenth of a step.
SATURATING = CostCurve.of([(1, 100), (8, 104), (16, 180), (64, 660)])


def test_trees_shrink_as_the_batch_grows_down_to_no_speculation():
    from specdec.cost import Company, Traffic

    costs, stats = RoundCosts(SATURATING, {"draft-0": CHEAP_DRAFT}), stats_with(0.6)
    alone = choose(costs, stats, ["draft-0"], 4, 8, 64)
    assert alone == choose(costs, stats, ["draft-0"], 4, 8, 64, Company())  # alone, nothing changes
    nodes = [alone.nodes] + [choose(costs, stats, ["draft-0"], 4, 8, 64, Company(others)).nodes for others in (3, 7, 15, 40)]
    assert nodes == sorted(nodes, reverse=True) and nodes[0] > nodes[-1] and nodes[-1] == 0, nodes
    traffic = Traffic()
    traffic.join("a")
    traffic.join("b")
    assert traffic.company("a") == Company(1) and len(traffic) == 2
    traffic.leave("b")
    assert traffic.company("a") == Company()


def test_a_batch_drafts_together_where_one_generation_alone_would_not():
    """A draft pass shared by the whole batch costs each generation a share of it: a shape every
    generation takes can pay where one generation drafting among others that do not would not."""
    from specdec.cost import Company

    # The embedded target's verify curve on 2 cores (float32), roughly.
    verify = CostCurve.of([(1, 500), (8, 660), (16, 930), (64, 2600)])
    costs, stats = RoundCosts(verify, {"draft-0": CostCurve.of([(1, 40), (8, 45), (64, 90)])}), stats_with(0.95)
    together = choose(costs, stats, ["draft-0"], 1, 4, 64, Company(7))
    assert together.depth >= 1
    assert together.cost_ms == pytest.approx(costs.draft_ms("draft-0", 1, together.depth, batch=8)
                                             + costs.verify_ms(8 * (1 + together.nodes)))


def test_calibration_keeps_the_fastest_run_and_never_falls():
    times = iter([5, 3, 4, 9, 20, 8, 30, 9, 6, 7, 6, 7])  # per call: warm-up, then three timed, per row count
    clock = {"t": 0.0}

    def forward(n):
        clock["t"] += next(times) / 1e3

    import specdec.cost as cost

    real = cost.time.perf_counter
    cost.time.perf_counter = lambda: clock["t"]
    try:
        curve = measure_curve(forward, rows=(1, 2, 4), reps=3)
    finally:
        cost.time.perf_counter = real
    assert [ms for _, ms in curve.points] == pytest.approx([3, 8, 8])  # 4 rows measured 6 at best: below 2 rows' 8


# --------------------------------------------------------------------------- choosing a precision
FLAT_FLOAT32 = CostCurve.of([(1, 320), (2, 330), (4, 332), (8, 334), (16, 417), (32, 715)])


def test_a_flat_bfloat16_curve_is_chosen():
    """Intel with AMX, or AMD with AVX-512 bfloat16: bfloat16 is cheaper per row and about as flat."""
    bf16 = CostCurve.of([(1, 179), (2, 209), (4, 209), (8, 232), (16, 311), (32, 606)])
    name, rounds = fastest_curve({"float32": FLAT_FLOAT32, "bfloat16": bf16})
    assert name == "bfloat16"
    assert rounds["bfloat16"].width > 0  # speculation pays on both
    assert rounds["bfloat16"].tokens_per_s > rounds["float32"].tokens_per_s


def test_a_row_proportional_bfloat16_curve_loses_although_its_one_row_pass_is_cheaper():
    """AMD with AVX2 only: bfloat16 has no native product and costs in proportion to rows."""
    bf16 = CostCurve.of([(1, 278), (2, 556), (4, 1112), (8, 2224), (16, 2822)])
    name, rounds = fastest_curve({"bfloat16": bf16, "float32": FLAT_FLOAT32})
    assert bf16.ms(1) < FLAT_FLOAT32.ms(1)
    assert name == "float32"
    assert rounds["float32"].tokens_per_s > rounds["bfloat16"].tokens_per_s


def test_equal_curves_keep_the_first_candidate_and_a_lone_one_is_chosen():
    assert fastest_curve({"a": FLAT_FLOAT32, "b": FLAT_FLOAT32})[0] == "a"
    assert fastest_curve({"b": FLAT_FLOAT32})[0] == "b"
    with pytest.raises(ValueError):
        fastest_curve({})


# --------------------------------------------------------------------------- early stop
def test_a_drafts_confidence_is_calibrated_against_what_the_target_accepts():
    from specdec.cost import CONFIDENCE_BINS, calibrated

    stats = AcceptanceStats()
    assert stats.confidence_calibration("d") is None  # not measured: never trusted
    assert calibrated(0.37, ()) == 0.37
    # A draft that is always right, however unsure it is (the target drafting for itself).
    for _ in range(6):
        stats.record_confidence("self", [0.3, 0.15, 0.55], accepted=3, judged=3)
    assert all(rate > 0.9 for rate in stats.confidence_calibration("self"))
    # A draft whose unsure tokens are rejected, sure ones accepted.
    for _ in range(10):
        stats.record_confidence("small", [0.95, 0.9, 0.2], accepted=2, judged=3)
    table = stats.confidence_calibration("small")
    assert len(table) == CONFIDENCE_BINS
    assert calibrated(0.97, table) > 0.9 and calibrated(0.21, table) < 0.3


def test_a_draft_stops_where_one_more_level_costs_more_than_it_can_add():
    from specdec.cost import EarlyStop

    costs = RoundCosts(FLAT, {"draft-0": CostCurve.of([(1, 30), (16, 30)])})
    stats = AcceptanceStats()
    chain = price(costs, stats, ["draft-0"], 1, 4, 64)
    assert stop_below(costs, stats, "draft-0", chain) == EarlyStop()  # the draft's confidence not yet measured
    for _ in range(8):
        stats.record_confidence("draft-0", [0.9, 0.8, 0.3], accepted=2, judged=3)
    stop = stop_below(costs, stats, "draft-0", chain)
    # A level: a 30 ms draft forward plus one more verify row (0.5 ms on FLAT), against the round's ms per token.
    assert stop.min_path_probability == pytest.approx((30 + 0.5) * chain.expected_tokens / chain.cost_ms, rel=0.05)
    assert 0 < stop.min_path_probability < 1 and stop.calibration
    # A dearer draft stops sooner.
    dear = RoundCosts(FLAT, {"draft-0": CostCurve.of([(1, 90), (16, 90)])})
    assert stop_below(dear, stats, "draft-0", price(dear, stats, ["draft-0"], 1, 4, 64)).min_path_probability > stop.min_path_probability
    # Nothing to stop: no speculation, or a single level.
    assert stop_below(costs, stats, "draft-0", price(costs, stats, ["draft-0"], 0, 0, 64)) == EarlyStop()
    assert stop_below(costs, stats, "draft-0", price(costs, stats, ["draft-0"], 2, 1, 64)) == EarlyStop()


def test_fixed_shapes_never_stop_early():
    from specdec.cost import EarlyStop
    from specdec.speculation import SpeculationPolicy

    costs = RoundCosts(FLAT, {"draft-0": CostCurve.of([(1, 30), (16, 30)])})
    stats = AcceptanceStats()
    for _ in range(8):
        stats.record_confidence("draft-0", [0.9, 0.8, 0.3], accepted=2, judged=3)
    adaptive = SpeculationPolicy(["draft-0"], 1, 4, 64, adaptive=True, costs=costs, stats=stats)
    fixed = SpeculationPolicy(["draft-0"], 1, 4, 64, adaptive=False, costs=costs, stats=stats)
    assert adaptive.early_stop("draft-0", fixed.next(8)).min_path_probability > 0
    assert fixed.early_stop("draft-0", fixed.next(8)) == EarlyStop()


def test_a_generation_follows_its_own_text_after_a_few_rounds():
    """The shared estimates remember other texts; a generation seeded from them weighs them as a
    few rounds, so its own rounds take over soon, while the shared ones keep learning from it."""
    shared = AcceptanceStats()
    for _ in range(100):
        shared.record("d", 1, 4, 1)  # prose: the first token accepted, the second not
    own = shared.seeded(4)
    assert own.rates("d", 1, 2)[1] < 0.3  # starts from them (with the prior's pseudo-round more in play)
    for _ in range(8):
        own.record("d", 1, 4, 4)  # code: every token accepted
    assert own.rates("d", 1, 2)[1] > 0.6 > shared.rates("d", 1, 2)[1]


def test_rounds_of_trees_price_the_chain_too():
    """Only 2-wide trees have run, every drafted token accepted: a chain is priced from them (its
    first position as one of the sqrt(2) tries a 2-wide tree makes), not from the bare prior."""
    stats = AcceptanceStats()
    for _ in range(30):
        stats.record("d", 2, 3, 3)
    chain = stats.rates("d", 1, 5)
    assert chain[0] > 0.85 and all(rate > 0.9 for rate in chain[1:])
    assert AcceptanceStats().rates("d", 1, 2) == [0.8, 0.8]  # nothing run: the prior
    wide = stats.rates("d", 2, 3)
    assert wide[0] >= chain[0]  # a wider proposal holds the first position at least as often


def test_expected_tokens_of_paths_of_different_lengths():
    # A shorter path misses every position past its end: the longer one alone holds them.
    assert expected_tokens([[1.0, 1.0, 1.0], [0.5]]) == 4
    assert expected_tokens([[0.5], [0.5, 1.0]]) == pytest.approx(1 + 0.75 + 0.75)


def test_a_long_lookup_match_is_verified_alone_without_waiting_for_the_model_draft():
    """A proposal in hand (the prompt lookup's chain) costs verify rows only: where it is accepted
    at the rate a copying answer gives, the round takes most of it and skips the model draft, whose
    forwards would cost more than the tokens they add."""
    costs = RoundCosts(FLAT, {"draft-0": CostCurve.of([(1, 30), (16, 32)])})
    merged = AcceptanceStats()
    for draft, rate in (("draft-0", 0.6), ("lookup", 0.95)):
        rng = random.Random(0)
        for _ in range(400):
            merged.record(draft, 1, 16, next((i for i in range(16) if rng.random() >= rate), 16))
    choice = choose(costs, merged, ["draft-0"], 2, 8, 64, known=(("lookup", 12),))
    assert choice.width == 0 and choice.taken("lookup") >= 10 and choice.speculates
    assert choice.nodes == choice.taken("lookup")
    # Without it, the model draft runs.
    alone = choose(costs, merged, ["draft-0"], 2, 8, 64)
    assert alone.width >= 1 and not alone.known
    assert choice.tokens_per_s > alone.tokens_per_s


def test_a_lookup_that_is_rarely_right_is_left_out():
    costs = RoundCosts(STEEP, {"draft-0": CHEAP_DRAFT})
    stats = AcceptanceStats()
    rng = random.Random(0)
    for _ in range(400):
        stats.record("lookup", 1, 8, 0)  # never accepted
        stats.record("draft-0", 1, 8, next((i for i in range(8) if rng.random() >= 0.7), 8))
    choice = choose(costs, stats, ["draft-0"], 2, 8, 64, known=(("lookup", 8),))
    assert not choice.known and choice.width >= 1
    assert choice == choose(costs, stats, ["draft-0"], 2, 8, 64)


def test_a_proposal_in_hand_is_priced_with_its_own_acceptance_and_no_draft_time():
    costs = RoundCosts(FLAT, {"draft-0": CHEAP_DRAFT})
    stats = stats_with(1.0, draft="lookup", depth=4)
    alone = price(costs, stats, ["draft-0"], 0, 0, 64, known=(("lookup", 4),))
    assert alone.expected_tokens == pytest.approx(5, rel=0.05)  # four accepted and the bonus
    assert alone.cost_ms == pytest.approx(costs.verify_ms(5))
    assert (alone.width, alone.depth, alone.nodes, alone.known) == (0, 0, 4, (("lookup", 4),))
    both = price(costs, stats, ["draft-0"], 1, 2, 64, known=(("lookup", 4),))
    assert both.nodes == 6 and both.cost_ms == pytest.approx(costs.draft_ms("draft-0", 1, 2) + costs.verify_ms(7))


def test_a_long_prompt_is_read_by_draft_and_target_side_by_side():
    """The first round: with a long prompt, drafting first and then verifying reads the prompt twice
    in a row; leaving the model draft out of that round lets both read it at once, and pays."""
    verify = CostCurve.of([(1, 200), (16, 230), (64, 600), (256, 2400)])
    draft = CostCurve.of([(1, 60), (16, 70), (64, 250), (256, 1000)])
    costs = RoundCosts(verify, {"draft-0": draft})
    stats = stats_with(0.8)
    speculate = choose(costs, stats, ["draft-0"], 2, 4, 64)
    alone = choose(costs, stats, [], 2, 4, 64)
    assert speculate.width and not alone.speculates
    assert prompt_first(costs, ["draft-0"], 300, speculate, alone)
    assert not prompt_first(costs, ["draft-0"], 4, speculate, alone)  # a short prompt: draft as usual
    assert not prompt_first(costs, ["draft-0"], 300, alone, alone)  # nothing to draft anyway
    # On two shared CPU cores each runs half as fast beside the other: side by side gains nothing.
    assert not prompt_first(costs, ["draft-0"], 300, speculate, alone, beside=2.0)


def test_a_far_verify_service_earns_deeper_rounds_and_its_link_is_priced_apart():
    """The link is paid once a round whatever its size: a far verify service makes deeper rounds pay,
    and the verify curve's correction learns the pass alone, not the link."""
    stats = stats_with(0.8)
    near = RoundCosts(STEEP, {"draft-0": CostCurve.of([(1, 40), (16, 60)])})
    far = RoundCosts(STEEP, {"draft-0": CostCurve.of([(1, 40), (16, 60)])})
    far.link.observe(310.0, 10.0)  # a 300 ms round trip
    assert far.round_ms(1) == pytest.approx(near.round_ms(1) + 300)
    assert choose(far, stats, ["draft-0"], 1, 16, 64).depth > choose(near, stats, ["draft-0"], 1, 16, 64).depth
    for _ in range(10):  # rounds that took the curve's time plus the link
        far.observe(3, far.verify_ms(3, corrected=False) + 300)
    assert far.verify_ms(3) == pytest.approx(far.verify_ms(3, corrected=False))
    assert RoundCosts().round_ms(1) == RoundCosts().verify_ms(1), "unmeasured costs are in passes, not milliseconds: no link"


def test_a_draft_catching_up_on_the_context_is_priced_with_it_not_as_a_slow_draft():
    """A draft that has not seen the last tokens (it sat out rounds) first reads them: one forward
    over those rows. Its round is priced with them, so its correction stays near 1; priced as a
    one-token step, the catch-up would read as a draft four times slower than it is."""
    draft = CostCurve.of([(1, 30), (4, 50), (16, 150), (64, 560)])  # a quantized 0.5B on 2 cores
    costs = RoundCosts(verify=FLAT, drafts={"draft-0": draft})
    caught_up = costs.draft_ms("draft-0", 1, 1, corrected=False, context_rows=40)
    assert caught_up == pytest.approx(draft.ms(40))
    costs.observe(2, FLAT.ms(2), {"draft-0": (1, 1, 40)}, draft_ms=caught_up)
    assert costs.corrections.factor("draft-0", 1) == pytest.approx(1.0)
    naive = RoundCosts(verify=FLAT, drafts={"draft-0": draft})
    naive.observe(2, FLAT.ms(2), {"draft-0": (1, 1)}, draft_ms=caught_up)
    assert naive.corrections.factor("draft-0", 1) > 3
