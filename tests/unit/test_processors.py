"""Logits processors (specdec.processors): each one as transformers or OpenAI define it, and
speculation exact against the processed distribution: the output of every mode is the target's
own one-token decoding under the same processors, greedy and seeded."""

from __future__ import annotations

import pytest
import torch

from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.errors import InvalidRequest
from specdec.processors import Processing
from specdec.sampling import SamplingParams, pick, warp_logits
from tiny_models import EOS, tiny_qwen2, truncated_copy

PROMPT = [11, 40, 3, 77, 25, 60, 8]


def test_each_processor_as_defined():
    from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    history, prompt_len = [4, 9, 9, 17, 4, 4], 2  # the output: 9, 17, 4, 4
    got = Processing(repetition_penalty=1.3).apply(logits, history, prompt_len)
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits[None].clone())[0]
    assert torch.allclose(got, want)
    got = Processing(frequency_penalty=0.5, presence_penalty=0.25).apply(logits, history, prompt_len)
    want = logits.clone()
    for token, count in {9: 1, 17: 1, 4: 2}.items():
        want[token] -= 0.5 * count + 0.25
    assert torch.equal(got, want)
    got = Processing.of(logit_bias={3: 100.0, 7: -100.0}).apply(logits, history, prompt_len)
    assert int(got.argmax()) == 3 and got[7] == logits[7] - 100
    barred = Processing(min_tokens=5, eos_token_ids=(2,)).apply(logits, history, prompt_len)
    assert barred[2] == float("-inf") and Processing(min_tokens=4, eos_token_ids=(2,)).apply(logits, history, prompt_len)[2] == logits[2]
    warped = warp_logits(logits, SamplingParams(temperature=0.8))
    got = Processing(min_p=0.1).after_warping(warped)
    want = MinPLogitsWarper(0.1)(None, warped[None].clone())[0]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert not Processing().active and Processing().apply(logits, history, prompt_len) is logits
    bad = Processing.of(bad_words_ids=[[4, 30], [12]]).apply(logits, history, prompt_len)
    assert bad[30] == float("-inf") and bad[12] == float("-inf")  # the history ends with 4: 30 would complete [4, 30]
    assert Processing.of(bad_words_ids=[[17, 30]]).apply(logits, history, prompt_len)[30] == logits[30]


@pytest.mark.parametrize("fields, words", [
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_p": -0.1}, "min_p"), ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": {5: 200.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "300"),
    ({"bad_words_ids": [[]]}, "bad_words"), ({"bad_words_ids": [[1]] * 65}, "bad_words"),
])
def test_bad_processors_are_refused(fields, words):
    with pytest.raises(InvalidRequest, match=words):
        Processing.of(**fields)


@pytest.fixture(scope="module")
def target():
    return tiny_qwen2(seed=0, layers=2, sharpness=2.0)


def one_token_decoding(model, processing: Processing, sampling: SamplingParams, n: int) -> list[int]:
    """The target alone, one token at a time, processed and drawn as the verify service does."""
    out: list[int] = []
    with torch.inference_mode():
        while len(out) < n:
            history = PROMPT + out
            logits = model(torch.tensor([history])).logits[0, -1].float()
            scores = processing.apply(logits, history, len(PROMPT))
            if sampling.greedy:
                token = int(scores.argmax())
            else:
                token = pick(processing.after_warping(warp_logits(scores, sampling)), sampling.seed, len(history))
            out.append(token)
            if token == EOS:
                break
    return out


PROCESSINGS = [
    Processing(repetition_penalty=1.5),
    Processing(frequency_penalty=1.0, presence_penalty=0.5),
    Processing.of(logit_bias={7: 3.0, 11: -5.0}, min_tokens=6),
    Processing(min_p=0.2, presence_penalty=-0.5),
    Processing.of(bad_words_ids=[[8, 8], [3]], frequency_penalty=-1.0),
]


@pytest.mark.parametrize("processing", PROCESSINGS, ids=["repetition", "frequency+presence", "bias+min_tokens", "min_p", "bad_words"])
@pytest.mark.parametrize("mode, spec", [("sequential", {"draft_length": 4}), ("tree", {"beam_width": 2, "beam_depth": 3}),
                                        ("tree", {"adaptive": True})])
def test_speculation_is_exact_against_the_processed_distribution(target, processing, mode, spec):
    drafts = [LocalDraft("truncated", truncated_copy(target, 1)), LocalDraft("self", target)]
    controller = local_controller(LocalVerify(target), drafts, eos_token_ids={EOS})
    processing = Processing(**{**processing.__dict__, "eos_token_ids": (EOS,)})
    accepted = 0
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0, top_k=10, seed=5), SamplingParams(temperature=0.7, seed=9)):
        want = one_token_decoding(target, processing, sampling, 16)
        result = controller.generate(params(PROMPT, 16, mode, sampling=sampling, processing=processing, **spec))
        assert result.token_ids == want, (mode, spec, sampling)
        accepted += result.stats.draft_tokens_accepted
    if not spec.get("adaptive"):
        assert accepted > 0, "no draft token was accepted: the test would not exercise the tree"
