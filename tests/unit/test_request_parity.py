"""What a request may ask for beyond the prompt, in the accept loop: stop_token_ids, ignore_eos, each
token's log-probability under the target (greedy and sampled, with its most likely alternatives),
a request id, and finish reasons that tell the end-of-sequence token from a stop string, a stop
token and the length."""

import pytest
import torch

from specdec.generation import CallContext
from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.errors import InvalidRequest
from specdec.records import GenerationResult
from specdec.sampling import SamplingParams, distribution
from tiny_models import EOS, reference_greedy, tiny_qwen2, truncated_copy

PROMPT = [11, 40, 3, 77, 25, 60, 8]


@pytest.fixture(scope="module")
def target():
    return tiny_qwen2(seed=0, layers=3, eos_token_id=EOS)


@pytest.fixture(scope="module")
def reference(target):
    return reference_greedy(target, PROMPT, 30)


def request(mode="tree", max_new_tokens=30, **kwargs):
    return params(PROMPT, max_new_tokens, mode, 4, 2, 4, 64, **kwargs)


def controller(target, eos=EOS):
    drafts = [LocalDraft("self", target), LocalDraft("truncated", truncated_copy(target, 1))]
    return local_controller(LocalVerify(target), drafts, eos_token_ids={eos}, max_new_tokens_limit=100)


def target_logprobs(model, tokens: list[int], sampling: SamplingParams | None = None) -> torch.Tensor:
    """The target's log-probabilities after each prefix of ``tokens``, one plain forward (the truth)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return distribution(logits, sampling).log() if sampling is not None else torch.log_softmax(logits, -1)


def test_stop_token_ids_end_the_generation_where_the_token_comes(target, reference):
    stop = reference[4]
    first = reference.index(stop)
    result = controller(target).generate(request(stop_token_ids=[stop, 0]))
    assert result.token_ids == reference[: first + 1]
    assert (result.finish_reason, result.stop_reason) == ("stop_token", stop)


def test_eos_is_told_apart_and_ignore_eos_goes_past_it(target, reference):
    eos = reference[5]
    first = reference.index(eos)
    stopped = controller(target, eos=eos).generate(request())
    assert stopped.token_ids == reference[: first + 1] and stopped.finish_reason == "eos" and stopped.stop_reason is None
    past = controller(target, eos=eos).generate(request(ignore_eos=True))
    assert past.token_ids == reference and past.finish_reason == "length"


@pytest.mark.parametrize("mode", ["autoregressive", "sequential", "tree"])
def test_greedy_logprobs_are_the_targets_own(target, reference, mode):
    result = controller(target).generate(request(mode, logprobs=True, top_logprobs=3))
    assert result.token_ids == reference
    truth = target_logprobs(target, PROMPT + reference)[len(PROMPT) - 1 : -1]
    assert [t.token_id for t in result.logprobs] == reference
    for entry, row in zip(result.logprobs, truth):
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        best = row.topk(3)
        assert [i for i, _ in entry.top][0] == entry.token_id  # greedy: the token is the most likely
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    # Streamed, round by round, the same entries.
    assert [t for r in result.rounds for t in r.logprobs] == result.logprobs


def test_sampled_logprobs_are_those_of_the_distribution_drawn_from(target):
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    result = controller(target).generate(request(max_new_tokens=20, sampling=sampling, logprobs=True, top_logprobs=2))
    truth = target_logprobs(target, PROMPT + result.token_ids, sampling)[len(PROMPT) - 1 : -1]
    for entry, row in zip(result.logprobs, truth):
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4) and entry.logprob > float("-inf")
        assert [v for _, v in entry.top] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)


def test_no_logprobs_unless_asked(target):
    result = controller(target).generate(request(max_new_tokens=5))
    assert result.logprobs is None and all(r.logprobs == [] for r in result.rounds)


@pytest.mark.parametrize("fields, message", [
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids count"),
])
def test_bad_fields_are_refused_by_name(target, fields, message):
    with pytest.raises(InvalidRequest, match=message):
        controller(target).check(request(**fields))


def test_result_round_trips_through_json_and_proto(target):
    result = controller(target).generate(request(max_new_tokens=6, logprobs=True, top_logprobs=2), CallContext("abc-1"))
    again = GenerationResult.from_json(result.to_json())
    assert again.logprobs == result.logprobs and again.request_id == "abc-1" and again.finish_reason == result.finish_reason
    message = result.to_pb()
    assert message.request_id == "abc-1" and [t.token_id for t in message.logprobs] == result.token_ids
    assert list(message.logprobs[0].top_token_ids) == [i for i, _ in result.logprobs[0].top]
