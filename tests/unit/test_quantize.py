"""Quantized layers (specdec/quantize.py): int8 weight-only and w8a8 (int8 weights and per-row int8
activations) stay close to the float layers, w8a8 sums exactly in integers and gives every row the
same bits at any row count, every linear layer and the output head are converted, and speculation
with a quantized draft gives exactly the target's greedy output."""

import pytest
import torch
from torch import nn

from local_clients import LocalDraft, LocalVerify, local_controller, params
from specdec.quantize import Int8Linear, W8A8Linear, activation_range, quantize_model
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
    with pytest.raises(ValueError, match="int2"):
        quantize_model(model, "int2")


def w8a8_reference(layer: W8A8Linear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What a w8a8 layer must give, computed apart: each row quantized by its own largest magnitude,
    the products summed exactly in int64, then scaled."""
    levels, _ = activation_range()
    step = x.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / levels
    q = torch.round(x / step)
    return (q.long() @ weight.long().T).float() * layer.scales * step


@pytest.mark.parametrize("shape", [(40, 96), (7, 13), (300, 64)])
def test_w8a8_linear_sums_exactly_and_every_row_alone(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=False)
    layer = W8A8Linear.from_linear(linear, keep_weight=True)
    x = torch.randn(70, shape[1]) * torch.logspace(-3, 3, 70)[:, None]  # rows of very different sizes
    out = layer(x)
    assert torch.equal(out, w8a8_reference(layer, layer.weight, x))
    # Batch-invariant by construction: a row's bits never depend on the other rows of the pass.
    for m in (1, 2, 5, 16, 33, 70):
        assert torch.equal(layer(x[:m]), out[:m])
    assert torch.equal(layer(x[3:4]), out[3:4])
    err = (out - linear(x)).abs().amax(1) / linear(x).abs().amax(1)
    assert err.max() < 0.05, err.max()


def test_w8a8_linear_keeps_bias_shape_dtype_and_zero_rows():
    torch.manual_seed(0)
    linear = nn.Linear(32, 6)
    layer = W8A8Linear.from_linear(linear)
    x = torch.randn(2, 3, 32)
    x[0, 1] = 0.0  # an all-zero row quantizes to zeros, not NaN
    out = layer(x)
    assert out.shape == (2, 3, 6) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out[0, 1], linear.bias)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="packed"):
        layer.dequantized_rows(2)  # only a head keeps its int8 matrix


def test_w8a8_model_keeps_its_head_rows_and_agrees_with_the_float_model(target):
    model = quantize_model(truncated_copy(target, [0, 1, 2]), "w8a8")
    head = model.get_output_embeddings()
    assert isinstance(head, W8A8Linear) and not [m for m in model.modules() if type(m) is nn.Linear]
    assert head.dequantized_rows(5).shape == (5, head.in_features)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        agree = (target(ids).logits[0].argmax(-1) == model(ids).logits[0].argmax(-1)).float().mean()
    assert agree >= 0.8


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("vocab_limit", [0, 40])
@pytest.mark.parametrize("quantize", ["int8", "w8a8"])
@pytest.mark.parametrize(
    "mode, settings",
    [
        ("sequential", {"draft_length": 4}),
        ("tree", {"beam_width": 3, "beam_depth": 4}),
        ("tree", {"beam_width": 1, "beam_depth": 3}),
    ],
)
def test_quantized_draft_is_lossless(target, prompt, vocab_limit, quantize, mode, settings):
    drafts = [
        LocalDraft("self-q", quantize_model(truncated_copy(target, [0, 1, 2]), quantize), vocab_limit=vocab_limit),
        LocalDraft("truncated-q", quantize_model(truncated_copy(target, 1), quantize), vocab_limit=vocab_limit),
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


def test_w8a8_siblings_reading_one_input_share_one_product(target, monkeypatch):
    """q/k/v and gate/up become one stacked product each (the input quantized once, the weights read in
    one call), with the very bits of separate products: integer sums, per-row scales."""
    import specdec.quantize as quantize

    ids = torch.tensor([PROMPTS[2]])
    shared = quantize_model(truncated_copy(target, [0, 1, 2]), "w8a8")
    attention = shared.model.layers[0].self_attn
    assert isinstance(attention.q_proj, quantize.SharedInputLinear) and attention.v_proj.index == 2
    assert isinstance(shared.model.layers[0].mlp.up_proj, quantize.SharedInputLinear)
    assert isinstance(shared.model.layers[0].mlp.down_proj, W8A8Linear)
    monkeypatch.setattr(quantize, "SHARED_INPUTS", ())
    separate = quantize_model(truncated_copy(target, [0, 1, 2]), "w8a8")
    assert isinstance(separate.model.layers[0].self_attn.q_proj, W8A8Linear)
    with torch.no_grad():
        assert torch.equal(shared(ids).logits, separate(ids).logits)
        assert torch.equal(shared(ids[:, :1]).logits, separate(ids[:, :1]).logits)


def test_auto_keeps_the_format_measured_fastest_here(target, monkeypatch):
    """auto times each format's linear layers on this machine and applies the fastest; the choice
    is the measurement's (AVX2 and VNNI CPUs order them differently), a near tie the more faithful."""
    import specdec.quantize as quantize

    assert quantize.w8a8_available()  # every x86 torch build this project installs
    mode, costs = quantize.fastest_quantization(truncated_copy(target, 1), repeats=3)
    # w8a8 only where its activations keep 8 bits (VNNI): 7-bit ones cost the draft acceptance.
    full = quantize.activation_range()[0] == 127
    assert list(costs) == ["none", "int8", "int4", "w8a8"][: 4 if full else 3] and all(ms > 0 for ms in costs.values())
    assert mode == quantize.fastest_of(costs)
    heads = {"none": nn.Linear, "int8": Int8Linear, "int4": Int8Linear, "w8a8": W8A8Linear}  # an int4 model's head is int8
    for chosen in heads:
        monkeypatch.setattr(quantize, "fastest_quantization", lambda model, chosen=chosen: (chosen, {chosen: 1.0}))
        assert type(quantize_model(truncated_copy(target, 1), "auto").get_output_embeddings()) is heads[chosen]
    assert quantize.fastest_of({"none": 100.0, "int8": 49.0, "w8a8": 47.0}) == "w8a8"
    assert quantize.fastest_of({"none": 100.0, "int8": 48.0, "w8a8": 47.0}) == "int8"  # within 3%: the more faithful
    monkeypatch.undo()
    monkeypatch.setattr(quantize, "w8a8_available", lambda: False)  # a CPU without the integer product
    assert list(quantize.fastest_quantization(truncated_copy(target, 1), repeats=1)[1]) == ["none", "int8", "int4"]
