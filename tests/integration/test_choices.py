"""Several choices from one HTTP request over the session's tiny cluster: ``n`` (whole and
streamed), completions' ``best_of`` (the n most likely of best_of) and ``echo``. Each choice is a
generation of its own: greedy choices are the one greedy output, seeded ones replay choice by choice
(seed + index), and the usage counts the prompt once."""

from __future__ import annotations

import json

import pytest

from specdec.orchestrator import http_api
from test_http_api import events, raw

PROMPT = "def hello(x):"


@pytest.fixture(scope="module")
def base_url(tiny_cluster) -> str:
    return tiny_cluster.http_url


def post(base_url, path=http_api.COMPLETIONS, **fields) -> dict:
    status, _, body = raw(base_url, path, {"max_tokens": 8, **({"prompt": PROMPT} if path == http_api.COMPLETIONS else
                                                                 {"messages": [{"role": "user", "content": "hi"}]}), **fields})
    assert status == 200, body
    return body


def test_n_choices_greedy_and_seeded(base_url):
    one = post(base_url, temperature=0)
    greedy = post(base_url, temperature=0, n=3)
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert {c["text"] for c in greedy["choices"]} == {one["choices"][0]["text"]}
    assert greedy["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert greedy["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    seeded = post(base_url, temperature=1.0, seed=7, n=3, mode="tree")
    # Choice i is the request with seed 7 + i: each replays alone, in any mode.
    for i, choice in enumerate(seeded["choices"]):
        alone = post(base_url, temperature=1.0, seed=7 + i, mode="autoregressive")
        assert choice["text"] == alone["choices"][0]["text"]
    assert len({c["text"] for c in seeded["choices"]}) > 1


def test_n_chat_choices_stream_as_one_stream(base_url):
    whole = post(base_url, http_api.CHAT, temperature=1.0, seed=11, n=2)
    status, _, text = raw(base_url, http_api.CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                                    "temperature": 1.0, "seed": 11, "n": 2, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = events(text)
    assert chunks[-1] == "[DONE]" and chunks.count("[DONE]") == 1
    streamed = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content") or ""
    assert [streamed[i] for i in (0, 1)] == [c["message"]["content"] for c in whole["choices"]]
    (usage,) = [c["usage"] for c in chunks[:-1] if c.get("usage")]
    assert usage == whole["usage"]


def test_best_of_returns_the_most_likely(base_url):
    body = post(base_url, temperature=1.0, seed=3, n=1, best_of=3, logprobs=0)
    (best,) = body["choices"]
    candidates = [post(base_url, temperature=1.0, seed=3 + i, logprobs=0)["choices"][0] for i in range(3)]
    score = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
    assert best["text"] == candidates[score.index(max(score))]["text"]
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in candidates)
    assert post(base_url, temperature=1.0, seed=3, best_of=2)["choices"][0]["logprobs"] is None  # not asked for


def test_echo_puts_the_prompt_before_the_text(base_url):
    plain = post(base_url, temperature=0)["choices"][0]["text"]
    assert post(base_url, temperature=0, echo=True)["choices"][0]["text"] == PROMPT + plain
    status, _, text = raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                           "echo": True, "stream": True})
    assert status == 200
    assert "".join(c["choices"][0]["text"] for c in events(text)[:-1] if c["choices"]) == PROMPT + plain
