"""Integration tests over real gRPC: the tiny cluster (verify + two drafts + orchestrator, each its
own process on loopback) against the target alone.

Every generation is checked token for token against ``reference_greedy`` on the tiny target: greedy
speculative decoding is lossless whatever the drafts propose, so any mode and any speculation
setting must give exactly the target's tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specdec.cost import CALIBRATION_ROWS
from specdec.tools.cluster import free_port
from specdec.rpc.server import wait_until_serving
from specdec.v1 import common_pb2, generation_pb2, verify_pb2
from tiny_models import EOS, VOCAB, tiny_qwen2, tiny_tokenizer

RPC_TIMEOUT_S = 60
AR, SEQ, TREE = (
    generation_pb2.DECODING_MODE_AUTOREGRESSIVE,
    generation_pb2.DECODING_MODE_SEQUENTIAL,
    generation_pb2.DECODING_MODE_TREE,
)
PROMPTS = [
    "def hello(x):",
    "The quick brown fox",
    "3BkpLN%FcQI",  # the tiny target ends this one with end-of-sequence after three tokens
]
# (mode, speculation): zeros mean the server's default.
SETTINGS = [
    (AR, {}),
    (SEQ, {}),
    (SEQ, {"draft_length": 1}),
    (SEQ, {"draft_length": 8}),
    (TREE, {}),
    (TREE, {"beam_width": 1, "beam_depth": 3}),
    (TREE, {"beam_width": 3, "beam_depth": 4}),
    (TREE, {"beam_width": 4, "beam_depth": 6, "max_tree_nodes": 5}),
]
SETTING_IDS = [f"{generation_pb2.DecodingMode.Name(m).removeprefix('DECODING_MODE_').lower()}-"
               + ("-".join(f"{k}{v}" for k, v in s.items()) or "default") for m, s in SETTINGS]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def generate(stubs, prompt: str = "", prompt_ids=(), max_new_tokens: int = 24, mode=TREE, spec=None, **fields):
    request = generation_pb2.GenerateRequest(
        prompt=prompt,
        prompt_token_ids=list(prompt_ids),
        max_new_tokens=max_new_tokens,
        mode=mode,
        speculation=generation_pb2.SpeculationParams(**(spec or {})),
        **fields,
    )
    return request, stubs["generation"].Generate(request, timeout=RPC_TIMEOUT_S)


def expected_finish(reference_tokens: list[int], max_new_tokens: int) -> int:
    if len(reference_tokens) < max_new_tokens or reference_tokens[-1] == EOS:
        return generation_pb2.FINISH_REASON_EOS
    return generation_pb2.FINISH_REASON_LENGTH


def check_stats(s: generation_pb2.GenerationStats, token_ids) -> None:
    assert s.tokens_generated == len(token_ids)
    assert s.rounds == s.verification_calls >= 1
    assert s.mean_accepted_per_round == pytest.approx(s.tokens_generated / s.rounds, rel=1e-5)
    assert s.bonus_tokens <= s.rounds
    assert s.draft_tokens_accepted <= s.draft_tokens_proposed
    assert s.tokens_generated <= s.draft_tokens_accepted + s.bonus_tokens
    assert s.total_ms > 0


def services(cluster) -> list[tuple[str, str]]:
    """(address, fully qualified service name) of every process in the cluster."""
    from specdec.draft_service.server import SERVICE_NAME as DRAFT
    from specdec.orchestrator.server import SERVICE_NAME as GENERATION
    from specdec.verify_service.server import SERVICE_NAME as VERIFY

    return [(cluster.orchestrator_address, GENERATION), (cluster.verify_address, VERIFY)] + [
        (address, DRAFT) for address in cluster.draft_addresses
    ]


def all_infos(stubs) -> list[common_pb2.ModelInfo]:
    request = common_pb2.GetInfoRequest()
    return [stubs["generation"].GetInfo(request, timeout=RPC_TIMEOUT_S), stubs["verify"].GetInfo(request, timeout=RPC_TIMEOUT_S)] + [
        d.GetInfo(request, timeout=RPC_TIMEOUT_S) for d in stubs["drafts"]
    ]


def wait_for_no_sessions(stubs, timeout_s: float = 5.0) -> list[int]:
    """Active sessions on verify and every draft, once all are 0 or the wait runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [info.active_sessions for info in all_infos(stubs)[1:]]
        if not any(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


# --------------------------------------------------------------------------- losslessness


@pytest.mark.parametrize("mode,spec", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_equals_target_alone(grpc_stubs, reference, tokenizer, prompt, mode, spec):
    max_new = 24
    prompt_ids = tokenizer(prompt).input_ids
    want = reference(prompt_ids, max_new)
    _, reply = generate(grpc_stubs, prompt=prompt, max_new_tokens=max_new, mode=mode, spec=spec)
    assert list(reply.token_ids) == want
    assert reply.finish_reason == expected_finish(want, max_new)
    assert reply.text == tokenizer.decode(want, skip_special_tokens=True)
    assert "".join(reply.token_texts) == reply.text
    assert reply.stats.prompt_tokens == len(prompt_ids)
    assert reply.stats.mode == generation_pb2.DecodingMode.Name(mode).removeprefix("DECODING_MODE_").lower()
    check_stats(reply.stats, reply.token_ids)
    if mode == AR:
        assert reply.stats.draft_tokens_proposed == 0 and reply.stats.tree_nodes_total == 0
    else:
        assert reply.stats.draft_tokens_proposed > 0
        assert len(reply.stats.drafts) == 2


@pytest.mark.parametrize("mode", [AR, SEQ, TREE])
def test_prompt_text_and_token_ids_agree(grpc_stubs, reference, tokenizer, mode):
    prompt = "import numpy as np"
    _, by_text = generate(grpc_stubs, prompt=prompt, max_new_tokens=20, mode=mode)
    _, by_ids = generate(grpc_stubs, prompt_ids=tokenizer(prompt).input_ids, max_new_tokens=20, mode=mode)
    assert list(by_text.token_ids) == list(by_ids.token_ids) == reference(tokenizer(prompt).input_ids, 20)
    assert by_text.text == by_ids.text


def test_prompt_token_ids_need_not_be_text(grpc_stubs, reference):
    # Any in-vocabulary ids are a valid prompt, the end-of-sequence token included.
    prompt_ids = [5, EOS, 60, 0, VOCAB - 2, 33]
    _, reply = generate(grpc_stubs, prompt_ids=prompt_ids, max_new_tokens=16, mode=TREE)
    assert list(reply.token_ids) == reference(prompt_ids, 16)


def test_default_max_new_tokens(grpc_stubs, reference, tokenizer, tiny_cluster):
    prompt = "x = "
    _, reply = generate(grpc_stubs, prompt=prompt, max_new_tokens=0, mode=AR)
    assert list(reply.token_ids) == reference(tokenizer(prompt).input_ids, tiny_cluster.settings.max_new_tokens)


def test_default_mode(grpc_stubs, reference, tokenizer, tiny_cluster):
    prompt = "x = "
    _, reply = generate(grpc_stubs, prompt=prompt, max_new_tokens=12, mode=generation_pb2.DECODING_MODE_UNSPECIFIED)
    assert reply.stats.mode == tiny_cluster.settings.mode
    assert list(reply.token_ids) == reference(tokenizer(prompt).input_ids, 12)


# --------------------------------------------------------------------------- streaming and rounds


@pytest.mark.parametrize("mode", [AR, SEQ, TREE])
@pytest.mark.parametrize("stop", [[], ["s-s"]], ids=["no-stop", "stop"])
def test_stream_matches_generate(grpc_stubs, mode, stop):
    request, reply = generate(grpc_stubs, prompt="def hello(x):", max_new_tokens=30, mode=mode, stop=stop, include_rounds=True)
    messages = list(grpc_stubs["generation"].GenerateStream(request, timeout=RPC_TIMEOUT_S))
    assert len(messages) >= 2
    *rounds, last = messages
    assert [m.token_ids for m in rounds if not m.token_ids] == []
    assert sum((list(m.token_ids) for m in messages), []) == list(reply.token_ids)
    assert "".join(m.text for m in messages) == reply.text
    # Only the last message carries the totals.
    assert not last.token_ids and last.HasField("stats")
    assert not any(m.HasField("stats") for m in rounds)
    assert last.finish_reason == reply.finish_reason
    assert last.stats.tokens_generated == reply.stats.tokens_generated
    assert last.stats.rounds == reply.stats.rounds == len(rounds)
    assert [m.round.index for m in rounds] == list(range(len(rounds)))
    check_stats(last.stats, reply.token_ids)


@pytest.mark.parametrize("mode", [AR, SEQ, TREE])
def test_stream_without_rounds(grpc_stubs, mode):
    request, reply = generate(grpc_stubs, prompt="for i in range(10):", max_new_tokens=16, mode=mode)
    messages = list(grpc_stubs["generation"].GenerateStream(request, timeout=RPC_TIMEOUT_S))
    assert not any(m.HasField("round") for m in messages)
    assert sum((list(m.token_ids) for m in messages), []) == list(reply.token_ids)
    assert not reply.rounds


def round_tokens(rounds) -> list[int]:
    tokens = []
    for r in rounds:
        tokens += list(r.accepted_token_ids)
        if r.bonus_token_id >= 0:
            tokens.append(r.bonus_token_id)
    return tokens


@pytest.mark.parametrize("mode,spec", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("prompt", ["def hello(x):", "3BkpLN%FcQI"])
def test_rounds_concatenate_to_output(grpc_stubs, prompt, mode, spec):
    _, reply = generate(grpc_stubs, prompt=prompt, max_new_tokens=24, mode=mode, spec=spec, include_rounds=True)
    assert len(reply.rounds) == reply.stats.rounds
    assert round_tokens(reply.rounds) == list(reply.token_ids)
    assert sum(r.bonus_token_id >= 0 for r in reply.rounds) == reply.stats.bonus_tokens
    assert sum(len(r.accepted_token_ids) for r in reply.rounds) == reply.stats.draft_tokens_accepted
    assert sum(r.tree_nodes for r in reply.rounds) == reply.stats.tree_nodes_total
    for r in reply.rounds:
        if mode == AR:
            assert not r.proposals and not r.accepted_token_ids and not r.fallback
        elif r.proposals:
            assert r.tree_nodes >= 1
            assert all(len(b.token_ids) <= (spec.get("draft_length", 5) if mode == SEQ else spec.get("beam_depth", 5))
                       for p in r.proposals for b in p.beams)
            if mode == SEQ:
                assert all(len(p.beams) == 1 for p in r.proposals)
        if r.accepted_token_ids:
            assert r.winning_draft


@pytest.mark.parametrize("mode", [SEQ, TREE])
@pytest.mark.parametrize("prompt", ["def hello(x):", "The quick brown fox"])
def test_rounds_end_at_stop_string(grpc_stubs, tokenizer, reference, prompt, mode):
    # A stop string may complete inside a round's accepted path: the round then reports only the
    # tokens that reached the output, so rounds still join up to it. ("The quick brown fox" with
    # stop "2" cuts an accepted path on the tiny models.)
    text = tokenizer.decode(reference(tokenizer(prompt).input_ids, 30), skip_special_tokens=True)
    for stop in sorted({text[i] for i in range(0, 28, 2)}):
        _, reply = generate(grpc_stubs, prompt=prompt, max_new_tokens=30, mode=mode, stop=[stop], include_rounds=True)
        assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING
        assert round_tokens(reply.rounds) == list(reply.token_ids), stop
        assert sum(len(r.accepted_token_ids) for r in reply.rounds) == reply.stats.draft_tokens_accepted
        assert all(r.bonus_token_id >= 0 or not r.bonus_is_correction for r in reply.rounds)


# --------------------------------------------------------------------------- stop strings


@pytest.mark.parametrize("mode", [AR, SEQ, TREE])
@pytest.mark.parametrize("stop_at", [(4, 3), (9, 1), (1, 5), (20, 2)])
def test_stop_string(grpc_stubs, reference, tokenizer, mode, stop_at):
    prompt = "def hello(x):"
    full = reference(tokenizer(prompt).input_ids, 40)
    full_text = tokenizer.decode(full, skip_special_tokens=True)
    start, length = stop_at
    stop = full_text[start : start + length]
    cut = full_text.find(stop)
    # The tokens up to (and including) the one that completes the first occurrence of the stop string.
    n = next(n for n in range(1, len(full) + 1) if stop in tokenizer.decode(full[:n], skip_special_tokens=True))

    _, reply = generate(grpc_stubs, prompt=prompt, max_new_tokens=40, mode=mode, stop=[stop, "never-there"])
    assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP_STRING
    assert reply.WhichOneof("stop_reason") == "stop_string" and reply.stop_string == stop
    assert reply.text == full_text[:cut]
    assert stop not in reply.text
    assert list(reply.token_ids) == full[:n]
    check_stats(reply.stats, reply.token_ids)


def test_stop_string_never_seen(grpc_stubs, reference, tokenizer):
    prompt = "def hello(x):"
    _, reply = generate(grpc_stubs, prompt=prompt, max_new_tokens=20, mode=TREE, stop=["never-there"])
    assert reply.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert list(reply.token_ids) == reference(tokenizer(prompt).input_ids, 20)


# --------------------------------------------------------------------------- run log, health, info, sessions


def test_run_log_written(grpc_stubs, tiny_cluster):
    log_dir = Path(tiny_cluster.settings.log_dir)
    before = set(log_dir.glob("*.json"))
    _, reply = generate(grpc_stubs, prompt="while True:", max_new_tokens=12, mode=TREE, stop=["never-there"])
    new = set(log_dir.glob("*.json")) - before
    assert len(new) == 1, f"expected one new run log in {log_dir}, found {sorted(new)}"
    run = json.loads(new.pop().read_text())
    assert run["token_ids"] == list(reply.token_ids)
    assert run["text"] == reply.text
    assert run["finish_reason"] == "length"
    assert run["request"]["mode"] == "tree" and run["request"]["stop"] == ["never-there"]
    assert run["request"]["prompt_tokens"] == reply.stats.prompt_tokens
    stats = run["stats"]
    for key in ("tokens_generated", "rounds", "bonus_tokens", "draft_tokens_proposed",
                "draft_tokens_accepted", "tree_nodes_total", "prompt_tokens"):
        assert stats[key] == getattr(reply.stats, key), key
    assert stats["mean_accepted_per_round"] == pytest.approx(reply.stats.mean_accepted_per_round, rel=1e-5)
    assert len(run["rounds"]) == reply.stats.rounds
    assert set(stats["drafts"]) == {d.draft for d in reply.stats.drafts}
    # Drafts keep their names; the model each serves is a field of its own.
    models = dict(zip(["draft-0", "draft-1"], tiny_cluster.settings.draft_models))
    assert {d.draft: d.model for d in reply.stats.drafts} == models
    assert {name: d["model"] for name, d in stats["drafts"].items()} == models
    assert "".join(run["token_texts"]) == run["text"] and run["prompt"]


def test_health_and_reflection(tiny_cluster):
    for address, service in services(tiny_cluster):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT_S)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (address, name)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = list(reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT_S
            ))
            listed = {s.name for s in replies[0].list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= listed, (address, listed)
            # Reflection serves the service's descriptor too, so generic clients can call it.
            replies = list(reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)]), timeout=RPC_TIMEOUT_S
            ))
            assert replies[0].HasField("file_descriptor_response"), (address, replies[0])


def test_get_info(grpc_stubs, tiny_cluster):
    orchestrator, verify, *drafts = all_infos(grpc_stubs)
    assert [i.service for i in (orchestrator, verify, *drafts)] == ["orchestrator", "verify", "draft", "draft"]
    fingerprints = {i.tokenizer_fingerprint for i in (orchestrator, verify, *drafts)}
    assert len(fingerprints) == 1 and len(fingerprints.pop()) == 64
    for info in (orchestrator, verify, *drafts):
        assert info.vocab_size == VOCAB
        assert info.device == "cpu"
        assert info.dtype == "float32"
        assert info.max_context == 512
        assert list(info.eos_token_ids) == [EOS]
        assert info.version
    assert verify.model == orchestrator.model == tiny_cluster.settings.target_model
    assert [d.model for d in drafts] == tiny_cluster.settings.draft_models
    # Each model service timed its forwards before it served (the start-up calibration, also its warm-up).
    for info in (verify, *drafts):
        assert [c.rows for c in info.forward_costs] == list(CALIBRATION_ROWS)
        assert all(c.ms > 0 for c in info.forward_costs)


@pytest.mark.parametrize("mode", [SEQ, TREE])
def test_sessions_released_after_generation(grpc_stubs, mode):
    generate(grpc_stubs, prompt="def f():", max_new_tokens=16, mode=mode)
    assert wait_for_no_sessions(grpc_stubs) == [0, 0, 0]
    request, _ = generate(grpc_stubs, prompt="def g():", max_new_tokens=16, mode=mode)
    list(grpc_stubs["generation"].GenerateStream(request, timeout=RPC_TIMEOUT_S))
    assert wait_for_no_sessions(grpc_stubs) == [0, 0, 0]
    infos = all_infos(grpc_stubs)[1:]
    assert [i.cached_tokens for i in infos] == [0, 0, 0]


# --------------------------------------------------------------------------- KV reuse on the verify service


def tree_around(truth: list[int], accept: int) -> tuple[list[int], list[int]]:
    """A tree with a wrong child of the root, the true next ``accept`` tokens as a chain, then a wrong
    token after the chain: the target accepts exactly the chain and returns ``truth[accept]`` as bonus."""
    wrong = lambda t, k=1: (t + k) % VOCAB  # noqa: E731
    tokens, parents = [wrong(truth[0])], [-1]
    for i in range(accept):
        tokens.append(truth[i])
        parents.append(-1 if i == 0 else len(tokens) - 2)
    tokens.append(wrong(truth[accept], 2))
    parents.append(len(tokens) - 2 if accept else -1)
    return tokens, parents


def verify(stub, context, tokens, parents, session_id="a-session"):
    return stub.VerifyTree(
        verify_pb2.VerifyTreeRequest(session_id=session_id, context_token_ids=context, tree_token_ids=tokens, tree_parents=parents),
        timeout=RPC_TIMEOUT_S,
    )


def verify_round(stub, truth: list[int], prompt_len: int, context: list[int], accept: int, session_id: str, reused: int):
    """One round on the verify service with a tree that accepts ``accept`` tokens; checks the
    target's tokens and the cache bookkeeping (``reused``: the context tokens the cache should hold).
    Returns (the next context: accepted path + bonus appended, what the next round should reuse)."""
    done = len(context) - prompt_len
    tokens, parents = tree_around(truth[done:], accept)
    reply = verify(stub, context, tokens, parents, session_id)
    target = list(reply.target_token_ids)
    assert len(target) == len(tokens) + 1
    # At the context end and after each chain node the target predicts the true next token.
    assert target[0] == truth[done]
    assert target[2 : 2 + accept] == truth[done + 1 : done + accept + 1]
    assert reply.reused_tokens == reused
    assert reply.fed_tokens == len(context) - reused + len(tokens)
    assert reply.cached_tokens == len(context) + len(tokens)
    # Next round the cache keeps this context plus the accepted nodes; rejected branches are dropped.
    return context + truth[done : done + accept + 1], len(context) + accept


def run_verify_rounds(stub, reference, prompt_ids, accepts, session_id):
    """Feed the accepted path + bonus back round after round from a fresh session; returns the context."""
    truth = reference(prompt_ids, sum(accepts) + len(accepts) + 8)
    context, reused = list(prompt_ids), 0
    for accept in accepts:
        context, reused = verify_round(stub, truth, len(prompt_ids), context, accept, session_id, reused)
    return context


def test_verify_tree_reuses_kv_across_rounds(grpc_stubs, reference, tokenizer):
    stub = grpc_stubs["verify"]
    prompt_ids = tokenizer("def quicksort(arr):").input_ids
    session = "kv-reuse-test"
    try:
        context = run_verify_rounds(stub, reference, prompt_ids, [2, 0, 3, 1, 4], session)
        done = len(context) - len(prompt_ids)
        truth = reference(prompt_ids, done + 8)[done:]
        tokens, parents = tree_around(truth, 2)
        warm = verify(stub, context, tokens, parents, session)
        assert warm.reused_tokens == len(context) - 1  # all but the bonus token just appended
        # After a release the same call is a cache miss, and still gives identical tokens.
        released = stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session), timeout=RPC_TIMEOUT_S)
        assert released.released
        cold = verify(stub, context, tokens, parents, session)
        assert cold.reused_tokens == 0 and cold.fed_tokens == len(context) + len(tokens)
        assert cold.cached_tokens == len(context) + len(tokens)
        assert list(cold.target_token_ids) == list(warm.target_token_ids)
        stateless = verify(stub, context, tokens, parents, session_id="")
        assert list(stateless.target_token_ids) == list(warm.target_token_ids)
        assert cold.target_token_ids[0] == truth[0]
        # The same request once more: its tree is cached but none of it is on the context, so only
        # the context is reused and the tree is fed again.
        again = verify(stub, context, tokens, parents, session)
        assert again.reused_tokens == len(context) - 1
        assert list(again.target_token_ids) == list(warm.target_token_ids)
    finally:
        stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session), timeout=RPC_TIMEOUT_S)
    assert not stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session), timeout=RPC_TIMEOUT_S).released
    assert stub.GetInfo(common_pb2.GetInfoRequest(), timeout=RPC_TIMEOUT_S).active_sessions == 0


def test_a_call_sends_only_what_its_session_lacks(grpc_stubs, reference, tokenizer, tiny_cluster):
    """The lean wire: after a first call, the next sends only the new tokens (context_start); a
    session that lacks the prefix answers NOT_FOUND; the orchestrator's clients then resend it whole."""
    from specdec.orchestrator.clients import GrpcDraftClient, GrpcVerifyClient
    from specdec.tree import TokenTree
    from specdec.v1 import draft_pb2

    stub, draft = grpc_stubs["verify"], grpc_stubs["drafts"][0]
    prompt_ids = tokenizer("def quicksort(arr):").input_ids
    truth = reference(prompt_ids, 3)
    session = "lean-wire-test"
    try:
        verify(stub, prompt_ids, [], [], session)
        lean = stub.VerifyTree(verify_pb2.VerifyTreeRequest(
            session_id=session, context_start=len(prompt_ids), context_token_ids=truth[:2]), timeout=RPC_TIMEOUT_S)
        assert list(lean.target_token_ids) == [truth[2]] and lean.reused_tokens == len(prompt_ids)
        for call in (lambda start: stub.VerifyTree(verify_pb2.VerifyTreeRequest(
                         session_id=session, context_start=start, context_token_ids=[truth[2]]), timeout=RPC_TIMEOUT_S),
                     lambda start: draft.DraftBeams(draft_pb2.DraftBeamsRequest(
                         session_id=session, context_start=start, context_token_ids=[truth[2]], beam_width=1, beam_depth=1),
                         timeout=RPC_TIMEOUT_S)):
            with pytest.raises(grpc.RpcError) as lost:
                call(len(prompt_ids) + 10)  # more than the session holds (the draft's holds nothing)
            assert lost.value.code() == grpc.StatusCode.NOT_FOUND and "whole context" in lost.value.details()
    finally:
        stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session), timeout=RPC_TIMEOUT_S)
    # The clients: the first call whole, the next incremental; after the service lost the session, whole again.
    verifier = GrpcVerifyClient(tiny_cluster.verify_address)
    drafter = GrpcDraftClient(tiny_cluster.draft_addresses[0])
    try:
        for step in range(3):
            context = prompt_ids + truth[:step]
            assert verifier.verify(session, context, TokenTree(), RPC_TIMEOUT_S)[0] == [truth[step]]
            assert drafter.draft(session, context, 1, 1, RPC_TIMEOUT_S).paths
            if step == 1:
                stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session), timeout=RPC_TIMEOUT_S)
                draft.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session), timeout=RPC_TIMEOUT_S)
    finally:
        verifier.release(session)
        drafter.release(session)
        verifier.close()
        drafter.close()


def test_verify_empty_tree_is_one_decoding_step(grpc_stubs, reference, tokenizer):
    prompt_ids = tokenizer("abc").input_ids
    reply = verify(grpc_stubs["verify"], prompt_ids, [], [], session_id="")
    assert list(reply.target_token_ids) == reference(prompt_ids, 1)
    assert reply.fed_tokens == len(prompt_ids)


# --------------------------------------------------------------------------- tokenizer mismatch


def test_orchestrator_refuses_mismatched_draft_tokenizer(tiny_cluster, tiny_dirs, tmp_path):
    # A draft whose tokenizer has one extra token: same model shape, different vocabulary.
    bad_dir = tmp_path / "draft-extra-token"
    tiny_qwen2(seed=3, layers=1, eos_token_id=EOS).save_pretrained(bad_dir)
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(bad_dir)

    port = free_port()
    draft = subprocess.Popen(
        [sys.executable, "-m", "specdec.draft_service", "--host", "127.0.0.1", "--port", str(port), "--draft-model", str(bad_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(f"127.0.0.1:{port}", 120, alive=lambda: draft.poll() is None)
        orchestrator = subprocess.run(
            [sys.executable, "-m", "specdec.orchestrator", "--host", "127.0.0.1", "--port", str(free_port()),
             "--target-model", str(tiny_dirs["target"]), "--verify-address", tiny_cluster.verify_address,
             "--draft-addresses", f"{tiny_cluster.draft_addresses[0]},127.0.0.1:{port}", "--log-dir", ""],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        draft.terminate()
        draft.wait(30)
    assert orchestrator.returncode == 1, orchestrator.stderr
    assert "listening" not in orchestrator.stdout
    assert "Traceback" not in orchestrator.stderr, orchestrator.stderr
    assert str(bad_dir) in orchestrator.stderr
    assert str(tiny_dirs["target"]) in orchestrator.stderr
    assert "tokenizer" in orchestrator.stderr


# --------------------------------------------------------------------------- request parity


def test_logprobs_request_id_and_stop_tokens_over_the_wire(grpc_stubs, reference, tokenizer):
    """The target's log-probabilities come back one per token (and the same streamed), the client's
    request id is echoed on every message, a stop token ends the output where it first comes."""
    prompt_ids = tokenizer("def hello(x):").input_ids
    full = reference(prompt_ids, 16)
    fields = dict(prompt_ids=prompt_ids, max_new_tokens=16, logprobs=True, top_logprobs=2, request_id="client-7")
    _, reply = generate(grpc_stubs, **fields)
    assert list(reply.token_ids) == full and reply.request_id == "client-7"
    assert [t.token_id for t in reply.logprobs] == full
    assert all(t.top_token_ids[0] == t.token_id and len(t.top_logprobs) == 2 and t.logprob <= 0 for t in reply.logprobs)
    request, _ = generate(grpc_stubs, **fields)
    chunks = list(grpc_stubs["generation"].GenerateStream(request, timeout=RPC_TIMEOUT_S))
    assert all(c.request_id == "client-7" for c in chunks)
    assert [t for c in chunks for t in c.logprobs] == list(reply.logprobs)
    stop = full[3]
    _, stopped = generate(grpc_stubs, prompt_ids=prompt_ids, max_new_tokens=16, stop_token_ids=[stop])
    assert list(stopped.token_ids) == full[: full.index(stop) + 1]
    assert stopped.finish_reason == generation_pb2.FINISH_REASON_STOP_TOKEN and stopped.stop_token_id == stop
    assert stopped.request_id.startswith("req-")  # made up when the client sets none


@pytest.mark.parametrize("fields, words", [
    ({"request_id": "x" * 129}, ["request_id"]),
    ({"request_id": "bad\nid"}, ["request_id"]),
    ({"top_logprobs": 2}, ["top_logprobs", "logprobs"]),
    ({"stop_token_ids": [-1]}, ["stop_token_ids"]),
])
def test_bad_parity_fields_are_invalid_argument(grpc_stubs, fields, words):
    with pytest.raises(grpc.RpcError) as err:
        generate(grpc_stubs, prompt_ids=[10, 11, 12], max_new_tokens=4, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(w in err.value.details() for w in words), err.value.details()
