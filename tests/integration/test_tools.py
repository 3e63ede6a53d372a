"""Tools on the chat route over the session's tiny cluster: the tools rendered by the chat template,
a required or named tool_choice constraining the output to calls whose arguments follow the
function's schema (the same in every speculation mode, whole or streamed), tool_choice none, earlier
calls and tool results passed back to the template, and a clear 400 for what cannot be used."""

from __future__ import annotations

import json

import pytest

from specdec.orchestrator import http_api
from test_http_api import assert_error, events, raw

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                             "parameters": {"type": "object", "additionalProperties": False,
                                                            "required": ["city", "days"],
                                                            "properties": {"city": {"type": "string", "maxLength": 6},
                                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: a function of none
MESSAGES = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def base_url(tiny_cluster) -> str:
    return tiny_cluster.http_url


def chat(base_url, **fields):
    return raw(base_url, http_api.CHAT, {"messages": MESSAGES, "max_tokens": 150, "temperature": 0, **fields})


def calls_of(body) -> list[tuple[str, dict]]:
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]]


def test_a_named_tool_is_called_with_arguments_that_follow_its_schema(base_url):
    named = {"type": "function", "function": {"name": "get_weather"}}
    bodies = {}
    for mode in ("autoregressive", "tree"):
        status, _, bodies[mode] = chat(base_url, tools=[WEATHER, TIME], tool_choice=named, parallel_tool_calls=False, mode=mode)
        assert status == 200, bodies[mode]
    calls = calls_of(bodies["tree"])
    assert calls == calls_of(bodies["autoregressive"])
    ((name, arguments),) = calls
    assert name == "get_weather" and set(arguments) == {"city", "days"} and 1 <= arguments["days"] <= 7
    assert bodies["tree"]["choices"][0]["message"]["tool_calls"][0]["id"].startswith("call_")


def test_required_calls_one_of_the_tools_and_streams_the_same(base_url):
    status, _, whole = chat(base_url, tools=[WEATHER, TIME], tool_choice="required", mode="tree")
    assert status == 200, whole
    calls = calls_of(whole)
    assert calls and all(name in ("get_weather", "get_time") for name, _ in calls)
    status, _, text = chat(base_url, tools=[WEATHER, TIME], tool_choice="required", mode="tree", stream=True)
    assert status == 200
    chunks = [c for c in events(text) if c != "[DONE]"]
    final = chunks[-1]["choices"][0]
    assert final["finish_reason"] == "tool_calls"
    streamed = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in final["delta"]["tool_calls"]]
    assert streamed == calls and [c["index"] for c in final["delta"]["tool_calls"]] == list(range(len(calls)))
    # Nothing of the calls' own text went out as content.
    assert not "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip()


def test_tools_reach_the_template_and_none_leaves_them_out(base_url):
    def prompt(**fields):
        status, _, body = chat(base_url, max_tokens=1, return_token_ids=True, **fields)
        assert status == 200, body
        return body["prompt_token_ids"]

    plain = prompt()
    assert prompt(tools=[WEATHER], tool_choice="none") == plain
    assert len(prompt(tools=[WEATHER])) > len(plain)  # auto: rendered ("<tools>get_weather;</tools>")


def test_earlier_calls_and_their_results_go_back_to_the_template(base_url):
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    status, _, body = raw(base_url, http_api.CHAT, {"messages": history, "tools": [WEATHER], "max_tokens": 4, "temperature": 0})
    assert status == 200, body


@pytest.mark.parametrize("fields, param, words", [
    ({"tools": [{"type": "function"}]}, "tools", ["tools[0]"]),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", ["name"]),
    ({"tools": [WEATHER, WEATHER]}, "tools", ["second function"]),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", ["nope"]),
    ({"tool_choice": "required"}, "tool_choice", ["no tools"]),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", ["required"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}], "tool_choice": "required"},
     "tools", ["cannot be used"]),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", ["already"]),
    ({"functions": [{"name": "f"}]}, "functions", ["tools"]),
])
def test_tools_that_cannot_be_used_are_400(base_url, fields, param, words):
    assert_error(chat(base_url, **fields), 400, *words, param=param)
