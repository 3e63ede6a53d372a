"""Structured output (specdec.grammar): grammars compiled or refused in one line, the mask at a place
as the grammar allows it, and speculation exact under a grammar: every mode's output is the
target's own one-token decoding with the same mask, greedy and seeded, with the drafts masked too
and what the grammar forces proposed as a free chain."""

from __future__ import annotations

import json
import re

import pytest
import torch

from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.errors import InvalidRequest
from specdec.grammar import Grammar, Grammars, mask_scores
from specdec.lookup import GRAMMAR
from specdec.processors import Processing
from specdec.sampling import SamplingParams, pick, warp_logits
from tiny_models import EOS, VOCAB, tiny_qwen2, tiny_tokenizer, truncated_copy

PROMPT = [11, 40, 3, 77, 25, 60, 8]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"type": "string", "maxLength": 4}}}
GRAMMARS = {
    "json_schema": Grammar("json_schema", json.dumps(SCHEMA)),
    "regex": Grammar("regex", r"[a-f]{2,4}-[0-9]{3}"),
    "choice": Grammar("lark", 'start: "yes" | "no" | "maybe"'),
    "json_object": Grammar("json_object"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, VOCAB, [EOS])


@pytest.mark.parametrize("grammar, words", [
    (lambda: Grammar("yaml", "a: 1"), "must be one of"),
    (lambda: Grammar("regex", ""), "empty"),
    (lambda: Grammar("regex", "x" * (64 * 1024 + 1)), "at most"),
    (lambda: Grammar("json_schema", "{not json").llguidance(), "cannot be compiled"),
    (lambda: Grammar("json_schema", '{"type": "objectx"}').llguidance(), "cannot be compiled"),
    (lambda: Grammar("regex", "(unclosed").llguidance(), "cannot be compiled"),
    (lambda: Grammar("lark", "start: undefined_rule").llguidance(), "cannot be compiled"),
])
def test_a_grammar_that_cannot_be_used_is_refused_in_one_line(grammar, words):
    with pytest.raises(InvalidRequest, match=words):
        grammar()


def test_the_mask_is_what_the_grammar_allows_at_that_place(grammars, tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    def allowed(state, text):
        mask = state.allowed(ids(text))
        return None if mask is None else {tokenizer.decode([t]) if t != EOS else "<eos>" for t in mask.nonzero().flatten().tolist()}

    state = grammars.state(GRAMMARS["regex"])
    assert allowed(state, "") == set("abcdef")
    assert allowed(state, "ab") == set("abcdef-")
    assert allowed(state, "abcd") == {"-"}
    assert allowed(state, "ab-123") == {"<eos>"}  # complete: only the end
    assert allowed(state, "ab-1x") is None  # a path the grammar refuses: no answer needed there
    # The state moves between branches by rolling back: the order places are visited in changes nothing.
    assert allowed(state, "ab") == set("abcdef-") and allowed(state, "a") == set("abcdef")
    json_state = grammars.state(GRAMMARS["json_schema"])
    assert tokenizer.decode(json_state.forced([])) == '{"id": '  # fixed separators: keys and punctuation are forced
    assert tokenizer.decode(json_state.forced(ids('{"id": 12, '))) == '"tag": "'
    scores = mask_scores(torch.zeros(VOCAB), state.allowed(ids("abcd")))
    assert torch.isfinite(scores).sum() == 1 and scores[ids("-")[0]] == 0


@pytest.fixture(scope="module")
def target():
    return tiny_qwen2(seed=0, layers=2, sharpness=2.0)


def one_token_decoding(model, grammars, grammar: Grammar, sampling: SamplingParams, n: int) -> list[int]:
    """The target alone, one token at a time, masked by the grammar and drawn as the verify service does."""
    state, out = grammars.state(grammar), []
    with torch.inference_mode():
        while len(out) < n:
            history = PROMPT + out
            scores = mask_scores(model(torch.tensor([history])).logits[0, -1].float(), state.allowed(out))
            token = int(scores.argmax()) if sampling.greedy else pick(warp_logits(scores, sampling), sampling.seed, len(history))
            out.append(token)
            if token == EOS:
                break
    return out


def matches(grammar: Grammar, text: str) -> bool:
    if grammar.kind in ("json_schema", "json_object"):
        value = json.loads(text)
        return isinstance(value, dict) and (grammar.kind == "json_object" or set(value) == {"id", "tag"})
    if grammar.kind == "regex":
        return re.fullmatch(grammar.spec, text) is not None
    return text in ("yes", "no", "maybe")


@pytest.mark.parametrize("name", GRAMMARS)
@pytest.mark.parametrize("mode, spec", [("sequential", {"draft_length": 4}), ("tree", {"beam_width": 2, "beam_depth": 3}),
                                        ("tree", {"adaptive": True})])
def test_speculation_is_exact_under_a_grammar(target, grammars, tokenizer, name, mode, spec):
    grammar = GRAMMARS[name]
    drafts = [LocalDraft("truncated", truncated_copy(target, 1), grammars=grammars), LocalDraft("self", target, grammars=grammars)]
    controller = local_controller(LocalVerify(target, grammars=grammars), drafts, eos_token_ids={EOS}, grammars=grammars)
    processing = Processing(grammar=grammar, eos_token_ids=(EOS,))
    accepted, forced = 0, 0
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0, top_k=10, seed=5)):
        want = one_token_decoding(target, grammars, grammar, sampling, 40)
        result = controller.generate(params(PROMPT, 40, mode, sampling=sampling, processing=processing, **spec))
        assert result.token_ids == want, (mode, spec, sampling)
        if result.finish_reason == "eos":  # a grammar completed within 40 tokens: the output is in its language
            assert matches(grammar, tokenizer.decode(result.token_ids[:-1])), tokenizer.decode(result.token_ids)
        accepted += result.stats.draft_tokens_accepted
        forced += sum(len(r.proposals.get(GRAMMAR, [[]])[0]) for r in result.rounds)
    if not spec.get("adaptive"):
        assert accepted > 0, "no draft token was accepted: the test would not exercise the tree"
    if name == "json_schema":
        assert forced > 0, "the schema's keys and punctuation should have been proposed as forced tokens"


def test_tool_calls_are_parsed_out_of_the_text_and_held_back_while_streaming():
    from specdec.orchestrator.http_tools import held_back, parse_calls

    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_calls(text)
    assert content == "Let me check." and [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert parse_calls("no call") == ("no call", [])
    assert parse_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert held_back("Let me check.\n<tool_") == len("Let me check.\n")  # may be a call beginning
    assert held_back(text) == text.index("<tool_call>") and held_back("plain <b>") == len("plain <b>")
