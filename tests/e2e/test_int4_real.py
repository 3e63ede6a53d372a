"""The int4 engine on a real GGUF: Qwen2.5-Coder-0.5B-Instruct's own Q4_K_M file (kept by ``specdec
models fetch``), its Q4_K tensors as their 4-bit levels and the rest int8, checked as every exact
path is: each node of a tree pass against its path stepped one token per forward, bit for bit, at
row counts up to 64 and every tree shape, and speculation against the engine's one-token decoding."""

import random

import pytest
import torch

from local_clients import LocalDraft, LocalVerify, local_controller, mismatched_nodes, params, stepped_greedy
from specdec.gguf_weights import model_gguf
from specdec.kernels import make_batch_invariant
from specdec.model_store import fetch, load_model
from specdec.quantize import Int4Linear, quantize_model
from specdec.tools.gpu_check import TREE_SHAPES, check_tree
from tiny_models import EOS

pytestmark = pytest.mark.slow
MODEL = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def engine():
    directory = fetch(MODEL)
    gguf = model_gguf(directory)
    assert gguf is not None, "specdec models fetch keeps the GGUF beside the converted weights"
    model, tokenizer = load_model(str(directory), dtype="bfloat16")
    quantize_model(model, "int4", gguf=gguf)
    kernel = make_batch_invariant(model)
    return model, tokenizer, kernel


def test_the_files_q4k_tensors_run_as_4_bit_levels_on_row_invariant_kernels(engine):
    model, _, kernel = engine
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 12  # half the layers' down projections
    assert "fixed-rows" not in kernel, f"the int4 and int8 products should be row-invariant here: {kernel}"


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 33, 64])
def test_every_tree_node_gets_the_bits_of_its_one_token_steps(engine, rows):
    model, tokenizer, _ = engine
    rng = random.Random(rows)
    context = tokenizer("def fibonacci(n):\n    ").input_ids
    tree = check_tree(rows, rng, 5000, shape=TREE_SHAPES[rows % len(TREE_SHAPES)])
    with torch.inference_mode():
        assert mismatched_nodes(model, tree, context, cached=len(context) - 2) == []


def test_speculation_returns_the_engines_one_token_decoding(engine):
    model, tokenizer, _ = engine
    prompt = tokenizer("def is_prime(n):\n    ").input_ids
    c = local_controller(LocalVerify(model), [LocalDraft("self", model)], eos_token_ids={EOS}, tokenizer=tokenizer,
                         vocab_size=model.config.vocab_size)
    with torch.inference_mode():
        result = c.generate(params(prompt, 24, "tree", 3, 2, 3, 16))
        assert result.token_ids == stepped_greedy(model, prompt, 24)
