"""Bad input over real gRPC: every service answers INVALID_ARGUMENT naming the field, and stays
healthy and correct afterwards, sessions in progress included."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.v1 import common_pb2, draft_pb2, generation_pb2, verify_pb2
from test_services_grpc import RPC_TIMEOUT_S, TREE, services, tree_around, verify_round, wait_for_no_sessions
from tiny_models import VOCAB, tiny_tokenizer

MAX_CONTEXT = 512  # max_position_embeddings of the tiny models
HUGE = 2**31 - 1
OK_PROMPT = [10, 11, 12, 13]


def generate_request(**fields) -> generation_pb2.GenerateRequest:
    speculation = generation_pb2.SpeculationParams(**fields.pop("speculation", {}))
    sampling = generation_pb2.SamplingParams(**fields.pop("sampling", {}))
    fields.setdefault("max_new_tokens", 8)
    return generation_pb2.GenerateRequest(speculation=speculation, sampling=sampling, **fields)


def assert_invalid(call, request, *fields: str, stream: bool = False) -> str:
    with pytest.raises(grpc.RpcError) as info:
        reply = call(request, timeout=RPC_TIMEOUT_S)
        if stream:
            list(reply)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    for field in fields:
        assert field in error.details(), f"{field!r} not named in {error.details()!r}"
    return error.details()


# (case id, request fields, words the error must name)
BAD_GENERATE = [
    ("empty-prompt", {"prompt": ""}, ["prompt"]),
    ("neither", {}, ["prompt", "prompt_token_ids"]),
    ("both", {"prompt": "abc", "prompt_token_ids": [1, 2]}, ["prompt", "prompt_token_ids"]),
    ("negative-token", {"prompt_token_ids": [1, -1, 2]}, ["prompt_token_ids[1]", "-1"]),
    ("token-at-vocab", {"prompt_token_ids": [1, 2, VOCAB]}, ["prompt_token_ids[2]", str(VOCAB)]),
    ("huge-token", {"prompt_token_ids": [HUGE]}, ["prompt_token_ids[0]"]),
    ("negative-max-new-tokens", {"prompt_token_ids": OK_PROMPT, "max_new_tokens": -1}, ["max_new_tokens"]),
    ("max-new-tokens-over-limit", {"prompt_token_ids": OK_PROMPT, "max_new_tokens": 4097}, ["max_new_tokens"]),
    ("huge-max-new-tokens", {"prompt_token_ids": OK_PROMPT, "max_new_tokens": HUGE}, ["max_new_tokens"]),
    ("prompt-ids-fill-context", {"prompt_token_ids": [5] * MAX_CONTEXT}, ["prompt", str(MAX_CONTEXT)]),
    ("prompt-text-over-context", {"prompt": "a" * (MAX_CONTEXT + 100)}, ["prompt", str(MAX_CONTEXT)]),
    ("prompt-plus-max-new-tokens-over-context",
     {"prompt_token_ids": [5] * (MAX_CONTEXT - 10), "max_new_tokens": 20}, ["max_new_tokens", str(MAX_CONTEXT)]),
    ("unknown-mode", {"prompt_token_ids": OK_PROMPT, "mode": 99}, ["mode", "99"]),
    ("negative-mode", {"prompt_token_ids": OK_PROMPT, "mode": -1}, ["mode"]),
    ("negative-draft-length", {"prompt_token_ids": OK_PROMPT, "speculation": {"draft_length": -1}}, ["draft_length"]),
    ("huge-draft-length", {"prompt_token_ids": OK_PROMPT, "speculation": {"draft_length": HUGE}}, ["draft_length"]),
    ("negative-beam-width", {"prompt_token_ids": OK_PROMPT, "speculation": {"beam_width": -3}}, ["beam_width"]),
    ("huge-beam-width", {"prompt_token_ids": OK_PROMPT, "speculation": {"beam_width": 1000}}, ["beam_width"]),
    ("negative-beam-depth", {"prompt_token_ids": OK_PROMPT, "speculation": {"beam_depth": -1}}, ["beam_depth"]),
    ("huge-beam-depth", {"prompt_token_ids": OK_PROMPT, "speculation": {"beam_depth": HUGE}}, ["beam_depth"]),
    ("negative-max-tree-nodes", {"prompt_token_ids": OK_PROMPT, "speculation": {"max_tree_nodes": -5}}, ["max_tree_nodes"]),
    ("huge-max-tree-nodes", {"prompt_token_ids": OK_PROMPT, "speculation": {"max_tree_nodes": HUGE}}, ["max_tree_nodes"]),
    ("negative-temperature", {"prompt_token_ids": OK_PROMPT, "sampling": {"temperature": -0.5}}, ["temperature"]),
    ("empty-stop-string", {"prompt_token_ids": OK_PROMPT, "stop": ["ab", ""]}, ["stop[1]"]),
]


@pytest.mark.parametrize("fields,named", [c[1:] for c in BAD_GENERATE], ids=[c[0] for c in BAD_GENERATE])
def test_generate_rejects(grpc_stubs, fields, named):
    request = generate_request(**fields)
    assert_invalid(grpc_stubs["generation"].Generate, request, *named)


@pytest.mark.parametrize("case", ["neither", "token-at-vocab", "unknown-mode", "huge-beam-width", "negative-temperature"])
def test_generate_stream_rejects(grpc_stubs, case):
    _, fields, named = next(c for c in BAD_GENERATE if c[0] == case)
    assert_invalid(grpc_stubs["generation"].GenerateStream, generate_request(**fields), *named, stream=True)


def verify_request(context=OK_PROMPT, tokens=(), parents=(), session_id=""):
    return verify_pb2.VerifyTreeRequest(
        session_id=session_id, context_token_ids=list(context), tree_token_ids=list(tokens), tree_parents=list(parents)
    )


BAD_VERIFY = [
    ("parent-is-itself", {"tokens": [1, 2], "parents": [-1, 1]}, ["tree_parents[1]"]),
    ("first-parent-is-itself", {"tokens": [1], "parents": [0]}, ["tree_parents[0]"]),
    ("parent-after-itself", {"tokens": [1, 2, 3], "parents": [-1, 2, 0]}, ["tree_parents[1]"]),
    ("parent-far-after", {"tokens": [1, 2], "parents": [-1, 100]}, ["tree_parents[1]"]),
    ("parent-below-minus-one", {"tokens": [1, 2], "parents": [-1, -2]}, ["tree_parents[1]"]),
    ("fewer-parents", {"tokens": [1, 2, 3], "parents": [-1, 0]}, ["tree_parents", "tree_token_ids"]),
    ("more-parents", {"tokens": [1], "parents": [-1, 0]}, ["tree_parents", "tree_token_ids"]),
    ("negative-tree-token", {"tokens": [1, -4], "parents": [-1, 0]}, ["tree_token_ids[1]"]),
    ("tree-token-at-vocab", {"tokens": [VOCAB], "parents": [-1]}, ["tree_token_ids[0]"]),
    ("empty-context", {"context": []}, ["context_token_ids"]),
    ("negative-context-token", {"context": [1, -1]}, ["context_token_ids[1]"]),
    ("context-token-at-vocab", {"context": [VOCAB]}, ["context_token_ids[0]"]),
    ("context-over-model", {"context": [5] * MAX_CONTEXT, "tokens": [1], "parents": [-1]}, ["context_token_ids", str(MAX_CONTEXT)]),
    ("tree-too-large", {"tokens": [1] * 5000, "parents": [-1] * 5000}, ["tree"]),
    # The verify service's limits are config.SpeculationLimits' defaults: 1024 nodes, depth 16.
    ("tree-over-node-limit", {"tokens": [1] * 1025, "parents": [-1] * 1025}, ["tree size", "1024"]),
    ("tree-too-deep", {"tokens": [1] * 17, "parents": list(range(-1, 16))}, ["tree depth", "16"]),
]


@pytest.mark.parametrize("fields,named", [c[1:] for c in BAD_VERIFY], ids=[c[0] for c in BAD_VERIFY])
def test_verify_tree_rejects(grpc_stubs, fields, named):
    assert_invalid(grpc_stubs["verify"].VerifyTree, verify_request(**fields), *named)
    # With a session id too: refused before any cache is made for it.
    assert_invalid(grpc_stubs["verify"].VerifyTree, verify_request(**fields, session_id="never-made"), *named)
    info = grpc_stubs["verify"].GetInfo(common_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S)
    assert info.active_sessions == 0


def draft_request(context=OK_PROMPT, width=1, depth=3, session_id="", **stop):
    return draft_pb2.DraftBeamsRequest(session_id=session_id, context_token_ids=list(context), beam_width=width, beam_depth=depth, **stop)


BAD_DRAFT = [
    ("width-zero", {"width": 0}, ["beam_width"]),
    ("width-negative", {"width": -1}, ["beam_width"]),
    ("width-too-big", {"width": 9}, ["beam_width"]),
    ("width-huge", {"width": HUGE}, ["beam_width"]),
    ("depth-zero", {"depth": 0}, ["beam_depth"]),
    ("depth-negative", {"depth": -2}, ["beam_depth"]),
    ("depth-too-big", {"depth": 17}, ["beam_depth"]),
    ("empty-context", {"context": []}, ["context_token_ids"]),
    ("negative-token", {"context": [3, -1]}, ["context_token_ids[1]"]),
    ("token-at-vocab", {"context": [VOCAB, 3]}, ["context_token_ids[0]"]),
    ("context-over-model", {"context": [5] * (MAX_CONTEXT - 1), "depth": 2}, ["context_token_ids", str(MAX_CONTEXT)]),
    ("stop-above-one", {"min_path_probability": 1.5}, ["min_path_probability"]),
    ("stop-nan", {"min_path_probability": float("nan")}, ["min_path_probability"]),
    ("calibration-negative", {"confidence_calibration": [0.5, -0.1]}, ["confidence_calibration"]),
    ("calibration-too-long", {"confidence_calibration": [0.5] * 101}, ["confidence_calibration"]),
]


@pytest.mark.parametrize("fields,named", [c[1:] for c in BAD_DRAFT], ids=[c[0] for c in BAD_DRAFT])
def test_draft_beams_rejects(grpc_stubs, fields, named):
    for stub in grpc_stubs["drafts"]:
        assert_invalid(stub.DraftBeams, draft_request(**fields), *named)
        assert_invalid(stub.DraftBeams, draft_request(**fields, session_id="never-made"), *named)
        assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S).active_sessions == 0


def all_bad_requests(grpc_stubs, session_id: str) -> None:
    """Every bad request above, the stateful ones aimed at ``session_id``."""
    for _, fields, named in BAD_GENERATE:
        assert_invalid(grpc_stubs["generation"].Generate, generate_request(**fields), *named)
    for _, fields, named in BAD_VERIFY:
        assert_invalid(grpc_stubs["verify"].VerifyTree, verify_request(**fields, session_id=session_id), *named)
    for stub in grpc_stubs["drafts"]:
        for _, fields, named in BAD_DRAFT:
            assert_invalid(stub.DraftBeams, draft_request(**fields, session_id=session_id), *named)


def test_session_in_progress_survives_bad_requests(grpc_stubs, reference):
    verify_stub, draft_stub = grpc_stubs["verify"], grpc_stubs["drafts"][0]
    tokenizer = tiny_tokenizer()
    prompt_ids = tokenizer("class Stack:").input_ids
    truth = reference(prompt_ids, 24)
    session = "session-a"
    release = common_pb2.ReleaseSessionRequest(session_id=session)
    try:
        context, reused = list(prompt_ids), 0
        for accept in (2, 1):
            context, reused = verify_round(verify_stub, truth, len(prompt_ids), context, accept, session, reused)
        first_draft = draft_stub.DraftBeams(draft_request(context, width=2, depth=3, session_id=session), timeout=RPC_TIMEOUT_S)
        cached = verify_stub.GetInfo(common_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S).cached_tokens

        all_bad_requests(grpc_stubs, session)

        # Session A is as it was: its cache is untouched and the next rounds reuse it and stay right.
        assert verify_stub.GetInfo(common_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S).cached_tokens == cached
        for accept in (3, 0, 2):
            context, reused = verify_round(verify_stub, truth, len(prompt_ids), context, accept, session, reused)
        draft = draft_stub.DraftBeams(draft_request(context, width=2, depth=3, session_id=session), timeout=RPC_TIMEOUT_S)
        fresh = draft_stub.DraftBeams(draft_request(context, width=2, depth=3), timeout=RPC_TIMEOUT_S)
        assert draft.reused_tokens >= len(first_draft.beams[0].token_ids) and draft.reused_tokens > 0
        assert [list(b.token_ids) for b in draft.beams] == [list(b.token_ids) for b in fresh.beams]
    finally:
        verify_stub.ReleaseSession(release, timeout=RPC_TIMEOUT_S)
        draft_stub.ReleaseSession(release, timeout=RPC_TIMEOUT_S)
    assert wait_for_no_sessions(grpc_stubs) == [0, 0, 0]


def test_services_healthy_and_correct_after_bad_input(grpc_stubs, reference, tiny_cluster):
    all_bad_requests(grpc_stubs, "bad-only")
    for address, service in services(tiny_cluster):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT_S).status
                assert status == health_pb2.HealthCheckResponse.SERVING, (address, name)
    prompt_ids = tiny_tokenizer()("print(").input_ids
    for mode in (generation_pb2.DECODING_MODE_AUTOREGRESSIVE, generation_pb2.DECODING_MODE_SEQUENTIAL, TREE):
        reply = grpc_stubs["generation"].Generate(
            generate_request(prompt_token_ids=prompt_ids, max_new_tokens=16, mode=mode), timeout=RPC_TIMEOUT_S
        )
        assert list(reply.token_ids) == reference(prompt_ids, 16)
    assert wait_for_no_sessions(grpc_stubs) == [0, 0, 0]


def test_tree_helper_accepts_what_it_says(grpc_stubs, reference):
    # Guards the helper the session test leans on: a stateless call accepts exactly the chain.
    from specdec.tree import TokenTree, greedy_accept

    prompt_ids = [40, 41, 42]
    truth = reference(prompt_ids, 8)
    for accept in range(4):
        tokens, parents = tree_around(truth, accept)
        reply = grpc_stubs["verify"].VerifyTree(verify_request(prompt_ids, tokens, parents), timeout=RPC_TIMEOUT_S)
        nodes, bonus = greedy_accept(TokenTree(tokens=tokens, parents=parents), list(reply.target_token_ids))
        assert [tokens[i] for i in nodes] == truth[:accept] and bonus == truth[accept]
