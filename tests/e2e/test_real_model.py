"""End to end on the real Qwen2.5-Coder-0.5B-Instruct as the target, through real services, over
gRPC and over the OpenAI-compatible HTTP API (with the model's own chat template).

The draft is a layer-truncated copy of the target (same vocabulary, cheaper, sometimes right), so the
test exercises acceptance, corrections and cache compaction on real weights. The model is fetched
once into the model directory (SPECDEC_MODEL_DIR) on first use.
"""

import grpc
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.tools.cluster import LocalCluster, free_port
from specdec import config
from specdec.model_store import fetch
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tiny_models import reference_greedy, truncated_copy

pytestmark = pytest.mark.slow
MODEL = "qwen2.5-coder-0.5b-instruct"
PROMPT = "def is_prime(n):\n    "
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def target_dir():
    return fetch(MODEL)


@pytest.fixture(scope="module")
def reference(target_dir):
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    prompt_ids = tokenizer(PROMPT).input_ids
    return prompt_ids, reference_greedy(model.eval(), prompt_ids, NEW_TOKENS), model


@pytest.fixture(scope="module")
def cluster(target_dir, reference, tmp_path_factory):
    draft_dir = tmp_path_factory.mktemp("draft")
    # 16 of 24 layers: the first 12 and the last 4.
    truncated_copy(reference[2], [*range(12), *range(20, 24)]).save_pretrained(draft_dir)
    AutoTokenizer.from_pretrained(target_dir).save_pretrained(draft_dir)
    settings = config.from_env(
        config.ClusterSettings, target_model=MODEL, draft_models=[str(draft_dir)], port=0, http_port=free_port(),
        log_dir=str(tmp_path_factory.mktemp("logs")), startup_timeout_s=300,
        # The settings as asked: a 16-layer draft costs most of a target step, so the cost model
        # would rightly stop drafting, and this test is about acceptance on real weights.
        adaptive=False,
    )
    with LocalCluster(settings) as running:
        yield running


@pytest.mark.parametrize(
    "mode, speculation",
    [
        (generation_pb2.DECODING_MODE_SEQUENTIAL, generation_pb2.SpeculationParams(draft_length=5)),
        (generation_pb2.DECODING_MODE_TREE, generation_pb2.SpeculationParams(beam_width=3, beam_depth=4)),
    ],
)
def test_real_model_output_equals_target_generate(cluster, reference, mode, speculation):
    prompt_ids, expected, _ = reference
    with grpc.insecure_channel(cluster.orchestrator_address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        by_ids = stub.Generate(generation_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids, max_new_tokens=NEW_TOKENS, mode=mode, speculation=speculation), timeout=600)
        by_text = stub.Generate(generation_pb2.GenerateRequest(
            prompt=PROMPT, max_new_tokens=NEW_TOKENS, mode=mode, speculation=speculation), timeout=600)
    assert list(by_ids.token_ids) == expected
    assert list(by_text.token_ids) == expected
    stats = by_ids.stats
    assert stats.draft_tokens_accepted > 0, "a layer-truncated copy should be right some of the time"
    assert stats.rounds < NEW_TOKENS


MESSAGES = [{"role": "user", "content": "Write a Python function is_even(n)."}]


def test_chat_over_http_equals_grpc(cluster, target_dir):
    """A chat request through HTTP (the official openai package) gives the gRPC API's tokens for the
    same prompt, streamed or not, with the target's own chat template."""
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
    ask = dict(messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
    with openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(model=model, **ask)
        streamed = list(client.chat.completions.create(model=model, stream=True, **ask))
    with grpc.insecure_channel(cluster.orchestrator_address) as channel:
        reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generation_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=12), timeout=600)
    assert chat.prompt_token_ids == prompt_ids
    assert chat.choices[0].token_ids == list(reply.token_ids)
    assert chat.choices[0].message.content == reply.text
    assert [t for c in streamed if c.choices for t in c.choices[0].token_ids or []] == list(reply.token_ids)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.text
    assert chat.usage.completion_tokens == len(reply.token_ids)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "year"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": {"type": "object", "required": ["city"],
                                                            "properties": {"city": {"type": "string", "maxLength": 24}}}}}


def test_structured_output_and_a_named_tool_on_real_weights(cluster):
    """A JSON schema and a forced tool call with the model's own chat template: the same in every
    mode, the JSON parses to the schema, the call's arguments to the function's."""
    import json

    def ask(mode, **fields):
        with openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
            return client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=48, temperature=0,
                                                  extra_body={"mode": mode}, **fields)

    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "language", "schema": SCHEMA}},
              "messages": [{"role": "user", "content": "Name a programming language and the year it appeared, as JSON."}]}
    answers = {mode: ask(mode, **schema).choices[0].message.content for mode in ("autoregressive", "tree")}
    assert answers["tree"] == answers["autoregressive"]
    assert set(json.loads(answers["tree"])) == {"name", "year"}
    tool = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False,
            "messages": [{"role": "user", "content": "Is it raining in Paris?"}]}
    calls = {mode: ask(mode, **tool).choices[0] for mode in ("autoregressive", "tree")}
    assert calls["tree"].finish_reason == "tool_calls"
    (call,) = calls["tree"].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    assert [c.function.arguments for c in calls["autoregressive"].message.tool_calls] == [call.function.arguments]
