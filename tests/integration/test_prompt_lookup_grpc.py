"""The model-free prompt-lookup draft in a real cluster on the tiny models: alone, and beside a
model draft, greedy output equals the target's alone in sequential and tree modes, and the lookup's
proposals are actually accepted (the tiny target's greedy output falls into repeating patterns, the
repeated structure lookup is for). Its GetInfo describes the target's tokenizer, so the
orchestrator's fingerprint check passes, and sampled generation runs with its one-hot proposals."""

from __future__ import annotations

import grpc
import pytest

from specdec import config
from specdec.v1 import common_pb2, draft_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc, verify_pb2_grpc
from tiny_models import tiny_tokenizer

RPC_TIMEOUT_S = 60
SEQ, TREE = generation_pb2.DECODING_MODE_SEQUENTIAL, generation_pb2.DECODING_MODE_TREE
PROMPTS = ["def hello(x):", "def f(x): return x + 1; def g(x): return x + 1; def h(x):"]
SETTINGS = [
    (SEQ, {"draft_length": 1}),
    (SEQ, {"draft_length": 5}),
    (TREE, {"beam_width": 1, "beam_depth": 4}),
    (TREE, {"beam_width": 3, "beam_depth": 5}),
    (TREE, {"beam_width": 2, "beam_depth": 6, "max_tree_nodes": 7}),
]
SETTING_IDS = [f"{generation_pb2.DecodingMode.Name(m).removeprefix('DECODING_MODE_').lower()}-"
               + "-".join(f"{k}{v}" for k, v in s.items()) for m, s in SETTINGS]


@pytest.fixture(scope="module", params=["alone", "beside-model"])
def lookup_cluster(request, tiny_dirs, tmp_path_factory):
    from specdec.tools.cluster import LocalCluster

    settings = config.from_env(
        config.ClusterSettings,
        target_model=str(tiny_dirs["target"]),
        draft_models=[] if request.param == "alone" else [str(tiny_dirs["draft"])],
        prompt_lookup=True,
        port=0,
        log_dir="",
        startup_timeout_s=120,
    )
    with LocalCluster(settings) as cluster:
        channels = [grpc.insecure_channel(a) for a in
                    [cluster.orchestrator_address, cluster.verify_address, *cluster.draft_addresses]]
        cluster.stubs = {
            "generation": generation_pb2_grpc.GenerationServiceStub(channels[0]),
            "verify": verify_pb2_grpc.VerifyServiceStub(channels[1]),
            "drafts": [draft_pb2_grpc.DraftServiceStub(c) for c in channels[2:]],
        }
        cluster.accepted_from_lookup = 0
        yield cluster
        for c in channels:
            c.close()


def generate(cluster, prompt: str, max_new_tokens: int, mode, spec: dict, sampling=None):
    request = generation_pb2.GenerateRequest(
        prompt=prompt, max_new_tokens=max_new_tokens, mode=mode,
        speculation=generation_pb2.SpeculationParams(adaptive=False, **spec), sampling=sampling,
    )
    return cluster.stubs["generation"].Generate(request, timeout=RPC_TIMEOUT_S)


def lookup_stats(reply) -> generation_pb2.DraftStats:
    (found,) = [d for d in reply.stats.drafts if d.model == config.PROMPT_LOOKUP]
    return found


@pytest.mark.parametrize("mode,spec", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_target_alone(lookup_cluster, reference, prompt, mode, spec):
    max_new = 40
    want = reference(tiny_tokenizer()(prompt).input_ids, max_new)
    reply = generate(lookup_cluster, prompt, max_new, mode, spec)
    assert list(reply.token_ids) == want
    drafts = len(lookup_cluster.settings.draft_models) + 1
    assert len(reply.stats.drafts) == drafts
    lookup = lookup_stats(reply)
    assert lookup.proposed_tokens > 0
    assert lookup.accepted_tokens <= lookup.proposed_tokens
    lookup_cluster.accepted_from_lookup += lookup.accepted_tokens


def test_lookup_proposals_were_accepted(lookup_cluster):
    """Across the generations above (this module's order), the lookup's tokens were accepted, and
    with lookup alone a round takes several tokens at once."""
    assert lookup_cluster.accepted_from_lookup > 20
    reply = generate(lookup_cluster, PROMPTS[0], 40, SEQ, {"draft_length": 5})
    assert lookup_stats(reply).accepted_tokens > 10
    if not lookup_cluster.settings.draft_models:
        assert reply.stats.rounds < 25  # 40 tokens at one a round would take 40


def test_get_info_describes_the_target(lookup_cluster):
    request = common_pb2.GetInfoRequest()
    verify = lookup_cluster.stubs["verify"].GetInfo(request, timeout=RPC_TIMEOUT_S)
    lookup = lookup_cluster.stubs["drafts"][-1].GetInfo(request, timeout=RPC_TIMEOUT_S)
    assert lookup.service == "draft" and lookup.model == config.PROMPT_LOOKUP
    assert lookup.tokenizer_fingerprint == verify.tokenizer_fingerprint
    assert (lookup.vocab_size, lookup.max_context, list(lookup.eos_token_ids)) == (
        verify.vocab_size, verify.max_context, list(verify.eos_token_ids))
    assert lookup.active_sessions == 0 and lookup.cached_tokens == 0


def test_draft_beams_directly(lookup_cluster):
    stub = lookup_cluster.stubs["drafts"][-1]
    ids = tiny_tokenizer()("abcXabcYabc").input_ids
    reply = stub.DraftBeams(draft_pb2.DraftBeamsRequest(session_id="s", context_token_ids=ids, beam_width=3, beam_depth=2),
                            timeout=RPC_TIMEOUT_S)
    assert [list(b.token_ids) for b in reply.beams] == [ids[7:9], ids[3:5]]  # "Ya", then "Xa"
    assert reply.fed_tokens == 0 and not reply.distributions
    none = stub.DraftBeams(draft_pb2.DraftBeamsRequest(context_token_ids=ids[:4], beam_width=1, beam_depth=2), timeout=RPC_TIMEOUT_S)
    assert not none.beams
    sampled = stub.DraftBeams(draft_pb2.DraftBeamsRequest(context_token_ids=ids, beam_width=2, beam_depth=2, temperature=0.7, seed=3),
                              timeout=RPC_TIMEOUT_S)
    assert [list(b.token_ids) for b in sampled.beams] == [ids[7:9], ids[3:5]]
    assert len(sampled.distributions) == 3  # Y, X, a


def test_sampled_generation_runs(lookup_cluster):
    sampling = generation_pb2.SamplingParams(temperature=0.7, seed=11)
    reply = generate(lookup_cluster, PROMPTS[0], 24, TREE, {"beam_width": 2, "beam_depth": 4}, sampling)
    again = generate(lookup_cluster, PROMPTS[0], 24, TREE, {"beam_width": 2, "beam_depth": 4}, sampling)
    assert len(reply.token_ids) == 24 or reply.finish_reason == generation_pb2.FINISH_REASON_EOS
    assert list(reply.token_ids) == list(again.token_ids)  # a fixed seed replays
    assert lookup_stats(reply).proposed_tokens > 0
