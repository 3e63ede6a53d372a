"""Property-based bad input at every RPC of a real tiny cluster (each service its own process on
loopback): Generate, GenerateStream, DraftBeams and VerifyTree get random field values, malformed
trees, out-of-vocabulary ids, oversized fields, unknown enum values, and, at the wire level, random
bytes, mutated and hand-encoded messages (wrong wire types, invalid UTF-8 in string fields) and
messages over the size limit. The HTTP API's routes get random JSON bodies the same way.

What must hold for every call: it answers within its deadline, either OK (a random request can be
a valid one: then its output must be right) or a status that names the caller's fault
(INVALID_ARGUMENT, OUT_OF_RANGE, or RESOURCE_EXHAUSTED for a deliberate rejection), never INTERNAL,
UNKNOWN or DEADLINE_EXCEEDED; no service process dies; and valid generations afterwards still
equal the tiny target's own greedy ``generate``.

The example counts are small so the file runs in about two minutes on two cores and replays the
same examples on every run. ``SPECDEC_FUZZ_EXAMPLES=N`` runs N examples per property, from a fresh
random seed each time, for a longer search.
"""

from __future__ import annotations

import json
import os
import string

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec.v1 import common_pb2, draft_pb2, generation_pb2, verify_pb2
from test_services_grpc import AR, SEQ, TREE, wait_for_no_sessions
from tiny_models import VOCAB, tiny_tokenizer

CALL_TIMEOUT_S = 30.0
MAX_CONTEXT = 512  # max_position_embeddings of the tiny models
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
REJECTIONS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ_EXAMPLES = int(os.environ.get("SPECDEC_FUZZ_EXAMPLES", "0"))
SESSIONS = ["fuzz-a", "fuzz-b"]  # stateful calls reuse these, so cached sessions meet random contexts

GENERATION = "/specdec.v1.GenerationService/"
DRAFT = "/specdec.v1.DraftService/DraftBeams"
VERIFY = "/specdec.v1.VerifyService/VerifyTree"


def fuzz(examples: int):
    """Bounded and replayable by default; SPECDEC_FUZZ_EXAMPLES=N for a longer random search."""
    return settings(
        max_examples=FUZZ_EXAMPLES or examples,
        derandomize=not FUZZ_EXAMPLES,
        database=None,
        print_blob=True,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Tally:
    """Inputs tried and how they were answered, printed at the end (pytest -s shows it)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.ties = 0  # outputs that left the reference at a near-tie of the top logits
        self.sessions = set(SESSIONS)  # every session id a call may have made, released afterwards

    def add(self, rpc: str, code: grpc.StatusCode) -> None:
        self.counts[rpc, code.name] = self.counts.get((rpc, code.name), 0) + 1

    def total(self) -> int:
        return sum(self.counts.values())


@pytest.fixture(scope="module")
def tally():
    t = Tally()
    yield t
    lines = [f"  {rpc:<28} {code:<20} {n}" for (rpc, code), n in sorted(t.counts.items())]
    print(f"\nfuzzed inputs: {t.total()} (near-ties taken the other way: {t.ties})\n" + "\n".join(lines))


def release_sessions(grpc_stubs, session_ids) -> None:
    for stub in [grpc_stubs["verify"], *grpc_stubs["drafts"]]:
        for s in session_ids:
            stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=s), timeout=CALL_TIMEOUT_S)


@pytest.fixture(scope="module")
def cluster(tiny_cluster, grpc_stubs, tally):
    """The session cluster; the sessions the fuzzing made are released after this module."""
    yield tiny_cluster
    release_sessions(grpc_stubs, tally.sessions)


@pytest.fixture(scope="module")
def channels(cluster):
    """Raw channels (bytes in, bytes out) to the orchestrator, the verifier and the first draft."""
    opened = {
        "generation": grpc.insecure_channel(cluster.orchestrator_address),
        "verify": grpc.insecure_channel(cluster.verify_address),
        "draft": grpc.insecure_channel(cluster.draft_addresses[0]),
    }
    yield opened
    for channel in opened.values():
        channel.close()


TIE = 1e-4  # top logits closer than this (relative) are a tie that float rounding may break either way


def next_token_logits(model, context: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([context])).logits[0, -1]


def is_tie(model, context: list[int], token: int) -> bool:
    """Whether ``token`` is within rounding of the target's best logit after ``context``: a batched
    tree pass and a one-token pass round differently, so there either token is the target's."""
    logits = next_token_logits(model, context)
    return float(logits.max() - logits[token]) <= TIE * max(1.0, float(logits.abs().max()))


def assert_target_tokens(model, contexts: list[list[int]], tokens: list[int], tally) -> None:
    for context, token in zip(contexts, tokens):
        best = int(next_token_logits(model, context).argmax())
        if token != best:
            assert is_tie(model, context, token), f"after {context}: {token}, the target's greedy token is {best}"
            tally.ties += 1


def assert_alive(cluster) -> None:
    dead = [(p.name, p.popen.returncode, p.log_tail()) for p in cluster.processes if p.popen.poll() is not None]
    assert not dead, f"service process(es) exited: {dead}"


def answer(call, rpc: str, tally: Tally, cluster):
    """Run ``call()``; return (code, reply). Fails on a status that is not the caller's fault."""
    try:
        reply, code = call(), grpc.StatusCode.OK
    except grpc.RpcError as error:
        reply, code = error, error.code()
        assert code in REJECTIONS, f"{rpc} answered {code.name}: {error.details()}"
        assert error.details(), f"{rpc} answered {code.name} without saying why"
    finally:
        assert_alive(cluster)
    tally.add(rpc, code)
    return code, reply


# --------------------------------------------------------------------------- strategies
# Each request starts valid; then up to three of its fields (often none) are replaced by bad
# values, so every validator is hit alone and in combination, and valid requests check the output.

BAD_INT32 = st.one_of(st.sampled_from([INT32_MIN, -(2**31) + 1, -1, INT32_MAX]), st.integers(INT32_MIN, INT32_MAX))
bad_token_id = st.one_of(st.sampled_from([-1, VOCAB, VOCAB + 1, INT32_MAX, INT32_MIN]), st.integers(INT32_MIN, -1), st.integers(VOCAB, INT32_MAX))
good_token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)


@st.composite
def bad_token_ids(draw):
    """Out-of-vocabulary ids among good ones, empty lists, and lists that reach or pass the context."""
    kind = draw(st.sampled_from(["out-of-vocabulary", "empty", "long"]))
    if kind == "empty":
        return []
    if kind == "long":
        return [draw(st.integers(0, VOCAB - 1))] * draw(st.sampled_from([MAX_CONTEXT - 1, MAX_CONTEXT, MAX_CONTEXT + 1, 200_000]))
    ids = draw(good_token_ids)
    ids.insert(draw(st.integers(0, len(ids))), draw(bad_token_id))
    return ids


bad_float = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, -1e-30, 1.5, 3.4e38]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=16)  # any code point but lone surrogates
printable_text = st.text(alphabet=string.printable[:95], min_size=1, max_size=16)
bad_stop = st.one_of(
    st.lists(any_text, min_size=1, max_size=4).map(lambda stops: [*stops, ""]),
    st.builds(lambda n: ["x" * n], st.sampled_from([10_000, 1_000_000])),
    st.builds(lambda n: ["ab"] * n, st.sampled_from([1_000, 100_000])),
    st.lists(any_text.filter(bool), min_size=1, max_size=4),
)


class Fields:
    """Draws each field from its good strategy, or from its bad one when the field was picked."""

    def __init__(self, draw, names: list[str]) -> None:
        self.draw = draw
        some = st.sets(st.sampled_from(names), min_size=1, max_size=3)
        self.bad = draw(st.one_of(st.just(set()), some, some))  # a third of the requests valid

    def __call__(self, name: str, good, bad):
        return self.draw(bad if name in self.bad else good)


def sampling_fields(field: Fields, prefix: str = "") -> dict:
    greedy = field.draw(st.booleans())
    return {
        "temperature": field(prefix + "temperature", st.just(0.0) if greedy else st.sampled_from([0.5, 1.0, 1.3]), bad_float),
        "top_p": field(prefix + "top_p", st.sampled_from([0.0, 0.9, 1.0]), bad_float),
        "top_k": field(prefix + "top_k", st.sampled_from([0, 1, 5, VOCAB]), BAD_INT32.filter(lambda k: k < 0)),
    }


GENERATE_FIELDS = ["prompt", "prompt_token_ids", "both", "max_new_tokens", "mode", "draft_length", "beam_width",
                   "beam_depth", "max_tree_nodes", "sampling.temperature", "sampling.top_p", "sampling.top_k", "stop",
                   "request_id", "stop_token_ids", "top_logprobs"]


@st.composite
def generate_requests(draw) -> generation_pb2.GenerateRequest:
    field = Fields(draw, GENERATE_FIELDS)
    as_text = draw(st.booleans())
    prompt = field("prompt", printable_text if as_text else st.just(""),
                   st.one_of(st.just(""), any_text, st.builds(lambda n: "a" * n, st.sampled_from([MAX_CONTEXT, 1_000_000]))))
    ids = field("prompt_token_ids", st.just([]) if as_text else good_token_ids, bad_token_ids())
    if "both" in field.bad:
        prompt, ids = prompt or "abc", ids or [1, 2]
    logprobs = draw(st.booleans())
    return generation_pb2.GenerateRequest(
        prompt=prompt,
        prompt_token_ids=ids,
        max_new_tokens=field("max_new_tokens", st.integers(0, 8), st.one_of(BAD_INT32.filter(lambda n: n < 0), st.sampled_from([513, 4096, 4097, INT32_MAX]))),
        mode=field("mode", st.integers(0, 3), st.one_of(st.sampled_from([-1, 4, 99]), BAD_INT32)),
        speculation=generation_pb2.SpeculationParams(
            draft_length=field("draft_length", st.integers(0, 6), st.one_of(st.just(17), BAD_INT32.filter(lambda n: n < 0 or n > 16))),
            beam_width=field("beam_width", st.integers(0, 4), st.one_of(st.just(9), BAD_INT32.filter(lambda n: n < 0 or n > 8))),
            beam_depth=field("beam_depth", st.integers(0, 6), st.one_of(st.just(17), BAD_INT32.filter(lambda n: n < 0 or n > 16))),
            max_tree_nodes=field("max_tree_nodes", st.integers(0, 24), st.one_of(st.just(1025), BAD_INT32.filter(lambda n: n < 0 or n > 1024))),
        ),
        sampling=generation_pb2.SamplingParams(**sampling_fields(field, "sampling."), seed=draw(st.integers(0, 2**64 - 1))),
        stop=field("stop", st.one_of(st.just([]), st.lists(printable_text, max_size=3)), bad_stop),
        include_rounds=draw(st.booleans()),
        request_id=field("request_id", st.one_of(st.just(""), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=128)),
                         st.one_of(st.builds(lambda n: "r" * n, st.sampled_from([129, 100_000])), st.text(min_size=1).filter(lambda t: not (t.isascii() and t.isprintable())))),
        stop_token_ids=field("stop_token_ids", st.lists(st.integers(0, VOCAB - 1), max_size=3),
                             st.one_of(st.lists(bad_token_id, min_size=1, max_size=3), st.just(list(range(65))))),
        logprobs=logprobs,
        top_logprobs=field("top_logprobs", st.integers(0, 5) if logprobs else st.just(0),
                           st.one_of(st.integers(21, INT32_MAX), st.integers(INT32_MIN, -1), st.integers(1, 5) if not logprobs else st.just(21))),
    )


session_id = st.one_of(st.just(""), st.sampled_from(SESSIONS))
bad_session_id = st.one_of(any_text, st.builds(lambda n: "s" * n, st.sampled_from([10_000, 1_000_000])))


@st.composite
def topological_tree(draw, max_nodes: int = 10) -> tuple[list[int], list[int]]:
    n = draw(st.integers(0, max_nodes))
    return draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)), [draw(st.integers(-1, i - 1)) for i in range(n)]


@st.composite
def bad_tree(draw) -> tuple[list[int], list[int]]:
    """Every way to break the parent contract, out-of-vocabulary nodes, and an oversized tree."""
    kind = draw(st.sampled_from(["self", "forward", "below", "random", "length", "token", "huge"]))
    if kind == "huge":
        return [1] * 5000, [-1] * 5000
    tokens, parents = draw(topological_tree().filter(lambda tree: tree[0]))
    i = draw(st.integers(0, len(tokens) - 1))
    if kind == "self":  # a node its own parent: a cycle of one
        parents[i] = i
    elif kind == "forward":  # parent >= index: a cycle, or a parent that is not there
        parents[i] = draw(st.one_of(st.integers(i, len(tokens) + 2), st.integers(i, INT32_MAX)))
    elif kind == "below":  # below -1: a node attached to nothing
        parents[i] = draw(st.integers(INT32_MIN, -2))
    elif kind == "random":
        parents = draw(st.lists(BAD_INT32, min_size=len(tokens), max_size=len(tokens)))
    elif kind == "length":
        parents = parents[:-1] if draw(st.booleans()) else parents + [-1]
    else:
        tokens[i] = draw(bad_token_id)
    return tokens, parents


@st.composite
def verify_requests(draw) -> verify_pb2.VerifyTreeRequest:
    field = Fields(draw, ["session_id", "context_token_ids", "tree", "temperature", "top_p", "top_k"])
    tokens, parents = field("tree", topological_tree(), bad_tree())
    return verify_pb2.VerifyTreeRequest(
        session_id=field("session_id", session_id, bad_session_id),
        context_token_ids=field("context_token_ids", good_token_ids, bad_token_ids()),
        tree_token_ids=tokens, tree_parents=parents, **sampling_fields(field),
    )


@st.composite
def draft_requests(draw) -> draft_pb2.DraftBeamsRequest:
    field = Fields(draw, ["session_id", "context_token_ids", "beam_width", "beam_depth", "temperature", "top_p", "top_k"])
    return draft_pb2.DraftBeamsRequest(
        session_id=field("session_id", session_id, bad_session_id),
        context_token_ids=field("context_token_ids", good_token_ids, bad_token_ids()),
        beam_width=field("beam_width", st.integers(1, 4), st.one_of(st.sampled_from([0, 9]), BAD_INT32.filter(lambda n: n < 1 or n > 8))),
        beam_depth=field("beam_depth", st.integers(1, 6), st.one_of(st.sampled_from([0, 17]), BAD_INT32.filter(lambda n: n < 1 or n > 16))),
        seed=draw(st.integers(0, 2**64 - 1)),
        **sampling_fields(field),
    )


# --------------------------------------------------------------------------- structured fuzzing


def check_generation(request, token_ids: list[int], reference, model, tally) -> None:
    """An accepted greedy request must give the target's own tokens (a stop string may end them early)."""
    assert all(0 <= t < VOCAB for t in token_ids)
    if request.sampling.temperature != 0:
        return
    prompt = list(request.prompt_token_ids) or tiny_tokenizer()(request.prompt).input_ids
    limit = request.max_new_tokens or len(token_ids)
    expected = reference(prompt, limit)
    assert len(token_ids) <= limit
    for k, (got, want) in enumerate(zip(token_ids, expected)):
        if got != want:
            assert is_tie(model, prompt + token_ids[:k], got), f"token {k} is {got}; the target's greedy token is {want}"
            tally.ties += 1
            return  # past a tie the two continuations differ, both correctly
    if not request.stop and not request.stop_token_ids:
        assert len(token_ids) == len(expected)


@fuzz(70)
@given(request=generate_requests(), streamed=st.booleans())
def test_generate_fuzz(grpc_stubs, cluster, tally, reference, reference_model, request, streamed):
    stub = grpc_stubs["generation"]
    if streamed:
        code, reply = answer(lambda: list(stub.GenerateStream(request, timeout=CALL_TIMEOUT_S)), "GenerateStream", tally, cluster)
        if code == grpc.StatusCode.OK:
            assert reply[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
            check_generation(request, [t for chunk in reply for t in chunk.token_ids], reference, reference_model, tally)
    else:
        code, reply = answer(lambda: stub.Generate(request, timeout=CALL_TIMEOUT_S), "Generate", tally, cluster)
        if code == grpc.StatusCode.OK:
            check_generation(request, list(reply.token_ids), reference, reference_model, tally)
            assert [t.token_id for t in reply.logprobs] == (list(reply.token_ids) if request.logprobs else [])
            assert reply.request_id == (request.request_id or reply.request_id) != ""


@fuzz(70)
@given(request=verify_requests())
def test_verify_tree_fuzz(grpc_stubs, cluster, tally, reference_model, request):
    tally.sessions.add(request.session_id)
    code, reply = answer(lambda: grpc_stubs["verify"].VerifyTree(request, timeout=CALL_TIMEOUT_S), "VerifyTree", tally, cluster)
    if code != grpc.StatusCode.OK:
        return
    n = len(request.tree_token_ids)
    assert len(reply.target_token_ids) == n + 1 and all(0 <= t < VOCAB for t in reply.target_token_ids)
    if request.temperature == 0:
        # Each node's prediction is the target's next token after the context and the node's path.
        context, tokens, parents = list(request.context_token_ids), list(request.tree_token_ids), list(request.tree_parents)
        paths = []
        for i in range(n):
            path, node = [], i
            while node >= 0:
                path.insert(0, tokens[node])
                node = parents[node]
            paths.append(context + path)
        assert_target_tokens(reference_model, [context, *paths], list(reply.target_token_ids), tally)


@fuzz(50)
@given(request=draft_requests(), draft=st.integers(0, 1))
def test_draft_beams_fuzz(grpc_stubs, cluster, tally, request, draft):
    stub = grpc_stubs["drafts"][draft]
    tally.sessions.add(request.session_id)
    code, reply = answer(lambda: stub.DraftBeams(request, timeout=CALL_TIMEOUT_S), "DraftBeams", tally, cluster)
    if code == grpc.StatusCode.OK:
        assert 1 <= len(reply.beams) <= request.beam_width
        for beam in reply.beams:
            assert 1 <= len(beam.token_ids) <= request.beam_depth and all(0 <= t < VOCAB for t in beam.token_ids)


# --------------------------------------------------------------------------- wire-level fuzzing
# Bytes the generated stubs would never send: protobuf python refuses to build them.


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wire_field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    """One encoded field; length-delimited payloads get their length prefix."""
    key = varint(number << 3 | wire_type)
    return key + (varint(len(payload)) + payload if wire_type == 2 else payload)


def raw_call(channels, target: str, request: bytes):
    """Send ``request`` as the serialized message; returns the raw reply (a list for the stream)."""
    if target == "GenerateStream":
        call = channels["generation"].unary_stream(GENERATION + "GenerateStream")
        return list(call(request, timeout=CALL_TIMEOUT_S))
    channel, path = {"Generate": ("generation", GENERATION + "Generate"), "DraftBeams": ("draft", DRAFT),
                     "VerifyTree": ("verify", VERIFY)}[target]
    return channels[channel].unary_unary(path)(request, timeout=CALL_TIMEOUT_S)


VALID = {
    "Generate": generation_pb2.GenerateRequest(prompt_token_ids=[10, 11, 12], max_new_tokens=3, stop=["zz"]),
    "GenerateStream": generation_pb2.GenerateRequest(prompt="ab", max_new_tokens=3, mode=SEQ),
    "DraftBeams": draft_pb2.DraftBeamsRequest(context_token_ids=[5, 6, 7], beam_width=2, beam_depth=3),
    "VerifyTree": verify_pb2.VerifyTreeRequest(context_token_ids=[5, 6], tree_token_ids=[1, 2], tree_parents=[-1, 0]),
}
RPCS = sorted(VALID)
payload = st.one_of(st.binary(max_size=24), st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
# Any field number (known or not, 0 and the largest included), any wire type (3 to 7 are groups
# and reserved types), any payload.
random_field = st.builds(
    lambda number, wire_type, value, data: wire_field(number, wire_type, data if wire_type == 2 else varint(value) if wire_type == 0 else data),
    st.one_of(st.integers(0, 12), st.just(2**29 - 1)), st.integers(0, 7), st.integers(-(2**63), 2**64 - 1), payload,
)


@st.composite
def mutated(draw, rpc: str) -> bytes:
    """A valid message with random bytes replaced, inserted, dropped or appended."""
    data = bytearray(VALID[rpc].SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "drop", "append_field"]))
        if op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "drop" and at < len(data):
            del data[at]
        elif op == "append_field":
            data += draw(random_field)
    return bytes(data)


@fuzz(80)
@given(rpc=st.sampled_from(RPCS), data=st.data())
def test_wire_bytes_fuzz(channels, cluster, tally, rpc, data):
    request = data.draw(st.one_of(
        st.binary(max_size=64), mutated(rpc), st.lists(random_field, min_size=1, max_size=5).map(b"".join),
    ))
    if rpc in ("DraftBeams", "VerifyTree"):
        try:  # bytes that parse may name a session
            tally.sessions.add(type(VALID[rpc]).FromString(request).session_id)
        except Exception:  # noqa: BLE001 - not a message: the service refuses it too
            pass
    answer(lambda: raw_call(channels, rpc, request), f"{rpc} (bytes)", tally, cluster)


# (rpc, field number of a string field, where) for invalid UTF-8 in each string field
STRING_FIELDS = [
    ("Generate", 7, "stop"), ("GenerateStream", 7, "stop"), ("Generate", 1, "prompt"),
    ("DraftBeams", 1, "session_id"), ("VerifyTree", 1, "session_id"),
]


@pytest.mark.parametrize("rpc,number,field", STRING_FIELDS, ids=[f"{r}-{f}" for r, _, f in STRING_FIELDS])
@pytest.mark.parametrize("bad", [b"\xff\xfe", b"ab\xc3\x28", b"\xed\xa0\x80"], ids=["ff-fe", "bad-continuation", "surrogate"])
def test_invalid_utf8_in_string_field(channels, cluster, tally, rpc, number, field, bad):
    # Appended after a valid message: the parser reaches it with everything else fine.
    request = VALID[rpc].SerializeToString() + wire_field(number, 2, bad)
    code, error = answer(lambda: raw_call(channels, rpc, request), f"{rpc} (utf-8)", tally, cluster)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("rpc", RPCS)
def test_wrong_wire_type(channels, cluster, tally, rpc):
    # Field 2 is a repeated int32 (or prompt_token_ids) in every request; sent as a group start.
    request = VALID[rpc].SerializeToString() + varint(2 << 3 | 3)
    code, _ = answer(lambda: raw_call(channels, rpc, request), f"{rpc} (wire type)", tally, cluster)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("rpc", RPCS)
def test_message_over_size_limit(channels, cluster, tally, rpc):
    # The services accept messages up to max_message_mb (64 MiB by default).
    request = VALID[rpc].SerializeToString() + wire_field(15, 2, b"\0" * (65 << 20))
    code, _ = answer(lambda: raw_call(channels, rpc, request), f"{rpc} (over limit)", tally, cluster)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------- found by fuzzing
# Requests that were slow to refuse (a hang at the wire's size limit), kept as plain cases: each
# must be refused as bad input, naming the field, within seconds.
FOUND = [
    # Tokenised in full before the context check: 30 M characters took 53 s on the tiny tokenizer.
    ("prompt-text-far-past-context", {"prompt": "a" * 20_000_000}, ["prompt", "characters"]),
    # Every streamed round looked for each prefix of each stop string: quadratic in its length
    # (1 M characters: 11 s a round; at the 64 MiB message limit, hours).
    ("stop-string-too-long", {"prompt_token_ids": [10, 11, 12], "stop": ["x" * 1_000_000]}, ["stop[0]", "characters"]),
    ("too-many-stop-strings", {"prompt_token_ids": [10, 11, 12], "stop": ["ab"] * 100_000}, ["stop", "strings"]),
]


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("fields,named", [c[1:] for c in FOUND], ids=[c[0] for c in FOUND])
def test_refused_quickly(grpc_stubs, cluster, tally, fields, named, streamed):
    request = generation_pb2.GenerateRequest(max_new_tokens=8, **fields)
    stub = grpc_stubs["generation"]
    call = (lambda: list(stub.GenerateStream(request, timeout=10))) if streamed else (lambda: stub.Generate(request, timeout=10))
    code, error = answer(call, "Generate (found)", tally, cluster)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for word in named:
        assert word in error.details(), (word, error.details())


# --------------------------------------------------------------------------- the HTTP API
# The OpenAI-compatible routes (specdec.orchestrator.http_api) get valid requests with up to three
# fields replaced by random JSON, random JSON documents, and bytes that are not JSON. Every answer
# is a 200 (a stream then ends with [DONE] and carries no error) or a 4xx in OpenAI's error shape:
# never a 5xx, never a dead process.

json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
              any_text, st.sampled_from([-1, 0, 1, 2, 20, 21, 513, INT32_MAX, 2**31, 2**64, 0.5, "tree", "user", ""])),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(any_text, children, max_size=4)),
    max_leaves=8,
)
HTTP_FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
               "logprobs", "stop_token_ids", "ignore_eos", "mode", "speculation", "return_token_ids", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "min_p", "min_tokens", "logit_bias", "bad_words", "user", "prediction"]
COMPLETION_FIELDS = [*HTTP_FIELDS, "prompt", "echo", "best_of", "suffix"]
CHAT_FIELDS = [*HTTP_FIELDS, "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools"]
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": printable_text})


@st.composite
def http_bodies(draw, chat: bool) -> bytes:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b'{"prompt": NaN}', b'{"a": "\\ud800"}'])))
    if kind == "json":
        return json.dumps(draw(json_value)).encode()
    body = {"max_tokens": draw(st.integers(1, 8)), "temperature": draw(st.sampled_from([0, 0, 0.7])),
            "stream": draw(st.booleans())}
    if chat:
        body["messages"] = draw(st.lists(message, min_size=1, max_size=3))
    else:
        body["prompt"] = draw(st.one_of(printable_text, good_token_ids))
    for name in draw(st.sets(st.sampled_from(CHAT_FIELDS if chat else COMPLETION_FIELDS), max_size=3)):
        body[name] = draw(json_value)
    return json.dumps(body).encode()


def http_answer(base_url: str, path: str, body: bytes, tally, cluster) -> int:
    from test_http_api import events, raw

    status, headers, reply = raw(base_url, path, body)
    assert status == 200 or 400 <= status < 500, (status, reply)
    if status == 200 and headers["content-type"].startswith("text/event-stream"):
        chunks = events(reply)
        assert chunks[-1] == "[DONE]" and not any("error" in c for c in chunks[:-1]), chunks
    elif status == 200:
        assert len(reply["choices"]) == 1 and reply["usage"]["completion_tokens"] >= 0
    else:
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], reply
    assert_alive(cluster)
    tally.counts[f"HTTP {path}", str(status)] = tally.counts.get((f"HTTP {path}", str(status)), 0) + 1
    return status


@fuzz(40)
@given(data=st.data(), chat=st.booleans())
def test_http_api_fuzz(cluster, tally, data, chat):
    from specdec.orchestrator.http_api import CHAT, COMPLETIONS

    http_answer(cluster.http_url, CHAT if chat else COMPLETIONS, data.draw(http_bodies(chat)), tally, cluster)


# --------------------------------------------------------------------------- afterwards


def test_cluster_correct_after_fuzzing(grpc_stubs, cluster, tally, reference):
    """Runs after the fuzzing above (file order): every process alive, every mode still lossless."""
    assert_alive(cluster)
    prompt_ids = tiny_tokenizer()("def fuzz(x):").input_ids
    for mode in (AR, SEQ, TREE):
        reply = grpc_stubs["generation"].Generate(
            generation_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=16, mode=mode), timeout=CALL_TIMEOUT_S
        )
        assert list(reply.token_ids) == reference(prompt_ids, 16)
    from test_http_api import raw

    status, _, reply = raw(cluster.http_url, "/v1/completions", {"prompt": prompt_ids, "max_tokens": 16, "temperature": 0,
                                                                 "return_token_ids": True})
    assert status == 200 and reply["choices"][0]["token_ids"] == reference(prompt_ids, 16)
    release_sessions(grpc_stubs, tally.sessions)
    assert wait_for_no_sessions(grpc_stubs) == [0, 0, 0]
