"""The generation's parameters (specdec.generation): one constructor checks every field, and a bad
value gets the same words through the gRPC door and the HTTP door, which both build them."""

from __future__ import annotations

import dataclasses

import pytest

from specdec import config
from specdec.errors import InvalidRequest
from specdec.generation import CallContext, GenerationParams, Speculation, request_id
from specdec.orchestrator.generations import Generations
from specdec.orchestrator.http_schemas import CompletionBody, completion_prompt, generation_params, parse_body
from specdec.orchestrator.server import params_of
from specdec.records import DecodingMode
from specdec.v1 import common_pb2, generation_pb2
from tiny_models import EOS, VOCAB, tiny_tokenizer

MAX_CONTEXT = 512


@pytest.mark.parametrize("fields, words", [
    ({}, "prompt is empty"),
    ({"prompt": "a", "prompt_ids": [1]}, "set one of prompt and prompt_token_ids"),
    ({"prompt": "a", "max_new_tokens": -1}, "max_new_tokens = -1"),
    ({"prompt": "a", "mode": "fast"}, "mode 'fast' is not one of"),
    ({"prompt": "a", "speculation": {"beam_width": -2}}, "speculation.beam_width = -2"),
    ({"prompt": "a", "sampling": {"temperature": float("nan")}}, "sampling.temperature = nan"),
    ({"prompt": "a", "sampling": {"temperature": -1.0}}, "sampling.temperature = -1.0 must be >= 0"),
    ({"prompt": "a", "sampling": {"top_p": 1.5}}, "sampling.top_p = 1.5 must be in [0, 1]"),
    ({"prompt": "a", "sampling": {"top_k": -3}}, "sampling.top_k = -3"),
    ({"prompt": "a", "sampling": {"seed": 1 << 64}}, "sampling.seed"),
    ({"prompt": "a", "stop": ["x"] * 17}, "stop has 17 strings; at most 16"),
    ({"prompt": "a", "stop": ["ok", ""]}, "stop[1] is empty"),
    ({"prompt": "a", "stop": ["y" * 1025]}, "stop[0] has 1025 characters"),
    ({"prompt": "a", "stop_token_ids": [1] * 65}, "stop_token_ids count = 65"),
    ({"prompt": "a", "top_logprobs": 21, "logprobs": True}, "top_logprobs = 21"),
    ({"prompt": "a", "top_logprobs": 2}, "top_logprobs needs logprobs = true"),
    ({"prompt": "a", "prediction": "b", "prediction_ids": [1]}, "set one of prediction and prediction_token_ids"),
    ({"prompt": "a", "bad_words": ["x"] * 65}, "bad_words count = 65"),
    ({"prompt": "a", "bad_words": [""]}, "bad_words[0]"),
    ({"prompt_ids": [1, 2], "suffix": "x"}, "suffix needs the prompt as text"),
])
def test_every_bad_field_is_one_clear_error(fields, words):
    with pytest.raises(InvalidRequest) as error:
        GenerationParams.of(**fields)
    assert words in str(error.value)


def test_params_are_immutable_and_resolve_once():
    params = GenerationParams.of(prompt_ids=[1, 2, 3], speculation={"beam_width": 3}, stop=["\n"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_new_tokens = 5  # type: ignore[misc]
    defaults = config.from_env(config.OrchestratorSettings, environ={})
    resolved = params.resolved([1, 2, 3], defaults, 16)
    assert resolved.mode == DecodingMode(defaults.mode) and resolved.max_new_tokens == 16
    assert resolved.speculation == Speculation(defaults.draft_length, 3, defaults.beam_depth, defaults.max_tree_nodes, defaults.adaptive)
    assert params.mode is None and params.speculation.draft_length == 0  # the request as asked, unchanged
    summary = resolved.summary()
    assert summary["prompt_tokens"] == 3 and summary["beam_width"] == 3 and summary["stop"] == ["\n"]


def test_the_call_is_apart_from_the_params():
    assert request_id("abc") == "abc" and request_id().startswith("req-")
    with pytest.raises(InvalidRequest, match="request_id"):
        request_id("x" * 200)
    assert CallContext().request_id != CallContext().request_id
    assert CallContext(deadline=None).left(0) is None


@pytest.fixture(scope="module")
def generations():
    settings = config.from_env(config.OrchestratorSettings, environ={}, log_dir="", target_model="tiny")
    info = common_pb2.ModelInfo(model="tiny", vocab_size=VOCAB, max_context=MAX_CONTEXT, eos_token_ids=[EOS])
    return Generations(settings, tiny_tokenizer(), None, [], info)


# (gRPC GenerateRequest fields, the same request as an OpenAI completions body)
SAME_BAD_REQUEST = [
    ({"max_new_tokens": 5000}, {"max_tokens": 5000}),
    ({"sampling": {"temperature": -1.0}}, {"temperature": -1.0}),
    ({"sampling": {"temperature": 1.0, "top_p": 1.5}}, {"top_p": 1.5}),
    ({"stop": ["x"] * 17}, {"stop": ["x"] * 17}),
    ({"stop": [""]}, {"stop": [""]}),
    ({"stop_token_ids": [VOCAB]}, {"stop_token_ids": [VOCAB]}),
    ({"speculation": {"beam_width": 99}}, {"speculation": {"beam_width": 99}}),
    ({"prompt": "", "prompt_token_ids": [5, -1, 6]}, {"prompt": [5, -1, 6]}),
    ({"prompt": "", "prompt_token_ids": [3] * MAX_CONTEXT}, {"prompt": [3] * MAX_CONTEXT}),
    ({"prediction": "ab" * 5000}, {"prediction": {"type": "content", "content": "ab" * 5000}}),
    ({"processing": {"presence_penalty": 2.5}}, {"presence_penalty": 2.5}),
    ({"processing": {"logit_bias": {VOCAB: 1.0}}}, {"logit_bias": {str(VOCAB): 1.0}}),
    ({"processing": {"repetition_penalty": 200.0}}, {"repetition_penalty": 200.0}),
    ({"suffix": "return x"}, {"suffix": "return x"}),  # the tiny model has no fill-in-the-middle tokens
]


@pytest.mark.parametrize("grpc_fields, body", SAME_BAD_REQUEST)
def test_a_bad_value_has_the_same_words_through_both_doors(generations, grpc_fields, body):
    def grpc_door():
        request = generation_pb2.GenerateRequest(**({"prompt": "def f(x):", "max_new_tokens": 8} | grpc_fields))
        generations.resolve(params_of(request, MAX_CONTEXT))

    def http_door():
        parsed = parse_body(CompletionBody, {"prompt": "def f(x):", "max_tokens": 8, "temperature": 0} | body)
        generations.resolve(generation_params(parsed, completion_prompt(parsed), False, 0, parsed.max_tokens))

    words = []
    for door in (grpc_door, http_door):
        with pytest.raises(InvalidRequest) as error:
            door()
        words.append(str(error.value))
    assert words[0] == words[1]


def test_fill_in_the_middle_frames_the_prompt_with_the_models_tokens(generations):
    import types

    fim = types.SimpleNamespace(get_vocab=lambda: {"<|fim_prefix|>": 1, "<|fim_suffix|>": 2, "<|fim_middle|>": 3})
    framed = Generations.fill_in_the_middle(types.SimpleNamespace(tokenizer=fim), "def f(x):\n", "\n    return y\n")
    assert framed == "<|fim_prefix|>def f(x):\n<|fim_suffix|>\n    return y\n<|fim_middle|>"
    with pytest.raises(InvalidRequest, match="no fill-in-the-middle tokens"):
        generations.fill_in_the_middle("a", "b")



def test_unknown_http_fields_are_named_unless_the_operator_lets_them_through():
    """OpenAI answers an unrecognized argument with a 400; so does the HTTP door, naming every one
    (nested ones dotted), unless --http-ignore-unknown-fields. A message's extra fields are the chat
    template's, never refused."""
    from specdec.orchestrator.http_responses import ApiError
    from specdec.orchestrator.http_schemas import ChatBody, refuse_unsupported, unknown_fields

    body = parse_body(CompletionBody, {"prompt": "a", "temprature": 0.5, "speculation": {"beams": 2}, "store": True})
    assert unknown_fields(body) == ["temprature", "speculation.beams"]
    with pytest.raises(ApiError) as error:
        refuse_unsupported(body)
    assert error.value.status == 400 and error.value.param == "temprature"
    assert "temprature, speculation.beams" in str(error.value) and "--http-ignore-unknown-fields" in str(error.value)
    refuse_unsupported(body, ignore_unknown=True)  # let through: nothing refused
    chat = parse_body(ChatBody, {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}],
                                 "metadata": {"a": "b"}, "service_tier": "auto", "parallel_tool_calls": False})
    assert unknown_fields(chat) == []
    refuse_unsupported(chat)
