"""The int4 engine (specdec/quantize.py ``Int4Linear``, specdec/gguf_weights.py): a target converted
from a Q4_K GGUF runs that file's own 4-bit levels through torch's packed int4 product, every row
with the bits it gets alone, so speculation gives exactly the engine's own one-token decoding. Tiny
GGUF files are written here with the ``gguf`` package (tests/tiny_models.py ``save_tiny_gguf``)."""

import random
from types import SimpleNamespace

import pytest
import torch

from local_clients import LocalDraft, LocalVerify, local_controller, mismatched_nodes, params, stepped_greedy
from specdec.gguf_weights import GgufError, decode_q4k, model_gguf, read_q4k
from specdec.kernels import make_batch_invariant
from specdec.precision import tree_matches_steps
from specdec.quantize import Int4Linear, Int8Linear, _int4_per_group, quantize_model
from test_batch_invariance import PROMPT, random_tree
from tiny_models import EOS, encode_q4k, save_tiny_gguf, tiny_qwen2


def tiny(seed: int = 0, layers: int = 2):
    # 256 wide: a Q4_K block is 256 weights, and the packed product wants outputs in multiples of 16.
    return tiny_qwen2(seed=seed, layers=layers, hidden=256, sharpness=1.5, eos_token_id=EOS)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return save_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf"), tiny(layers=3))


@pytest.fixture(scope="module")
def int4_target(gguf_dir):
    from specdec.model_store import load_model

    model, _ = load_model(str(gguf_dir), dtype="bfloat16")
    quantize_model(model, "int4", gguf=model_gguf(gguf_dir))
    make_batch_invariant(model)
    return model


def test_q4k_blocks_decode_to_their_levels_scales_and_minimums():
    weight = torch.randn(32, 512, generator=torch.Generator().manual_seed(1))
    blocks, values = encode_q4k(weight)
    stored = decode_q4k(blocks, [32, 512])
    assert stored.levels.dtype == torch.uint8 and int(stored.levels.max()) <= 15
    assert torch.equal(stored.dequantized(), values)
    assert (values - weight).abs().max() < weight.abs().max() / 8  # a 4-bit fit, not noise


def test_the_int4_engine_runs_the_files_own_levels(gguf_dir, int4_target):
    stored = read_q4k(model_gguf(gguf_dir), [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)] + ["lm_head.weight"])
    assert len(stored) == 4
    mlp = int4_target.model.layers[1].mlp
    # gate and up read one input: one product over both, each taking its own columns.
    stacked = mlp.specdec_gate_proj_up_proj
    assert isinstance(stacked, Int4Linear) and stacked.packed is not None and stacked.out_features == 1024
    x = torch.eye(256, dtype=torch.bfloat16)
    exact = stored["model.layers.1.mlp.up_proj.weight"].dequantized()
    # The product of the identity is the weight: the file's values, but for bfloat16 scales and offsets.
    assert (mlp.up_proj(x).float().T - exact).abs().max() <= exact.abs().max() / 32
    assert isinstance(int4_target.model.layers[0].self_attn.specdec_q_proj_k_proj_v_proj, Int4Linear)
    # The head keeps its levels (a draft widens a slice of its rows).
    head = int4_target.get_output_embeddings()
    assert head.dequantized_rows(5).shape == (5, 256)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 33])
def test_an_int4_target_is_batch_invariant(int4_target, rows):
    assert int4_target._specdec_kernel == "int4"
    rng = random.Random(rows)
    assert mismatched_nodes(int4_target, random_tree(rng, rows), PROMPT, cached=4) == []
    c = local_controller(LocalVerify(int4_target), [LocalDraft("self", int4_target)], eos_token_ids={EOS})
    result = c.generate(params(PROMPT, 16, "tree", 3, 2, min(rows, 16), 64))
    assert result.token_ids == stepped_greedy(int4_target, PROMPT, 16)


@pytest.mark.parametrize("mode", ["sequential", "tree"])
def test_speculation_with_an_int4_target_and_draft_is_lossless(int4_target, mode):
    draft = quantize_model(tiny(seed=5, layers=1).to(torch.bfloat16), "int4")
    c = local_controller(LocalVerify(int4_target), [LocalDraft("self", int4_target), LocalDraft("other", draft)],
                         eos_token_ids={EOS})
    result = c.generate(params(PROMPT, 24, mode, 4, 3, 3, 16))
    assert result.token_ids == stepped_greedy(int4_target, PROMPT, 24)


def test_int4_from_floats_fits_each_group_and_keeps_the_head_int8():
    model = tiny(layers=1).to(torch.bfloat16)
    reference = model.model.layers[0].mlp.down_proj.weight.detach().float().clone()
    quantize_model(model, "int4")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4Linear) and isinstance(model.get_output_embeddings(), Int8Linear)
    widened = down(torch.eye(512, dtype=torch.bfloat16)).float().T
    step = (reference.reshape(256, -1, 32).amax(-1) - reference.reshape(256, -1, 32).amin(-1)) / 15
    assert ((widened - reference).abs().reshape(256, -1, 32) <= step[..., None] * 0.6 + 1e-3).all()


def test_shapes_the_packed_product_refuses_widen_the_same_values():
    """Outputs not a multiple of 16 (tiny models only): the 4-bit values are widened once, the same
    model without the saving."""
    linear = torch.nn.Linear(64, 24, bias=True)
    widened = Int4Linear.from_linear(linear)
    assert widened.packed is None
    packed = Int4Linear.from_linear(torch.nn.Linear(64, 32))
    assert packed.packed is not None
    q, scales_and_offsets = _int4_per_group(linear.weight.detach().float())
    scales, offsets = scales_and_offsets.float().repeat_interleave(32, 0).unbind(-1)
    values = (q.float() - 8) * scales.T + offsets.T
    x = torch.randn(3, 64)
    expected = x.bfloat16().float() @ values.T + linear.bias.detach().bfloat16().float()
    assert torch.allclose(widened(x), expected, rtol=0.02, atol=0.02)
    small = tiny_qwen2(seed=2, layers=2, hidden=64, sharpness=1.5, eos_token_id=EOS).to(torch.bfloat16)
    make_batch_invariant(quantize_model(small, "int4"))
    assert tree_matches_steps(small, 96)


def test_a_truncated_or_foreign_gguf_is_a_clear_error(gguf_dir, tmp_path):
    truncated = tmp_path / "cut.gguf"
    data = (model_gguf(gguf_dir)).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(GgufError, match="cannot be read"):
        read_q4k(truncated, ["lm_head.weight"])
    import gguf

    foreign = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(foreign, "no-such-architecture")
    writer.add_tensor("output.weight", torch.zeros(16, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GgufError, match="no-such-architecture"):
        read_q4k(foreign, ["lm_head.weight"])


def test_target_quantize_auto_measures_int4_only_beside_a_gguf(gguf_dir):
    from specdec.verify_service.server import target_engines

    def settings(**values):
        return SimpleNamespace(**({"dtype": "auto", "target_quantize": "auto", "device": "cpu"} | values))

    gguf = model_gguf(gguf_dir)
    assert target_engines(settings(), gguf) == {"bfloat16": ("bfloat16", "none"), "float32": ("float32", "none"),
                                                "int4": ("bfloat16", "int4")}
    assert list(target_engines(settings(), gguf)) == ["int4", "bfloat16", "float32"]  # smallest first: a lower peak
    assert target_engines(settings(), None) == {"bfloat16": ("bfloat16", "none"), "float32": ("float32", "none")}
    assert target_engines(settings(dtype="float32"), gguf) == {"float32": ("float32", "none"), "int4": ("bfloat16", "int4")}
    assert target_engines(settings(target_quantize="int4"), gguf) == {"int4": ("bfloat16", "int4")}
    assert target_engines(settings(target_quantize="w8a8"), gguf) == {"w8a8": ("float32", "w8a8")}


def test_auto_keeps_the_floats_where_the_gguf_is_ambiguous_and_int4_says_why(gguf_dir, tmp_path):
    import shutil

    from specdec.verify_service.server import target_gguf

    several = tmp_path / "several"
    shutil.copytree(gguf_dir, several)
    shutil.copy(model_gguf(gguf_dir), several / "other.gguf")
    settings = SimpleNamespace(target_quantize="auto", device="cpu")
    assert target_gguf(str(gguf_dir), settings) == model_gguf(gguf_dir)
    assert target_gguf(str(several), settings) is None
    with pytest.raises(GgufError, match="several GGUF files"):
        target_gguf(str(several), SimpleNamespace(target_quantize="int4", device="cpu"))
