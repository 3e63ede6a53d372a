"""Tiny randomly initialised Qwen2 models for fast tests (same architecture as the real pair)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 96


def tiny_qwen2(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = VOCAB, sharpness: float = 20.0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    # Sharpen the random logits so greedy paths are decisive rather than near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model.eval()


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The target alone: transformers greedy generate, new tokens only."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()
