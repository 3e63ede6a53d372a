"""Batch invariance: every row of a forward pass gets the same bits whatever the number of rows and
whatever tree surrounds it, so speculative output is the model's own one-token greedy output bit for
bit, near-ties included. Each check runs in float32 and bfloat16 on the kernel this machine picks
(oneDNN's packed product where it is row-invariant here), and in float32 on the fixed-row blocks
every device has."""

import random

import pytest
import torch

from local_clients import LocalDraft, LocalVerify, local_controller, mismatched_nodes, params, stepped_greedy
from specdec.kernels import make_batch_invariant
from specdec.tools.gpu_check import TREE_SHAPES, check_tree
from specdec.tree import TokenTree
from tiny_models import EOS, tiny_qwen2, truncated_copy

PROMPT = [11, 40, 3, 77, 25, 60, 8, 19, 33]


VARIANTS = [("float32", "auto"), ("bfloat16", "auto"), ("float32", "fixed-rows")]


def tiny_model(seed: int, layers: int, sharpness: float = 20.0, hidden: int = 64, dtype: str = "bfloat16"):
    return tiny_qwen2(seed=seed, layers=layers, sharpness=sharpness, hidden=hidden, eos_token_id=EOS).to(getattr(torch, dtype))


def invariant(model, kernel: str):
    make_batch_invariant(model, kernel=kernel)
    return model


@pytest.fixture(scope="module", params=VARIANTS, ids="-".join)
def model(request):
    dtype, kernel = request.param
    # Wider than the other tiny models, so linear products take the kernels' blocked paths.
    return invariant(tiny_model(seed=3, layers=2, hidden=256, dtype=dtype), kernel)


def random_tree(rng: random.Random, n: int) -> TokenTree:
    return check_tree(n, rng, 90, shape=rng.choice(TREE_SHAPES))


@pytest.mark.parametrize("rows", range(1, 17))
def test_each_node_matches_its_one_token_steps_bit_for_bit(model, rows):
    rng = random.Random(rows)
    tree = random_tree(rng, rows)
    context = [rng.randrange(90) for _ in range(rng.randint(2, 24))]
    assert mismatched_nodes(model, tree, context, cached=rng.randint(0, len(context) - 1)) == []


@pytest.mark.parametrize("parents", [[-1, 0, 1, 0, -1, 4], [-1] * 16, list(range(-1, 15)), [-1, -1, 0, 0, 1, 1, 2, 2, 3]])
def test_tree_shapes_match_bit_for_bit(model, parents):
    tree = TokenTree(tokens=[(7 * i + 3) % 90 for i in range(len(parents))], parents=parents)
    assert mismatched_nodes(model, tree, PROMPT, cached=len(PROMPT) - 1) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_check_catches_a_different_path(dtype):
    """The stock path (SDPA with a mask, products of any row count) is not batch-invariant: the
    same check finds differing nodes there, so it can fail."""
    stock = tiny_model(seed=3, layers=2, hidden=256, dtype=dtype)
    rng = random.Random(0)
    bad = 0
    for rows in (4, 9, 16):
        bad += len(mismatched_nodes(stock, random_tree(rng, rows), PROMPT, cached=3))
    assert bad > 0


@pytest.fixture(scope="module", params=VARIANTS, ids="-".join)
def flat_target(request):
    # Flat logits: near-ties everywhere, where only exact arithmetic keeps the output equal.
    dtype, kernel = request.param
    return invariant(tiny_model(seed=0, layers=3, sharpness=1.5, hidden=128, dtype=dtype), kernel)


@pytest.mark.parametrize(
    "mode, settings",
    [
        ("autoregressive", {}),
        ("sequential", {"draft_length": 4}),
        ("tree", {"beam_width": 3, "beam_depth": 4}),
        ("tree", {"beam_width": 4, "beam_depth": 4, "max_tree_nodes": 16}),
    ],
)
def test_speculative_output_is_one_token_greedy_bit_for_bit(flat_target, mode, settings):
    drafts = [LocalDraft("self", flat_target), LocalDraft("truncated", truncated_copy(flat_target, 1))]
    c = local_controller(LocalVerify(flat_target), drafts, eos_token_ids={EOS})
    request = dict(draft_length=5, beam_width=2, beam_depth=4, max_tree_nodes=64) | settings
    result = c.generate(params(PROMPT, 20, mode, request["draft_length"], request["beam_width"],
                               request["beam_depth"], request["max_tree_nodes"]))
    assert result.token_ids == stepped_greedy(flat_target, PROMPT, 20)


@pytest.fixture(scope="module")
def int8_target():
    from specdec.quantize import quantize_model

    model = quantize_model(tiny_model(seed=0, layers=3, sharpness=1.5, hidden=128, dtype="bfloat16"), "int8")
    make_batch_invariant(model)
    return model


@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_an_int8_target_is_batch_invariant(int8_target, rows):
    """An int8 weight-only target (--target-quantize int8) is another model, but exact against its
    own one-token decoding the same way."""
    assert int8_target._specdec_kernel in ("int8", "int8-fixed-rows")
    rng = random.Random(rows)
    assert mismatched_nodes(int8_target, random_tree(rng, rows), PROMPT, cached=4) == []
    c = local_controller(LocalVerify(int8_target), [LocalDraft("self", int8_target)], eos_token_ids={EOS})
    result = c.generate(params(PROMPT, 16, "tree", 3, 2, rows, 64))
    assert result.token_ids == stepped_greedy(int8_target, PROMPT, 16)


def test_a_product_whose_one_row_path_differs_is_padded_to_two_rows():
    """As oneDNN on some CPUs: a single row takes a matrix-vector path with its own summation order,
    two or more rows all agree. Padding one-row products to two makes it invariant; a product that
    depends on the whole batch (here: scaled by its row count) stays refused."""
    from specdec.kernels import CHECKED_ROWS, invariant_min_rows

    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))

    def rowwise(x):  # the same call for each row, whatever the batch
        return torch.stack([weight.mv(row) for row in x])

    def gemv_differs(x):
        if x.shape[0] == 1:  # another summation order than the blocked product's
            return (x[:, None, :] * weight[None]).flip(-1).cumsum(-1)[..., -1]
        return rowwise(x)

    def batch_dependent(x):
        return rowwise(x) * (1 + 1e-3 * x.shape[0])

    counts = CHECKED_ROWS[:16]
    assert invariant_min_rows(rowwise, 96, torch.float32, counts) == 1
    assert invariant_min_rows(gemv_differs, 96, torch.float32, counts) == 2
    assert invariant_min_rows(batch_dependent, 96, torch.float32, counts) is None


@pytest.fixture(scope="module")
def w8a8_target():
    from specdec.quantize import quantize_model

    model = quantize_model(tiny_model(seed=0, layers=3, sharpness=1.5, hidden=128, dtype="float32"), "w8a8")
    make_batch_invariant(model)
    return model


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 33])
def test_a_w8a8_target_is_batch_invariant(w8a8_target, rows):
    """int8 weights and per-row int8 activations (--target-quantize w8a8): integer products, so
    every tree pass gives each node the bits of its own one-token steps, and speculation returns the
    quantized model's own one-token greedy output."""
    assert w8a8_target._specdec_kernel == "w8a8"
    rng = random.Random(rows)
    assert mismatched_nodes(w8a8_target, random_tree(rng, rows), PROMPT, cached=4) == []
    c = local_controller(LocalVerify(w8a8_target), [LocalDraft("self", w8a8_target)], eos_token_ids={EOS})
    result = c.generate(params(PROMPT, 16, "tree", 3, 2, min(rows, 16), 64))
    assert result.token_ids == stepped_greedy(w8a8_target, PROMPT, 16)
