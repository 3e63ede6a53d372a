"""Lossless speculative sampling end to end: the controller with real (tiny) draft and target
engines produces tokens distributed as the target's own sampling, in every mode, with one or
several drafts; a fixed seed replays the same output, in process and through the services."""

import grpc
import pytest
import torch
from scipy.stats import chisquare

from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.sampling import SamplingParams, distribution
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tiny_models import tiny_qwen2, truncated_copy

PROMPT = [11, 40, 3, 77, 25]
PARAMS = SamplingParams(temperature=1.0, top_k=4)  # 4 tokens per step: 16 outcomes for two tokens


@pytest.fixture(scope="module")
def target():
    return tiny_qwen2(seed=0, layers=2, sharpness=2.0)


def make(target, drafts):
    return local_controller(LocalVerify(target), drafts, max_new_tokens_limit=100)


def request(mode, seed, max_new_tokens=2, **spec):
    spec = {"draft_length": 3, "beam_width": 2, "beam_depth": 3, "max_tree_nodes": 64} | spec
    return params(PROMPT, max_new_tokens, mode, sampling=SamplingParams(PARAMS.temperature, PARAMS.top_k, 1.0, seed), **spec)


def exact_two_token_distribution(model) -> dict[tuple[int, int], float]:
    with torch.inference_mode():
        first = distribution(model(torch.tensor([PROMPT])).logits[0, -1], PARAMS)
        joint = {}
        for a in torch.nonzero(first).flatten().tolist():
            second = distribution(model(torch.tensor([PROMPT + [a]])).logits[0, -1], PARAMS)
            for b in torch.nonzero(second).flatten().tolist():
                joint[(a, b)] = float(first[a] * second[b])
    return joint


@pytest.mark.parametrize(
    "mode, draft_names, spec",
    [
        ("autoregressive", [], {}),
        ("sequential", ["truncated"], {}),
        ("sequential", ["truncated", "stranger"], {}),
        ("tree", ["truncated"], {"beam_width": 3}),
        ("tree", ["truncated", "stranger"], {"beam_width": 2, "max_tree_nodes": 5}),
        ("tree", ["truncated"], {"beam_width": 3, "adaptive": True}),  # the cost model on: whatever shapes it picks
    ],
)
def test_sampled_output_follows_the_target(target, mode, draft_names, spec):
    models = {"truncated": truncated_copy(target, 1), "stranger": tiny_qwen2(seed=9, layers=1, sharpness=2.0)}
    controller = make(target, [LocalDraft(n, models[n]) for n in draft_names])
    exact = exact_two_token_distribution(target)
    samples = 1200
    counts = dict.fromkeys(exact, 0)
    accepted = 0
    for seed in range(1, samples + 1):
        result = controller.generate(request(mode, seed, **spec))
        counts[tuple(result.token_ids)] += 1
        accepted += result.stats.draft_tokens_accepted
    # Significance 0.001 (the seeds are fixed, so the outcome is too).
    total = sum(exact.values())  # 1 up to float32 rounding; chisquare wants the sums to agree exactly
    assert chisquare(list(counts.values()), [exact[k] / total * samples for k in counts]).pvalue > 1e-3
    if draft_names and not spec.get("adaptive"):  # (the cost model may turn speculation off on these tiny models)
        assert accepted > 0, "the drafts were never accepted: the test would not exercise the rule"


def test_fixed_seed_replays_and_seeds_differ(target):
    controller = make(target, [LocalDraft("truncated", truncated_copy(target, 1))])
    runs = [controller.generate(request("tree", seed, max_new_tokens=12)).token_ids for seed in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_same_seed_same_tokens_in_every_mode_shape_and_company(target):
    """A seeded generation is a function of (model, prompt, parameters, seed) alone: the tokens of
    autoregressive decoding, whatever mode, shape or concurrent traffic produced them."""
    from concurrent.futures import ThreadPoolExecutor

    drafts = [LocalDraft("truncated", truncated_copy(target, 1)), LocalDraft("stranger", tiny_qwen2(seed=9, layers=1, sharpness=2.0))]
    controller = make(target, drafts)
    shapes = [("autoregressive", {}), ("sequential", {"draft_length": 2}), ("sequential", {"draft_length": 5}),
              ("tree", {"beam_width": 3, "beam_depth": 2}), ("tree", {"beam_width": 2, "beam_depth": 4, "max_tree_nodes": 5}),
              ("tree", {"adaptive": True})]
    seeds = range(1, 41)
    alone = {seed: controller.generate(request("autoregressive", seed, max_new_tokens=12)).token_ids for seed in seeds}
    accepted = 0
    for mode, spec in shapes:
        with ThreadPoolExecutor(4) as pool:  # four generations in flight at once: batched passes
            results = list(pool.map(lambda seed: controller.generate(request(mode, seed, max_new_tokens=12, **spec)), seeds))
        assert [r.token_ids for r in results] == [alone[seed] for seed in seeds], (mode, spec)
        accepted += sum(r.stats.draft_tokens_accepted for r in results)
    assert accepted > 0, "no draft token was ever accepted: the test would not exercise speculation"


def test_sampling_through_the_services(tiny_cluster):
    with grpc.insecure_channel(tiny_cluster.orchestrator_address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        def generate(seed, mode=generation_pb2.DECODING_MODE_TREE):
            return stub.Generate(generation_pb2.GenerateRequest(
                prompt_token_ids=PROMPT, max_new_tokens=16, mode=mode,
                sampling=generation_pb2.SamplingParams(temperature=3.0, top_p=0.95, seed=seed)), timeout=60)

        first, again, other = generate(11), generate(11), generate(12)
        assert list(first.token_ids) == list(again.token_ids) and first.stats.tokens_generated == len(first.token_ids)
        assert list(first.token_ids) != list(other.token_ids)
        sequential = generate(11, generation_pb2.DECODING_MODE_SEQUENTIAL)
        assert sequential.stats.tokens_generated == len(sequential.token_ids) > 0
        # The same seed gives the same tokens in every mode (sampling by position-keyed noise).
        alone = generate(11, generation_pb2.DECODING_MODE_AUTOREGRESSIVE)
        assert list(sequential.token_ids) == list(first.token_ids) == list(alone.token_ids)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Generate(generation_pb2.GenerateRequest(
                prompt_token_ids=PROMPT, sampling=generation_pb2.SamplingParams(temperature=1.0, top_p=1.5)), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in bad.value.details()


def test_all_outcomes_are_reachable(target):
    # Guards the chi-square test against an empty support: 16 outcomes, all with real mass.
    exact = exact_two_token_distribution(target)
    assert len(exact) == 16 and min(exact.values()) > 1e-3 and abs(sum(exact.values()) - 1) < 1e-5
