"""Cheap checks first: the orchestrator sizes a prompt against the model's context before it copies,
reads or tokenises it, so a request of millions of token ids (or characters) is refused at once,
with next to no memory, and the token range check reads at most a context's worth."""

from __future__ import annotations

import time
import tracemalloc

import grpc
import pytest

from specdec import config
from specdec.generation import GenerationParams
from specdec.errors import InvalidRequest
from specdec.orchestrator.generations import Generations
from specdec.orchestrator.server import SERVICE_NAME, GenerationServicer, params_of
from specdec.rpc.server import start_server
from specdec.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from local_clients import params
from tiny_models import EOS, VOCAB, tiny_tokenizer

MAX_CONTEXT = 512
HUGE = 8_000_000  # prompt ids in one request: 8 MB on the wire, 32 MB parsed, 64 MB more as a list
QUICK_S = 0.5  # the old checks copied and read every id first: seconds


class NoVerify:
    """A refused request never reaches the verify service."""

    def verify(self, *args):
        raise AssertionError("a refused request reached the verify service")

    def release(self, session_id):
        pass


class CountingTokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def servicer():
    settings = config.from_env(config.OrchestratorSettings, environ={}, log_dir="", target_model="tiny")
    info = common_pb2.ModelInfo(model="tiny", vocab_size=VOCAB, max_context=MAX_CONTEXT, eos_token_ids=[EOS])
    return GenerationServicer(Generations(settings, CountingTokenizer(tiny_tokenizer()), NoVerify(), [], info))


@pytest.fixture(scope="module")
def stub(servicer):
    server, port, _ = start_server(lambda s: generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, s),
                                   [SERVICE_NAME], "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)
    server.stop(0).wait()


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def huge_ids_request(count: int = HUGE, token: int = 5) -> generation_pb2.GenerateRequest:
    """``count`` prompt ids and max_new_tokens 8, parsed from the bytes a client would send: a
    Python list of that many ids would cost more than the checks under test."""
    ids = bytes([token]) * count  # packed one-byte varints (field 2)
    return generation_pb2.GenerateRequest.FromString(b"\x12" + varint(len(ids)) + ids + b"\x18\x08")


def checked(servicer, request) -> GenerationParams:
    return servicer.generations.resolve(params_of(request, MAX_CONTEXT))


def test_huge_prompt_ids_refused_before_a_copy(servicer):
    request = huge_ids_request()
    assert len(request.prompt_token_ids) == HUGE
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(InvalidRequest, match=f"prompt has {HUGE} tokens; the model's context is {MAX_CONTEXT}"):
            checked(servicer, request)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < QUICK_S
    assert peak < 1 << 20, f"{peak} bytes allocated refusing the request"


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
def test_huge_prompt_ids_answered_invalid_argument(stub, streamed):
    request = huge_ids_request()
    with pytest.raises(grpc.RpcError) as info:
        if streamed:
            list(stub.GenerateStream(request, timeout=30))
        else:
            stub.Generate(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt has {HUGE} tokens" in info.value.details() and str(MAX_CONTEXT) in info.value.details()


def test_huge_prompt_text_refused_before_tokenising(servicer):
    calls = servicer.generations.tokenizer.calls
    start = time.perf_counter()
    with pytest.raises(InvalidRequest, match="characters"):
        checked(servicer, generation_pb2.GenerateRequest(prompt="a" * 5_000_000, max_new_tokens=8))
    assert time.perf_counter() - start < QUICK_S
    assert servicer.generations.tokenizer.calls == calls


def test_the_first_bad_token_is_named(servicer):
    for ids, named in [([1, 2, VOCAB, -1, 3], f"prompt_token_ids[2] = {VOCAB}"), ([-1], "prompt_token_ids[0] = -1"),
                       ([7] * 100 + [2**31 - 1], "prompt_token_ids[100]")]:
        with pytest.raises(InvalidRequest, match=named.replace("[", r"\[").replace("]", r"\]")):
            checked(servicer, generation_pb2.GenerateRequest(prompt_token_ids=ids, max_new_tokens=8))


def test_size_is_checked_before_the_tokens(servicer):
    # A context's worth of bad ids is refused for its size, without reading an id.
    with pytest.raises(InvalidRequest, match=f"prompt has {MAX_CONTEXT} tokens"):
        checked(servicer, generation_pb2.GenerateRequest(prompt_token_ids=[-1] * MAX_CONTEXT, max_new_tokens=8))
    # The controller checks a request built in-process the same way.
    req = params([VOCAB] * (MAX_CONTEXT + 1), 8, "tree", 2, 2, 4, 64)
    with pytest.raises(InvalidRequest, match="context"):
        servicer.generations.controller.check(req)


def test_a_prompt_that_fits_passes(servicer):
    req = checked(servicer, generation_pb2.GenerateRequest(prompt_token_ids=[0, 5, VOCAB - 1] * 10, max_new_tokens=8))
    assert list(req.prompt_ids) == [0, 5, VOCAB - 1] * 10
    req = checked(servicer, generation_pb2.GenerateRequest(prompt="def f(x):", max_new_tokens=8))
    assert len(req.prompt_ids) == len("def f(x):")
