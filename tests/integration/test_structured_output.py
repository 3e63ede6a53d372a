"""Structured output through both doors of the session's tiny cluster (real processes on loopback):
OpenAI's ``response_format`` and vLLM's ``guided_*`` over HTTP, ``processing.grammar`` over gRPC.
Every speculation mode gives the autoregressive mode's output under the same grammar, the output is
in the grammar's language, and a grammar that cannot be used is a clear 400 / INVALID_ARGUMENT with
the server unharmed."""

from __future__ import annotations

import json
import re

import grpc
import pytest

from specdec.orchestrator import http_api
from specdec.v1 import common_pb2, generation_pb2
from test_http_api import assert_error, grpc_generate, raw
from test_services_grpc import AR, SEQ, TREE

PROMPT = "def hello(x):"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"type": "string", "maxLength": 4}}}
MODES = ("autoregressive", "sequential", "tree")


@pytest.fixture(scope="module")
def base_url(tiny_cluster) -> str:
    return tiny_cluster.http_url


def complete(base_url, **fields) -> dict:
    status, _, body = raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, **fields})
    assert status == 200, body
    return body["choices"][0]


def test_a_json_schema_is_followed_alike_in_every_mode(base_url):
    response_format = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}}
    choices = {mode: complete(base_url, mode=mode, response_format=response_format) for mode in MODES}
    assert len({c["text"] for c in choices.values()}) == 1, choices
    choice = choices["tree"]
    if choice["finish_reason"] == "stop":  # complete within max_tokens: the whole object
        assert set(json.loads(choice["text"])) == {"id", "tag"}
    else:  # (the tiny tokenizer's space is its unknown token, which the text leaves out)
        assert choice["text"].startswith('{"id":')


def test_json_mode_and_vllm_guided_fields(base_url):
    text = complete(base_url, mode="tree", response_format={"type": "json_object"})["text"]
    assert text.startswith("{")
    choice = complete(base_url, mode="tree", guided_choice=["yes", "no", "maybe"])
    assert choice["text"] in ("yes", "no", "maybe") and choice["finish_reason"] == "stop"
    regex = r"[a-f]{2,4}-[0-9]{3}"
    texts = {mode: complete(base_url, mode=mode, guided_regex=regex)["text"] for mode in MODES}
    assert len(set(texts.values())) == 1 and re.fullmatch(regex, texts["tree"]), texts
    status, _, body = raw(base_url, http_api.CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
                                                    "temperature": 0, "guided_json": SCHEMA})
    assert status == 200 and body["choices"][0]["message"]["content"].startswith('{"id":'), body


def test_a_grammar_over_grpc_equals_autoregressive(grpc_stubs):
    processing = common_pb2.LogitsProcessing(grammar_kind="regex", grammar=r"[a-f]{2,4}-[0-9]{3}")
    replies = {mode: grpc_generate(grpc_stubs, prompt=PROMPT, max_new_tokens=20, mode=mode, processing=processing)
               for mode in (AR, SEQ, TREE)}
    assert len({tuple(r.token_ids) for r in replies.values()}) == 1
    assert re.fullmatch(r"[a-f]{2,4}-[0-9]{3}", replies[TREE].text)
    with pytest.raises(grpc.RpcError) as refused:
        grpc_generate(grpc_stubs, prompt=PROMPT, max_new_tokens=5,
                      processing=common_pb2.LogitsProcessing(grammar_kind="json_schema", grammar="{not json"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be compiled" in refused.value.details()


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}}, None, ["cannot be compiled"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", ["json_schema.schema"]),
    ({"response_format": {"type": "xml"}}, "response_format", ["xml"]),
    ({"guided_regex": "(unclosed"}, None, ["cannot be compiled"]),
    ({"guided_choice": []}, "guided_choice", ["empty"]),
    ({"guided_regex": "a+", "guided_json": {"type": "object"}}, "guided_regex", ["at most one"]),
])
def test_a_grammar_that_cannot_be_used_is_400_and_the_server_goes_on(base_url, fields, param, words):
    reply = raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 5, **fields})
    assert_error(reply, 400, *words, **({"param": param} if param else {}))
    assert complete(base_url, max_tokens=3)["text"] is not None
