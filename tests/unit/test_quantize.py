"""Weight-only int8 drafts (specdec/quantize.py): the layers stay close to the float ones, every
linear layer and the output head are converted, and speculation with an int8 draft gives exactly
the target's greedy output."""

import pytest
import torch
from torch import nn

from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.quantize import Int8Linear, quantize_model
from tiny_models import EOS, reference_greedy, tiny_qwen2, truncated_copy

PROMPTS = [[11, 40, 3, 77, 25, 60, 8], [5], list(range(20, 50))]


@pytest.fixture
def target():
    # A new one per test: the verifier packs its linear layers in place, and a packed layer
    # cannot be quantized.
    return tiny_qwen2(seed=0, layers=3, eos_token_id=EOS)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_to_the_float_layer(bias, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias).to(dtype)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (40, 96)
    x = torch.randn(2, 5, 96, dtype=dtype)  # any leading shape
    want, got = linear(x).float(), q(x)
    assert got.shape == (2, 5, 40) and got.dtype == dtype
    # Per-channel int8 rounds each weight by at most half a step (max|row| / 254).
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < (0.02 if dtype == torch.float32 else 0.05), err
    assert torch.equal(q.dequantized_rows(7), q.weight[:7].to(dtype) * q.scales[:7, None])


def test_int8_linear_keeps_zero_rows_finite():
    linear = nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        linear.weight[1] = 0.0
    out = Int8Linear.from_linear(linear)(torch.randn(4, 8))
    assert torch.isfinite(out).all() and torch.equal(out[:, 1], torch.zeros(4))


def test_quantize_model_converts_every_linear_and_the_head(target):
    model = quantize_model(truncated_copy(target, 2), "int8")
    assert not [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # a lookup table stays float
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        float_next = target(ids).logits[0].argmax(-1)
        int8_next = quantize_model(truncated_copy(target, [0, 1, 2]), "int8")(ids).logits[0].argmax(-1)
    # The same three layers, quantized: nearly every greedy choice survives.
    assert (float_next == int8_next).float().mean() >= 0.8


def test_quantize_none_leaves_the_model_and_unknown_modes_are_refused(target):
    model = truncated_copy(target, 1)
    assert quantize_model(model, "none") is model
    assert any(type(m) is nn.Linear for m in model.modules())
    with pytest.raises(ValueError, match="int4"):
        quantize_model(model, "int4")


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("vocab_limit", [0, 40])
@pytest.mark.parametrize(
    "mode, settings",
    [
        ("sequential", {"draft_length": 4}),
        ("tree", {"beam_width": 3, "beam_depth": 4}),
        ("tree", {"beam_width": 1, "beam_depth": 3}),
    ],
)
def test_int8_draft_is_lossless(target, prompt, vocab_limit, mode, settings):
    drafts = [
        LocalDraft("self-int8", quantize_model(truncated_copy(target, [0, 1, 2]), "int8"), vocab_limit=vocab_limit),
        LocalDraft("truncated-int8", quantize_model(truncated_copy(target, 1), "int8"), vocab_limit=vocab_limit),
    ]
    c = local_controller(LocalVerify(target), drafts, eos_token_ids={EOS})
    request = params(prompt, 24, mode, settings.get("draft_length", 2), settings.get("beam_width", 2),
                     settings.get("beam_depth", 4), 64, adaptive=False)
    result = c.generate(request)
    assert result.token_ids == reference_greedy(target, prompt, 24)
    if not vocab_limit:  # (with 40 ids a draft cannot propose the target's tokens beyond them)
        # The quantized copy of the target itself still agrees with it most of the time.
        assert result.stats.draft_tokens_accepted >= len(result.token_ids) // 2


def test_cluster_setting_reaches_the_draft_services():
    from specdec import config
    from specdec.tools.cluster import LocalCluster

    cluster = LocalCluster(config.from_env(config.ClusterSettings, environ={}, draft_quantize="int8"))
    draft = cluster._settings(config.DraftSettings, metrics_offset=2, draft_model="some-draft", device="cpu")
    argv = config.to_argv(draft)
    assert argv[argv.index("--draft-quantize") + 1] == "int8"
    assert config.from_env(config.DraftSettings, environ={"SPECDEC_DRAFT_QUANTIZE": "int8"}).draft_quantize == "int8"
