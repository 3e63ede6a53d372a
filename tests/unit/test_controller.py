"""The accept/fallback loop with in-process engines: greedy output equals the target's own
``generate`` for every mode and setting, and statistics add up."""

import itertools
import time

import pytest

from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.config import SpeculationLimits
from specdec.errors import InvalidRequest
from specdec.generation import CallContext
from specdec.orchestrator.controller import Limits, SpeculativeController
from tiny_models import EOS, VOCAB, reference_greedy, tiny_qwen2, tiny_tokenizer, truncated_copy

PROMPTS = [[11, 40, 3, 77, 25, 60, 8], [5], list(range(20, 50))]


class BrokenDraft:
    name, model = "broken", ""

    def draft(self, *args):
        raise ConnectionError("draft service went away")

    def release(self, session_id):
        pass


class SlowDraft(LocalDraft):
    def draft(self, *args):
        time.sleep(0.5)
        return super().draft(*args)


@pytest.fixture(scope="module")
def target():
    return tiny_qwen2(seed=0, layers=3, eos_token_id=EOS)


@pytest.fixture(scope="module")
def drafts(target):
    return {
        "self": target,  # agrees with the target everywhere: exercises full acceptance
        "truncated": truncated_copy(target, 1),  # agrees sometimes
        "stranger": tiny_qwen2(seed=7, layers=1),  # rarely agrees: exercises corrections
    }


def controller(target, draft_clients, **kwargs):
    return local_controller(LocalVerify(target), draft_clients, eos_token_ids={EOS}, **kwargs)


def request(prompt, mode, max_new_tokens=24, draft_length=5, beam_width=2, beam_depth=4, max_tree_nodes=64, **kwargs):
    return params(prompt, max_new_tokens, mode, draft_length, beam_width, beam_depth, max_tree_nodes, **kwargs)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("draft_names", [["truncated"], ["self"], ["stranger"], ["truncated", "stranger"], ["self", "stranger"]])
@pytest.mark.parametrize(
    "mode, settings",
    [
        ("autoregressive", {}),
        ("sequential", {"draft_length": 1}),
        ("sequential", {"draft_length": 4}),
        ("sequential", {"draft_length": 9}),
        ("tree", {"beam_width": 1, "beam_depth": 3}),
        ("tree", {"beam_width": 3, "beam_depth": 4}),
        ("tree", {"beam_width": 4, "beam_depth": 2, "max_tree_nodes": 5}),
    ],
)
def test_lossless_greedy(target, drafts, prompt, draft_names, mode, settings):
    c = controller(target, [LocalDraft(n, drafts[n]) for n in draft_names])
    result = c.generate(request(prompt, mode, **settings))
    assert result.token_ids == reference_greedy(target, prompt, 24)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
@pytest.mark.parametrize("mode", ["sequential", "tree"])
def test_budget_is_exact(target, drafts, mode, max_new_tokens):
    c = controller(target, [LocalDraft("self", drafts["self"])])
    result = c.generate(request(PROMPTS[0], mode, max_new_tokens=max_new_tokens))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], max_new_tokens)
    assert result.finish_reason == "length"


def test_stops_at_eos_like_generate():
    target = tiny_qwen2(seed=0, layers=3, eos_token_id=EOS)
    reference = reference_greedy(target, PROMPTS[0], 40)
    # Make the target's 6th greedy token the end-of-sequence token.
    eos = reference[5]
    target.generation_config.eos_token_id = eos
    c = local_controller(LocalVerify(target), [LocalDraft("self", target)], eos_token_ids={eos}, max_new_tokens_limit=100)
    result = c.generate(request(PROMPTS[0], "tree", max_new_tokens=40))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 40) == reference[:6]
    assert result.finish_reason == "eos" and result.stop_reason is None


def test_stats_add_up(target, drafts):
    c = controller(target, [LocalDraft("truncated", drafts["truncated"]), LocalDraft("self", drafts["self"])])
    result = c.generate(request(PROMPTS[0], "tree", max_new_tokens=30, beam_width=2, beam_depth=4))
    s = result.stats
    assert s.mode == "tree" and s.prompt_tokens == len(PROMPTS[0])
    assert s.tokens_generated == len(result.token_ids) == 30
    assert s.rounds == s.to_pb().verification_calls == len(result.rounds)
    assert s.mean_accepted_per_round == pytest.approx(30 / s.rounds)
    assert s.draft_tokens_accepted == sum(len(r.accepted) for r in result.rounds)
    assert sum(len(r.new_tokens) for r in result.rounds) == 30
    assert s.bonus_tokens <= s.rounds
    assert s.tree_nodes_total == sum(r.tree_nodes for r in result.rounds)
    # Drafts keep their names; the model they serve is a field of its own.
    assert [(d.draft, d.model) for d in s.drafts] == [("truncated", "Qwen2ForCausalLM"), ("self", "Qwen2ForCausalLM")]
    assert s.draft_tokens_proposed == sum(d.proposed_tokens for d in s.drafts)
    assert all(d.accepted_tokens <= d.proposed_positions for d in s.drafts)
    # The target as its own draft is accepted in full: fewer rounds than tokens.
    assert s.draft("self").acceptance_rate > 0.9
    assert s.rounds < 30
    assert s.draft_ms + s.verify_ms + s.other_ms == pytest.approx(s.total_ms, rel=1e-6)


def test_failing_and_late_drafts_fall_back_with_identical_output(target, drafts):
    c = controller(target, [BrokenDraft(), SlowDraft("slow", drafts["self"])], draft_timeout_s=0.1)
    result = c.generate(request(PROMPTS[0], "sequential", max_new_tokens=6))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 6)
    assert all(r.fallback for r in result.rounds)
    assert "went away" in result.rounds[0].fallback_reason and "deadline" in result.rounds[0].fallback_reason
    # Named per draft (what the traces' specdec.draft_failed keys on), unlike a round not drafted by choice.
    for r in result.rounds:
        assert len(r.draft_failures) == (0 if "no room to draft" in r.fallback_reason else 2), r


def test_one_failing_draft_does_not_stop_the_others(target, drafts):
    c = controller(target, [BrokenDraft(), LocalDraft("self", drafts["self"])])
    result = c.generate(request(PROMPTS[0], "tree", max_new_tokens=12))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 12)
    assert not any(r.fallback for r in result.rounds)
    assert {r.winning_draft for r in result.rounds} == {"self"}
    # Not a fallback, but a failure the round records all the same.
    assert all(r.draft_failures and r.draft_failures[0].startswith("broken:") for r in result.rounds if r.proposals)


def test_stop_string_cuts_output(target, drafts):
    c = controller(target, [LocalDraft("self", drafts["self"])])
    full = c.generate(request(PROMPTS[0], "tree", max_new_tokens=20))
    tokenizer = tiny_tokenizer()
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = tokenizer.decode(full.token_ids[4:6], skip_special_tokens=True)
    assert stop
    result = c.generate(request(PROMPTS[0], "tree", max_new_tokens=20, stop=[stop]))
    assert result.finish_reason == "stop_string" and result.stop_reason == stop
    # Up to the first token whose text completes the stop string; the text is cut before it.
    n = next(n for n in range(1, 21) if stop in tokenizer.decode(full.token_ids[:n], skip_special_tokens=True))
    assert result.token_ids == full.token_ids[:n]
    assert result.text == full.text[: full.text.find(stop)]
    # The rounds' text is released as it completes and joins up to the output text.
    assert "".join(r.text for r in result.rounds) == result.text


def test_sessions_are_released_everywhere(target, drafts):
    verify, draft = LocalVerify(target), LocalDraft("self", drafts["self"])
    c = local_controller(verify, [draft], max_new_tokens_limit=100)
    c.generate(request(PROMPTS[0], "tree", max_new_tokens=10))
    deadline = time.monotonic() + 5
    while (len(verify.verifier.store) or len(draft.drafter.store)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(verify.verifier.store) == 0 and len(draft.drafter.store) == 0


class FlakyDraft(LocalDraft):
    """Fails its first ``fail`` calls, then drafts normally: a draft service restarted."""

    def __init__(self, name, model, fail):
        super().__init__(name, model)
        self.fail, self.calls = fail, 0

    def draft(self, *args):
        self.calls += 1
        if self.calls <= self.fail:
            raise ConnectionError("draft service restarting")
        return super().draft(*args)


def test_a_failed_draft_is_left_out_then_brought_back(target, drafts):
    from specdec.orchestrator.resilience import Backoff, DraftHealth

    flaky = FlakyDraft("flaky", drafts["self"], fail=2)
    c = controller(target, [flaky])
    # A clock that moves one tick each time it is read (about once a round), so the backoff spans
    # rounds whatever the machine's speed: 2 to 4 ticks.
    c.draft_health = DraftHealth(Backoff(initial_s=4, max_s=4), clock=itertools.count().__next__)
    result = c.generate(request(PROMPTS[0], "sequential", max_new_tokens=60, draft_length=2))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 60)
    # Left out between failures (fewer calls than rounds), and back: later rounds use its drafts.
    assert flaky.calls < len(result.rounds)
    backed_off = [i for i, r in enumerate(result.rounds) if "backing off" in r.fallback_reason]
    assert backed_off and all(any("backing off" in f for f in result.rounds[i].draft_failures) for i in backed_off)
    assert any(r.proposals and not r.fallback for r in result.rounds[backed_off[-1] + 1 :])


def test_cancelled_request_stops_and_releases_its_sessions(target, drafts):
    from specdec.errors import Cancelled

    verify, draft = LocalVerify(target), LocalDraft("self", drafts["self"])
    c = local_controller(verify, [draft], max_new_tokens_limit=100)
    rounds = []
    req = request(PROMPTS[0], "tree", max_new_tokens=60)
    stream = c.stream(req, CallContext(cancelled=lambda: len(rounds) >= 2))
    with pytest.raises(Cancelled):
        for record in stream:
            rounds.append(record)
    assert len(rounds) == 2
    deadline = time.monotonic() + 5
    while (len(verify.verifier.store) or len(draft.drafter.store)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(verify.verifier.store) == 0 and len(draft.drafter.store) == 0


def test_passed_deadline_stops_the_generation(target, drafts):
    from specdec.errors import DeadlineExceeded

    c = controller(target, [LocalDraft("self", drafts["self"])])
    with pytest.raises(DeadlineExceeded):
        c.generate(request(PROMPTS[0], "tree", max_new_tokens=10), CallContext(deadline=time.monotonic() - 1))


@pytest.mark.parametrize("mode", ["sequential", "tree"])
@pytest.mark.parametrize("draft_name", ["self", "stranger", "truncated"])
def test_adaptive_depth_is_lossless_and_follows_acceptance(target, drafts, mode, draft_name):
    c = controller(target, [LocalDraft(draft_name, drafts[draft_name])])
    result = c.generate(request(PROMPTS[0], mode, max_new_tokens=40, draft_length=6, beam_depth=6, adaptive=True))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 40)
    lengths = [max(len(b) for beams in r.proposals.values() for b in beams) for r in result.rounds if r.proposals]
    assert max(lengths) <= 6
    if draft_name == "stranger":  # rarely agrees: speculation stops but for one-token probes
        assert lengths[-1] == 1 and len(lengths) < len(result.rounds)
    if draft_name == "self" and mode == "sequential":  # always agrees: drafts grow to the full length and stay
        # (Not in tree mode: beam search's best beam need not be the greedy path.)
        assert lengths[1:-1] == [6] * (len(lengths) - 2)


@pytest.mark.parametrize("mode", ["sequential", "tree"])
def test_fixed_settings_are_kept_every_round(target, drafts, mode):
    c = controller(target, [LocalDraft("stranger", drafts["stranger"])])
    result = c.generate(request(PROMPTS[0], mode, max_new_tokens=30, draft_length=3, beam_width=2, beam_depth=3, adaptive=False))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 30)
    shapes, done = set(), 0
    for r in result.rounds:
        if 30 - done > 3:  # room for a full draft before the budget
            shapes |= {(len(beams), max(map(len, beams))) for beams in r.proposals.values()}
        done += len(r.new_tokens)
    assert shapes == {(1 if mode == "sequential" else 2, 3)}


def test_tree_mode_picks_by_measured_cost(target, drafts):
    from specdec.cost import CostCurve, RoundCosts

    flat = RoundCosts(CostCurve.of([(1, 100), (64, 101)]), {"self": CostCurve.of([(1, 1), (16, 1)])})
    steep = RoundCosts(CostCurve.of([(1, 100), (2, 200), (64, 6400)]), {"self": CostCurve.of([(1, 1), (16, 1)])})
    for costs, wide in [(flat, True), (steep, False)]:
        c = controller(target, [LocalDraft("self", drafts["self"])], costs=costs)
        result = c.generate(request(PROMPTS[0], "tree", max_new_tokens=30, draft_length=2, beam_width=3, beam_depth=5, adaptive=True))
        assert result.token_ids == reference_greedy(target, PROMPTS[0], 30)
        widths = [len(beams) for r in result.rounds for beams in r.proposals.values()]
        assert (max(widths) == 3) is wide and (wide or set(widths) == {1})


@pytest.mark.parametrize("mode", ["sequential", "tree"])
def test_limited_draft_vocabulary_is_lossless(target, drafts, mode):
    draft = LocalDraft("truncated", drafts["truncated"], vocab_limit=VOCAB // 3)
    result = controller(target, [draft]).generate(request(PROMPTS[0], mode, max_new_tokens=30, adaptive=True))
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 30)


def test_rounds_release_text_as_it_completes(target, drafts):
    c = controller(target, [LocalDraft("truncated", drafts["truncated"])])
    result = c.generate(request(PROMPTS[0], "tree", max_new_tokens=30, stop=["never-there"]))
    assert result.text == tiny_tokenizer().decode(result.token_ids, skip_special_tokens=True)
    released = "".join(r.text for r in result.rounds)
    # A tail that may begin the stop string waits; the rest comes with the end of the generation.
    assert result.text.startswith(released) and len(result.text) - len(released) < len("never-there")


def test_speculation_limits_come_from_the_settings(target):
    limits = Limits(vocab_size=VOCAB, max_context=512, max_new_tokens_limit=100, eos_token_ids=frozenset(),
                    speculation=SpeculationLimits(max_beam_width=2, max_beam_depth=3, max_tree_nodes_limit=10))
    c = SpeculativeController(LocalVerify(target), [], limits, detokenizer=None)
    c.check(request(PROMPTS[0], "tree", draft_length=3, beam_width=2, beam_depth=3, max_tree_nodes=10))
    for field, value in [("draft_length", 4), ("beam_width", 3), ("beam_depth", 4), ("max_tree_nodes", 11)]:
        with pytest.raises(InvalidRequest, match=f"speculation.{field}"):
            c.check(request(PROMPTS[0], "tree", **{"draft_length": 3, "beam_width": 2, "beam_depth": 3, "max_tree_nodes": 10, field: value}))
    with pytest.raises(InvalidRequest, match="mode 'beam'"):
        c.check(request(PROMPTS[0], "beam"))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("draft_names", [[], ["stranger"]])
def test_prompt_lookup_is_lossless_and_only_where_asked(target, drafts, draft_names, adaptive):
    """A prompt that repeats: the lookup's chains are accepted, the output is the target's own, and
    a controller without the lookup proposes none."""
    from specdec.lookup import NAME, PromptLookup

    prompt = [11, 40, 3, 77, 25, 60, 8] * 3 + [11, 40]
    want = reference_greedy(target, prompt, 24)
    clients = [LocalDraft(n, drafts[n]) for n in draft_names]
    looked = controller(target, clients, lookup=PromptLookup()).generate(request(prompt, "tree", adaptive=adaptive))
    assert looked.token_ids == want
    (stats,) = [d for d in looked.stats.drafts if d.draft == NAME]
    assert stats.proposed_tokens > 0 and all(NAME in r.proposals for r in looked.rounds[:1])
    plain = controller(target, clients).generate(request(prompt, "tree", adaptive=adaptive))
    assert plain.token_ids == want
    assert not any(NAME in r.proposals for r in plain.rounds) and all(d.draft != NAME for d in plain.stats.drafts)


def test_drafts_read_a_long_prompt_while_the_target_does(target, drafts):
    """With costs where reading a long prompt is dear, the first round leaves the model draft out
    and the draft reads the prompt meanwhile; the next rounds draft as usual, and the output is the
    target's own."""
    from specdec.cost import CostCurve, RoundCosts

    verify = CostCurve.of([(1, 200), (16, 230), (64, 600), (256, 2400)])
    draft = CostCurve.of([(1, 60), (16, 70), (64, 250), (256, 1000)])
    prompt = list(range(20, 50)) * 4
    c = controller(target, [LocalDraft("self", drafts["self"])], costs=RoundCosts(verify, {"self": draft}))
    result = c.generate(request(prompt, "tree", adaptive=True))
    assert result.token_ids == reference_greedy(target, prompt, 24)
    first, *rest = result.rounds
    assert not first.proposals and "read the prompt" in first.fallback_reason
    assert any("self" in r.proposals for r in rest)


def test_a_prediction_proposes_and_changes_no_output(target, drafts):
    """Predicted Outputs: the answer's own text as the prediction is accepted in long runs (the
    usage counts them), with no draft model and prompt lookup off; the output is the target's."""
    want = reference_greedy(target, PROMPTS[0], 30)
    c = controller(target, [])
    plain = c.generate(request(PROMPTS[0], "sequential", max_new_tokens=30, draft_length=8))
    predicted = c.generate(request(PROMPTS[0], "sequential", max_new_tokens=30, draft_length=8, prediction_ids=want[3:]))
    assert plain.token_ids == predicted.token_ids == want
    (stats,) = [d for d in predicted.stats.drafts if d.draft == "prediction"]
    assert stats.accepted_tokens >= 15 and predicted.stats.rounds < plain.stats.rounds
    # A prediction that is wrong everywhere still changes nothing.
    wrong = c.generate(request(PROMPTS[0], "sequential", max_new_tokens=30, draft_length=8, prediction_ids=[(t + 1) % 50 for t in want]))
    assert wrong.token_ids == plain.token_ids


@pytest.mark.parametrize("kind", ["exact", "partly-wrong", "insertion", "deletion", "empty", "longer", "other-script"])
def test_any_prediction_leaves_the_output_unchanged(target, kind):
    """Lossless with every prediction: exact, partly wrong, shifted by an insertion or a deletion
    (it re-aligns further on), empty, longer than the answer, or tokens of another script."""
    want = reference_greedy(target, PROMPTS[1], 30)
    prediction = {
        "exact": want,
        "partly-wrong": want[:10] + [(t + 7) % VOCAB for t in want[10:15]] + want[15:],
        "insertion": want[:8] + [3, 4, 5] + want[8:],
        "deletion": want[:8] + want[12:],
        "empty": [],
        "longer": want + want[::-1] * 3,
        "other-script": [(t * 31 + 5) % VOCAB for t in want],
    }[kind]
    result = controller(target, []).generate(request(PROMPTS[1], "tree", max_new_tokens=30, draft_length=6, beam_depth=6,
                                                     prediction_ids=prediction))
    assert result.token_ids == want
    if kind in ("exact", "insertion", "deletion", "longer"):
        (stats,) = [d for d in result.stats.drafts if d.draft == "prediction"]
        assert stats.accepted_tokens >= 10  # it re-aligned after the edited spot

