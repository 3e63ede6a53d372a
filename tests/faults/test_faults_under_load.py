"""Faults under load: with eight clients generating at once (their calls batched in every model
service), a draft is killed, then one of two verify replicas: every output still equals the
target's own output (greedy, or sampled with the client's seed: what autoregressive decoding
alone gives for that seed), no call fails, and no session is left behind."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from specdec.v1 import generation_pb2

from test_faults import RPC_TIMEOUT_S, Stubs, collect, request, start_cluster

PROMPTS = [[11, 40, 3, 77, 25, 60, 8], [5, 6, 7], [70, 71, 72, 73, 74], [42, 42, 42, 9], [1, 2, 3, 4, 5, 6, 7, 8],
           [88, 12, 33], [9, 9, 8, 8, 7], [30, 60, 30, 60]]
MODES = [("tree", {"beam_width": 2, "beam_depth": 3}), ("sequential", {"draft_length": 3}), ("tree", {"beam_width": 3, "beam_depth": 2})]
TOKENS = 120


@pytest.fixture(scope="module")
def cluster(tiny_dirs, tmp_path_factory):
    c = start_cluster(tiny_dirs, tmp_path_factory.mktemp("load-faults"), drafts=("draft", "other"), replicas=2,
                      env={"SPECDEC_MAX_ACTIVE_GENERATIONS": "8"})
    stubs = Stubs(c)
    yield c, stubs
    stubs.close()
    c.stop()


def sampling(i: int):
    """Every other client samples, each with its own seed; the rest decode greedily."""
    return generation_pb2.SamplingParams(temperature=1.0, top_k=8, seed=100 + i) if i % 2 else None


def run_clients(stubs, started: threading.Event) -> tuple[list, list]:
    """Eight concurrent streamed generations; ``started`` is set once every one has its first tokens."""
    outputs, errors = [None] * len(PROMPTS), []
    first = threading.Barrier(len(PROMPTS) + 1)

    def client(i):
        mode, spec = MODES[i % len(MODES)]
        try:
            outputs[i] = collect(stubs.generation.GenerateStream(request(PROMPTS[i], mode, TOKENS, sampling(i), **spec),
                                                                 timeout=RPC_TIMEOUT_S),
                                 lambda: first.wait(30))[0]
        except (grpc.RpcError, threading.BrokenBarrierError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    first.wait(60)
    started.set()
    for t in threads:
        t.join(RPC_TIMEOUT_S)
    return outputs, errors


@pytest.mark.parametrize("victim", ["draft-0", "verify-1"])
def test_a_service_killed_under_load_changes_no_output(cluster, reference, victim):
    c, stubs = cluster
    # What each client gets alone: greedy, the target's own output; seeded, autoregressive decoding's draw.
    alone = [reference(prompt, TOKENS) if sampling(i) is None else
             list(stubs.generation.Generate(request(prompt, "autoregressive", TOKENS, sampling(i)), timeout=RPC_TIMEOUT_S).token_ids)
             for i, prompt in enumerate(PROMPTS)]
    started, result = threading.Event(), {}
    load = threading.Thread(target=lambda: result.update(zip(("outputs", "errors"), run_clients(stubs, started))))
    load.start()
    assert started.wait(90)
    c.kill(victim)
    load.join(RPC_TIMEOUT_S * 2)
    assert result["errors"] == []
    assert result["outputs"] == alone
    deadline = time.monotonic() + 10
    while any(n > 0 for n in stubs.sessions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(n <= 0 for n in stubs.sessions()), stubs.sessions()  # -1: the killed service, which holds nothing
    c.restart(victim)


def concurrent_unary(stubs, calls: int, timeout_s: float, max_new_tokens: int) -> list:
    """``calls`` Generate calls at once; each one's reply or its error."""
    results = [None] * calls
    start = threading.Barrier(calls)

    def call(i):
        start.wait()
        try:
            results[i] = stubs.generation.Generate(request(PROMPTS[i % len(PROMPTS)], "tree", max_new_tokens, beam_width=2, beam_depth=3),
                                                   timeout=timeout_s)
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def no_sessions_within(stubs, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(n > 0 for n in stubs.sessions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return stubs.sessions()


def test_callers_that_give_up_leave_no_session_behind(cluster):
    """Calls whose deadline passes while they wait for the model are dropped before they run: no
    service keeps (or creates again) a session for them, long before the idle TTL."""
    c, stubs = cluster
    results = concurrent_unary(stubs, 16, timeout_s=0.3, max_new_tokens=400)
    assert all(isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.DEADLINE_EXCEEDED for r in results)
    assert no_sessions_within(stubs, 5) == [0] * 5


def test_under_overload_every_admitted_call_completes(cluster, reference):
    """Eight running and thirty-two queued: the forty-first and later are refused at once, and every
    admitted call completes with the target's own output."""
    c, stubs = cluster
    results = concurrent_unary(stubs, 45, timeout_s=RPC_TIMEOUT_S, max_new_tokens=30)
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused), [r.code() for r in refused]
    assert len(refused) <= 5
    for i, reply in enumerate(results):
        if not isinstance(reply, grpc.RpcError):
            assert list(reply.token_ids) == reference(PROMPTS[i % len(PROMPTS)], 30)
    assert no_sessions_within(stubs, 5) == [0] * 5
