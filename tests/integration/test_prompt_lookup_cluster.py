"""The orchestrator's prompt lookup in a real cluster on the tiny models: alone (no model draft),
and beside a model draft, greedy output equals the target's alone with fixed shapes and with the
cost model; the lookup's proposals are actually accepted (the tiny target's greedy output falls into
repeating patterns, the repeated structure lookup is for) and reported as a draft of their own; with
the lookup off none is made; and sampled generation runs with its one-hot proposals."""

from __future__ import annotations

import grpc
import pytest

from specdec import config
from specdec.lookup import NAME as LOOKUP
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tiny_models import tiny_tokenizer

RPC_TIMEOUT_S = 60
SEQ, TREE = generation_pb2.DECODING_MODE_SEQUENTIAL, generation_pb2.DECODING_MODE_TREE
PROMPTS = ["def hello(x):", "def f(x): return x + 1; def g(x): return x + 1; def h(x):"]
SETTINGS = [
    (SEQ, {"draft_length": 1, "adaptive": False}),
    (SEQ, {"draft_length": 5, "adaptive": False}),
    (TREE, {"beam_width": 3, "beam_depth": 5, "adaptive": False}),
    (TREE, {"beam_width": 2, "beam_depth": 6, "max_tree_nodes": 7, "adaptive": False}),
    (TREE, {"adaptive": True}),
]
SETTING_IDS = [f"{generation_pb2.DecodingMode.Name(m).removeprefix('DECODING_MODE_').lower()}-"
               + "-".join(f"{k}{v}" for k, v in s.items()) for m, s in SETTINGS]


@pytest.fixture(scope="module", params=["alone", "beside-model"])
def lookup_cluster(request, tiny_dirs):
    from specdec.tools.cluster import LocalCluster

    settings = config.from_env(
        config.ClusterSettings,
        target_model=str(tiny_dirs["target"]),
        draft_models=[] if request.param == "alone" else [str(tiny_dirs["draft"])],
        port=0,
        log_dir="",
        startup_timeout_s=120,
    )
    assert settings.prompt_lookup, "on by default"
    with LocalCluster(settings) as cluster:
        channel = grpc.insecure_channel(cluster.orchestrator_address)
        cluster.stub = generation_pb2_grpc.GenerationServiceStub(channel)
        cluster.accepted_from_lookup = 0
        yield cluster
        channel.close()


def generate(cluster, prompt: str, max_new_tokens: int, mode, spec: dict, sampling=None):
    request = generation_pb2.GenerateRequest(
        prompt=prompt, max_new_tokens=max_new_tokens, mode=mode,
        speculation=generation_pb2.SpeculationParams(**spec), sampling=sampling,
    )
    return cluster.stub.Generate(request, timeout=RPC_TIMEOUT_S)


def lookup_stats(reply) -> generation_pb2.DraftStats:
    (found,) = [d for d in reply.stats.drafts if d.model == LOOKUP]
    return found


@pytest.mark.parametrize("mode,spec", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_target_alone(lookup_cluster, reference, prompt, mode, spec):
    max_new = 40
    want = reference(tiny_tokenizer()(prompt).input_ids, max_new)
    reply = generate(lookup_cluster, prompt, max_new, mode, spec)
    assert list(reply.token_ids) == want
    assert len(reply.stats.drafts) == len(lookup_cluster.settings.draft_models) + 1
    lookup = lookup_stats(reply)
    assert lookup.proposed_tokens > 0
    assert lookup.accepted_tokens <= lookup.proposed_tokens
    lookup_cluster.accepted_from_lookup += lookup.accepted_tokens


def test_lookup_proposals_were_accepted(lookup_cluster):
    """Across the generations above (this module's order), the lookup's tokens were accepted, and
    with lookup alone a round takes several tokens at once."""
    assert lookup_cluster.accepted_from_lookup > 20
    reply = generate(lookup_cluster, PROMPTS[0], 40, SEQ, {"draft_length": 5, "adaptive": False})
    assert lookup_stats(reply).accepted_tokens > 10
    if not lookup_cluster.settings.draft_models:
        assert reply.stats.rounds < 25  # 40 tokens at one a round would take 40


def test_sampled_generation_runs(lookup_cluster):
    spec = {"beam_width": 2, "beam_depth": 4, "adaptive": False}
    proposed = 0
    for seed in (11, 12, 13, 14):
        sampling = generation_pb2.SamplingParams(temperature=0.7, seed=seed)
        reply = generate(lookup_cluster, PROMPTS[0], 24, TREE, spec, sampling)
        assert len(reply.token_ids) == 24 or reply.finish_reason == generation_pb2.FINISH_REASON_EOS
        # A seed gives the target's own sampled tokens, whatever the lookup proposed.
        alone = generate(lookup_cluster, PROMPTS[0], 24, generation_pb2.DECODING_MODE_AUTOREGRESSIVE, {}, sampling)
        assert list(reply.token_ids) == list(alone.token_ids)
        proposed += lookup_stats(reply).proposed_tokens
    assert proposed > 0


def test_autoregressive_mode_looks_nothing_up(lookup_cluster):
    reply = generate(lookup_cluster, PROMPTS[1], 16, generation_pb2.DECODING_MODE_AUTOREGRESSIVE, {})
    assert not reply.stats.drafts and reply.stats.rounds == 16
