"""Lossless under batching: generations running at once, whose calls share the verify and draft
services' forward passes, each produce exactly what they produce alone and what the target alone
produces one token at a time, with sessions of different lengths, modes and tree shapes joining and
leaving the batch as they start and end; a sampled generation with a seed replays its output among
other clients."""

import threading

import pytest

from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.generation import GenerationParams
from specdec.sampling import SamplingParams
from local_clients import stepped_greedy
from test_batch_invariance import VARIANTS, invariant, tiny_model
from tiny_models import EOS, truncated_copy

PROMPTS = [[11, 40, 3, 77, 25, 60, 8, 19, 33], [5, 6], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81], [42] * 5,
           [1, 2, 3, 4, 5, 6, 7], [88, 12, 33], [9, 9, 8, 8, 7, 7], [30, 60, 30, 60, 30]]
SHAPES = [("tree", 3, 4, 64), ("sequential", 1, 5, 64), ("autoregressive", 1, 1, 1), ("tree", 4, 4, 16)]


@pytest.fixture(scope="module", params=VARIANTS, ids="-".join)
def target(request):
    # Flat logits: near-ties everywhere, where only exact arithmetic keeps the output equal.
    dtype, kernel = request.param
    return invariant(tiny_model(seed=0, layers=3, sharpness=1.5, hidden=128, dtype=dtype), kernel)


def request_for(i: int, **extra) -> GenerationParams:
    mode, width, depth, nodes = SHAPES[i % len(SHAPES)]
    return params(PROMPTS[i % len(PROMPTS)], 12 + 4 * (i % 5), mode, depth, width, depth, nodes, **extra)


def run_concurrently(controller, requests: list[GenerationParams]) -> list[list[int]]:
    outputs = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i):
        start.wait()
        outputs[i] = controller.generate(requests[i]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outputs


@pytest.mark.parametrize("clients", [1, 2, 4, 8])
def test_every_output_is_the_targets_own_under_batching(target, clients):
    batches = []
    verify = LocalVerify(target, gather_s=0.05, observe=lambda info, queued: batches.append(info.sessions))
    drafts = [LocalDraft("self", target), LocalDraft("truncated", truncated_copy(target, 1))]
    controller = local_controller(verify, drafts, eos_token_ids={EOS})
    requests = [request_for(i) for i in range(clients)]
    outputs = run_concurrently(controller, requests)
    for request, output in zip(requests, outputs):
        assert output == stepped_greedy(target, request.prompt_ids, request.max_new_tokens)
    if clients >= 4:  # two may well never overlap on a busy machine; four starting together do
        assert max(batches) > 1, "the generations should have shared verify passes"
    assert len(verify.verifier.store) == 0 and all(len(d.drafter.store) == 0 for d in drafts)


def test_a_seed_replays_its_sample_among_other_clients():
    # Float32 on the packed product: the draft's rows are row-invariant too (checked by the target's
    # make_batch_invariant on the same kernel), so the draft proposes the same chains in company.
    target = invariant(tiny_model(seed=0, layers=3, sharpness=1.5, hidden=128, dtype="float32"), "auto")
    controller = local_controller(LocalVerify(target, gather_s=0.01), [LocalDraft("truncated", truncated_copy(target, 1))],
                                  eos_token_ids={EOS})
    sampled = request_for(0, sampling=SamplingParams(temperature=0.9, seed=1234))
    alone = controller.generate(sampled).token_ids
    others = [request_for(i) for i in range(1, 5)]
    together = run_concurrently(controller, [sampled, *others])
    assert together[0] == alone
