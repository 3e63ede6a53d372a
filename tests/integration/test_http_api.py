"""The orchestrator's OpenAI-compatible HTTP API over the session's tiny cluster (each service its
own process on loopback; the orchestrator serves HTTP on ``--http-port`` beside gRPC), driven by the
official ``openai`` package, with raw HTTP where the package would not send what is tested.

The HTTP API runs every generation through the gRPC API's own code, so greedy output must be the
gRPC API's token for token, and the tiny target's own. Bearer tokens and TLS over HTTP are tested
with the secure cluster in test_security.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import openai
import pytest

from specdec.orchestrator import http_api
from specdec.errors import Cancelled, DeadlineExceeded, InvalidRequest, NotReady, Overloaded, Unavailable
from specdec.v1 import generation_pb2
from conftest import TINY_CHAT_TEMPLATE
from test_services_grpc import AR, SEQ, TREE, RPC_TIMEOUT_S, all_infos, wait_for_no_sessions
from tiny_models import EOS, tiny_tokenizer

TIMEOUT_S = 60
PROMPT = "def hello(x):"
MODES = {"autoregressive": AR, "sequential": SEQ, "tree": TREE}


@pytest.fixture(scope="module")
def base_url(tiny_cluster) -> str:
    assert tiny_cluster.http_url, "the session cluster serves HTTP (tests/conftest.py: http_port)"
    return tiny_cluster.http_url


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key="no-token-set", max_retries=0, timeout=TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def raw(base_url: str, path: str, body=None, method: str | None = None, headers: dict | None = None):
    """(status, headers, body as JSON or text) of one request, whatever its status."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            status, head, text = reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as error:
        status, head, text = error.code, dict(error.headers), error.read().decode()
    content_type = {k.lower(): v for k, v in head.items()}.get("content-type", "")
    return status, {k.lower(): v for k, v in head.items()}, json.loads(text) if content_type.startswith("application/json") else text


def assert_error(reply, status: int, *words: str, param: str | None = "any") -> dict:
    """An error in OpenAI's shape with this status, its message naming ``words``."""
    got, _, body = reply
    assert got == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    for word in words:
        assert word in error["message"], (word, error["message"])
    if param != "any":
        assert error["param"] == param, error
    return error


def events(text: str) -> list:
    """The data of each server-sent event; [DONE] as a string."""
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text page (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def grpc_generate(grpc_stubs, **fields):
    request = generation_pb2.GenerateRequest(**fields)
    return grpc_stubs["generation"].Generate(request, timeout=RPC_TIMEOUT_S)


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=TINY_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- models, health, metrics


def test_models_lists_the_target(client, model, tiny_cluster, base_url):
    listed = client.models.list().data
    assert [m.id for m in listed] == [tiny_cluster.settings.target_model]
    assert client.models.retrieve(model).id == model
    status, _, body = raw(base_url, "/v1/models")
    assert status == 200 and body["data"][0]["max_model_len"] == 512
    # The verify service's dtype (pinned to float32 in the tests: no choice to explain).
    assert body["data"][0]["dtype"] == "float32" and body["data"][0]["precision"] is None


def test_health_and_metrics(client, model, base_url):
    status, _, body = raw(base_url, "/health")
    assert (status, body) == (200, {"status": "SERVING"})
    client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
    status, head, text = raw(base_url, "/metrics")
    assert status == 200 and head["content-type"].startswith("text/plain")
    assert metric(text, "specdec_requests_total", method="/v1/completions", code="OK") >= 1
    assert "specdec_tokens_generated_total" in text


# --------------------------------------------------------------------------- completions


@pytest.mark.parametrize("mode", sorted(MODES))
def test_completion_equals_grpc_and_the_target(client, model, grpc_stubs, reference, tokenizer, mode):
    reply = client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"mode": mode, "return_token_ids": True},
        extra_headers={"X-Request-Id": f"http-test-{mode}"},
    )
    assert reply.headers["x-request-id"] == f"http-test-{mode}"
    completion = reply.parse()
    assert completion.id == f"http-test-{mode}" and completion.object == "text_completion" and completion.model == model
    choice = completion.choices[0]
    prompt_ids = tokenizer(PROMPT).input_ids
    by_grpc = grpc_generate(grpc_stubs, prompt=PROMPT, max_new_tokens=16, mode=MODES[mode])
    assert choice.token_ids == list(by_grpc.token_ids) == reference(prompt_ids, 16)
    assert choice.prompt_token_ids == prompt_ids
    assert choice.text == by_grpc.text
    assert choice.finish_reason == ("stop" if by_grpc.token_ids[-1] == EOS else "length")
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(choice.token_ids)
    assert completion.usage.total_tokens == len(prompt_ids) + len(choice.token_ids)
    spec = completion.spec_decode
    assert spec["mode"] == mode
    if mode == "autoregressive":
        assert spec["num_drafts"] == spec["num_draft_tokens"] == 0 and spec["drafts"] == []
        assert spec["rounds"] == len(choice.token_ids)
    else:
        assert spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
        assert sum(spec["num_accepted_tokens_per_pos"]) == spec["num_accepted_tokens"]
        assert {d["draft"] for d in spec["drafts"]} == {"draft-0", "draft-1"}


def test_seeded_sampling_equals_grpc(client, model, grpc_stubs):
    """The same seed through either door gives the same sampled tokens: one code path."""
    fields = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    by_http = client.completions.create(model=model, prompt=PROMPT, extra_body={"return_token_ids": True}, **fields)
    by_grpc = grpc_generate(grpc_stubs, prompt=PROMPT, max_new_tokens=12,
                            sampling=generation_pb2.SamplingParams(temperature=0.9, top_p=0.95, seed=1234))
    assert by_http.choices[0].token_ids == list(by_grpc.token_ids)


def test_prompt_as_token_ids(client, model, reference):
    ids = [10, 11, 12, 13]
    for prompt in (ids, [ids]):
        completion = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                               extra_body={"return_token_ids": True})
        assert completion.choices[0].token_ids == reference(ids, 8)


def test_completion_stream_equals_whole(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0,
                                      extra_body={"return_token_ids": True})
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"return_token_ids": True}))
    *pieces, last, usage = chunks
    assert "".join(c.choices[0].text for c in [*pieces, last]) == whole.choices[0].text
    assert [t for c in pieces for t in c.choices[0].token_ids] == whole.choices[0].token_ids
    assert all(c.choices[0].finish_reason is None for c in pieces)
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.spec_decode["mode"] == "tree"
    assert usage.choices == [] and usage.usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_stop_string(client, model, reference, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    text = tokenizer.decode(reference(ids, 16))
    stop = text[5:7]
    expected = text[: text.index(stop)]
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "never-there"])
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].stop_reason == stop
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client, model, reference, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    tokens = reference(ids, 16)
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                           extra_body={"stop_token_ids": [tokens[3]], "return_token_ids": True})
    choice = completion.choices[0]
    assert choice.token_ids == tokens[: tokens.index(tokens[3]) + 1]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", tokens[3])


def test_completion_logprobs(client, model):
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    logprobs, text = completion.choices[0].logprobs, completion.choices[0].text
    n = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == n
    assert "".join(logprobs.tokens) == text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(n)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and token in top and len(top) <= 4
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3, stream=True))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(logprobs.token_logprobs)


# --------------------------------------------------------------------------- chat


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]


def test_chat_equals_grpc_and_the_target(client, model, grpc_stubs, reference, tokenizer):
    prompt_ids = chat_prompt_ids(tokenizer, MESSAGES)
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=16, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    choice = chat.choices[0]
    by_grpc = grpc_generate(grpc_stubs, prompt_token_ids=prompt_ids, max_new_tokens=16)
    assert choice.token_ids == list(by_grpc.token_ids) == reference(prompt_ids, 16)
    assert chat.prompt_token_ids == prompt_ids
    assert choice.message.role == "assistant" and choice.message.content == by_grpc.text
    assert chat.usage.prompt_tokens == len(prompt_ids)
    assert chat.spec_decode["num_drafts"] >= 1


def test_chat_content_parts_and_stream(client, model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "def add("}, {"type": "text", "text": "a, b):"}]}]
    whole = client.chat.completions.create(model=model, messages=parts, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=12, temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=parts, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-2].spec_decode["num_accepted_tokens"] >= 0


def test_chat_logprobs(client, model):
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.bytes == list(t.token.encode())
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


# --------------------------------------------------------------------------- errors


def test_unknown_model_is_404(client, base_url):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"
    assert_error(raw(base_url, "/v1/models/no-such-model"), 404, "no-such-model")


@pytest.mark.parametrize("path", [http_api.COMPLETIONS, http_api.CHAT])
@pytest.mark.parametrize("body,words", [
    (b"{not json", ["not valid JSON"]),
    (b"", ["not valid JSON"]),
    (b"[1, 2]", ["JSON object"]),
    (b'{"prompt": "a", "max_tokens": NaN}', ["NaN"]),
    (b"\xff\xfe{}", ["not valid JSON"]),
], ids=["truncated", "empty", "array", "nan", "bad-utf8"])
def test_malformed_json_is_400(base_url, path, body, words):
    assert_error(raw(base_url, path, body), 400, *words)


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "a", "temperature": "hot"}, "temperature", ["temperature"]),
    ({"prompt": "a", "max_tokens": 1.5}, "max_tokens", ["integer"]),
    ({"prompt": "a", "max_tokens": True}, "max_tokens", ["integer"]),
    ({"prompt": "a", "max_tokens": 100_000}, "max_tokens", ["max_tokens", "4096"]),
    ({"prompt": "a" * 500, "max_tokens": 20}, "max_tokens", ["exceeds the model's context"]),
    ({"prompt": "a", "n": 99}, "n", ["n = 99", "[1, 16]"]),
    ({"prompt": "a", "n": 3, "best_of": 2}, "best_of", ["best_of = 2", "n = 3"]),
    ({"prompt": "a", "best_of": 3, "stream": True}, "best_of", ["cannot be streamed"]),
    ({"prompt": "a", "stop": ["a", 1]}, "stop", ["stop"]),
    ({"prompt": "a", "stop": [""]}, "stop", ["empty"]),
    ({"prompt": [1, 2, 99_999]}, "prompt", ["99999", "vocabulary"]),
    ({"prompt": ["a", "b"]}, "prompt", ["2 prompts"]),
    ({"prompt": [5] * 600}, "prompt", ["600 tokens", "context"]),
    ({"prompt": "a", "mode": "fast"}, "mode", ["fast"]),
    ({"prompt": "a", "speculation": {"beam_width": 99}}, "speculation", ["beam_width"]),
    ({"prompt": "a", "logprobs": 21}, "logprobs", ["20"]),
    ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty", ["[-2, 2]"]),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias", ["token id"]),
    ({"prompt": "a", "logit_bias": {"99999": 1}}, "logit_bias", ["99999", "vocabulary"]),
    ({"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias", ["[-100, 100]"]),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty", ["(0, 100]"]),
    ({"prompt": "a", "min_p": 1.5}, "min_p", ["[0, 1]"]),
    ({"prompt": "a", "echo": True, "logprobs": 1}, "echo", ["not supported"]),
    ({"prompt": "a", "top_p": 2}, "top_p", ["top_p"]),
    ({"prompt": "a", "max_token": 5}, "max_token", ["unrecognized request argument", "max_token"]),
    ({"prompt": "a", "speculation": {"width": 2}}, "speculation.width", ["speculation.width"]),
    ({}, "prompt", ["prompt", "required"]),
], ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else None)
def test_invalid_completion_is_400(base_url, body, param, words):
    assert_error(raw(base_url, http_api.COMPLETIONS, body), 400, *words, param=param)


@pytest.mark.parametrize("body,param,words", [
    ({"messages": []}, "messages", ["at least 1"]),
    ({"messages": [{"content": "hi"}]}, "messages", ["role"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", ["text parts"]),
    ({"messages": MESSAGES, "logprobs": 1}, "logprobs", ["boolean"]),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", ["logprobs"]),
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools", ["tools[0]"]),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens", ["greater than"]),
    ({"messages": MESSAGES, "reasoning_effort": "high"}, "reasoning_effort", ["unrecognized", "reasoning_effort"]),
], ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else None)
def test_invalid_chat_is_400(base_url, body, param, words):
    assert_error(raw(base_url, http_api.CHAT, body), 400, *words, param=param)


def test_errors_through_the_sdk(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=100_000)
    assert "max_tokens" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=MESSAGES, n=99)
    assert error.value.body["param"] == "n"


def test_unknown_route_and_method(base_url):
    assert_error(raw(base_url, "/v1/embeddings", {"input": "a"}), 404, "/v1/embeddings")
    assert_error(raw(base_url, http_api.COMPLETIONS), 405, "GET")


def test_oversized_body_is_413_before_it_is_read(base_url):
    """Content-Length past --max-message-mb (64 MiB by default) is refused at once: the body is never sent."""
    limit = 64
    url = urlparse(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(f"POST {http_api.COMPLETIONS} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {(limit << 20) + 1}\r\n\r\n".encode())
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        body = json.loads(reply.read())
    assert reply.status == 413 and body["error"]["code"] == "request_too_large"


def test_oversized_chunked_body_is_413():
    """Without a Content-Length, the body is counted as it arrives and refused once past the limit."""
    import asyncio
    import types

    from starlette.requests import Request

    sent = []

    async def receive():
        sent.append(1)
        return {"type": "http.request", "body": b"x" * 4, "more_body": True}  # never ends

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    api = types.SimpleNamespace(max_body_bytes=10, generations=types.SimpleNamespace(settings=types.SimpleNamespace(http_read_timeout_s=10)))
    with pytest.raises(http_api.ApiError) as refused:
        asyncio.run(http_api.HttpApi.read_json(api, request))
    assert refused.value.status == 413 and len(sent) == 3


def test_deadline_is_504(base_url):
    error = assert_error(raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 64},
                             headers={"X-Request-Timeout": "0.000001"}), 504, "deadline")
    assert error["code"] == "deadline_exceeded"
    assert_error(raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT}, headers={"X-Request-Timeout": "soon"}), 400,
                 "X-Request-Timeout", param="X-Request-Timeout")


def test_bad_request_id_is_400(base_url):
    assert_error(raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT}, headers={"X-Request-Id": "x" * 200}), 400,
                 "X-Request-Id", param="X-Request-Id")


def test_errors_map_as_the_grpc_api_does():
    """One table: each typed error's gRPC status, and its HTTP status."""
    import grpc

    expected = {InvalidRequest("x"): 400, Overloaded("x"): 429, NotReady("x"): 503, Unavailable("x"): 503,
                DeadlineExceeded("x"): 504, Cancelled("x"): 499, RuntimeError("x"): 500}
    for exc, status in expected.items():
        assert http_api.ApiError.of(exc).status == status, exc
    upstream = grpc.RpcError()
    upstream.code, upstream.details = (lambda: grpc.StatusCode.RESOURCE_EXHAUSTED), (lambda: "busy")
    assert http_api.ApiError.of(upstream).status == 429


# --------------------------------------------------------------------------- a client that goes away


def test_client_leaving_mid_stream_stops_the_generation(base_url, grpc_stubs):
    """Reading the first event and closing: the generation stops and its sessions are released."""
    url = urlparse(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT_S)
    connection.request("POST", http_api.COMPLETIONS, json.dumps({
        "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True,
        "mode": "autoregressive"}), {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    connection.close()
    deadline = time.monotonic() + 30
    while all_infos(grpc_stubs)[0].active_sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all_infos(grpc_stubs)[0].active_sessions == 0, "the generation went on after its client left"
    assert wait_for_no_sessions(grpc_stubs, 10) == [0, 0, 0]
    status, _, text = raw(base_url, "/metrics")
    assert metric(text, "specdec_requests_total", method="/v1/completions", code="CANCELLED") >= 1


def test_a_prediction_is_used_and_checked(base_url):
    """OpenAI's Predicted Outputs: a well-formed prediction proposes draft tokens (the output stays
    the target's own; the usage counts the prediction's accepted and rejected tokens), a malformed
    one is a 400 naming it, never silently dropped."""
    good = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "prediction": {"type": "content", "content": "    return x"}}
    status, _, body = raw(base_url, http_api.COMPLETIONS, good)
    plain = raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 24, "temperature": 0})[2]
    assert status == 200 and plain["choices"][0]["text"].startswith(body["choices"][0]["text"])
    assert "completion_tokens_details" not in plain["usage"]
    # The answer itself as the prediction (after its first few characters): accepted in long runs.
    answer = plain["choices"][0]["text"]
    status, _, predicted = raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                                "prediction": {"type": "content", "content": answer}})
    assert status == 200 and predicted["choices"][0]["text"] == answer
    details = predicted["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] >= 0
    parts = {"type": "content", "content": [{"type": "text", "text": "x"}]}
    assert raw(base_url, http_api.CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prediction": parts})[0] == 200
    for bad in ({"type": "image", "content": 3}, {"type": "content"}, "text", {"type": "content", "content": 3},
                {"type": "content", "content": [{"type": "image_url"}]}):
        assert_error(raw(base_url, http_api.COMPLETIONS, {**good, "prediction": bad}), 400, "prediction", param="prediction")


def test_processors_over_http(base_url):
    """Logits processors through the HTTP door: a bad word never appears; a strong logit_bias takes
    over; the output under a penalty is the same every time (greedy)."""
    plain = raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 16, "temperature": 0})[2]["choices"][0]["text"]
    banned = next(c for c in plain if c.strip())
    status, _, body = raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "bad_words": [banned]})
    assert status == 200 and banned not in body["choices"][0]["text"]
    status, _, body = raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logit_bias": {"7": 100}})
    assert status == 200 and body["choices"][0]["text"] == tiny_tokenizer().decode([7] * 4)
    penalised = [raw(base_url, http_api.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                                       "frequency_penalty": 1.5, "repetition_penalty": 1.3})[2] for _ in range(2)]
    assert penalised[0]["choices"][0]["text"] == penalised[1]["choices"][0]["text"]

