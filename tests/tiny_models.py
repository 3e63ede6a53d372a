"""Tiny randomly initialised Qwen2 models (the real pair's architecture) and a character-level
tokenizer, for fast tests; and the reference every lossless test compares against."""

from __future__ import annotations

import copy
import string
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHARS = string.printable[:95]  # digits, letters, punctuation, space
VOCAB = len(CHARS) + 1  # + end-of-sequence
EOS = VOCAB - 1


def tiny_qwen2(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = VOCAB, sharpness: float = 20.0,
               eos_token_id: int | None = None) -> Qwen2ForCausalLM:
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
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    # Sharpen the random logits so greedy paths are decisive rather than near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    model.generation_config.eos_token_id = eos_token_id
    return model.eval()


def truncated_copy(model: Qwen2ForCausalLM, layers: int | list[int]) -> Qwen2ForCausalLM:
    """A cheaper draft sharing the target's embeddings and head: its first ``layers`` layers, or
    the layers listed (skipping middle layers keeps a real model's output far more sensible)."""
    keep = list(range(layers)) if isinstance(layers, int) else list(layers)
    draft = copy.deepcopy(model)
    draft.model.layers = torch.nn.ModuleList(draft.model.layers[i] for i in keep)
    for new_index, layer in enumerate(draft.model.layers):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    draft.config.num_hidden_layers = len(keep)
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = [draft.config.layer_types[i] for i in keep]
    return draft.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(CHARS)} | {"</s>": EOS}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token=" ")


def save_tiny(path: Path, model: Qwen2ForCausalLM) -> Path:
    """Save a tiny model with the tiny tokenizer, loadable by the services as a local path."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The target alone: transformers greedy generate, new tokens only (stops at EOS like generate)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()
