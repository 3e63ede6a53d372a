"""Tiny randomly initialised Qwen2 models (the real pair's architecture) and a character-level
tokenizer, for fast tests; and the reference every lossless test compares against."""

from __future__ import annotations

import copy
import string
from pathlib import Path

import numpy as np
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


def encode_q4k(weight: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """``weight`` ``[out, in]`` (``in`` a multiple of 256) as llama.cpp's Q4_K blocks (144 bytes per 256
    weights: float16 ``d`` and ``dmin``, twelve bytes of six-bit group scales and minimums, 128 bytes
    of levels), by a plain min-max fit; returns the raw blocks ``[out, in / 256 * 144]`` and the
    values they decode to (what a conversion of that file holds). The ``gguf`` package has no Q4_K
    encoder, so tests build their own files with this."""
    out, in_features = weight.shape
    groups = weight.float().reshape(-1, 8, 32)  # [blocks, 8 groups, 32]
    low, high = groups.amin(-1), groups.amax(-1)
    steps = ((high - low) / 15).clamp(min=1e-8)
    offsets = (-low).clamp(min=0)
    d = (steps.amax(-1) / 63).half().float().clamp(min=1e-7)
    dmin = (offsets.amax(-1) / 63).half().float().clamp(min=1e-7)
    sc = torch.round(steps / d[:, None]).clamp(1, 63)
    mn = torch.round(offsets / dmin[:, None]).clamp(0, 63)
    scale, minimum = d[:, None] * sc, dmin[:, None] * mn
    levels = torch.round((groups + minimum[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    values = (levels.float() * scale[..., None] - minimum[..., None]).reshape(out, in_features)
    sc, mn = sc.to(torch.uint8).numpy(), mn.to(torch.uint8).numpy()
    packed = np.zeros((groups.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    lv = levels.numpy().reshape(-1, 4, 2, 32)  # pairs of groups share 32 bytes: low nibbles, then high
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.half().numpy().view(np.uint8).reshape(-1, 2), dmin.half().numpy().view(np.uint8).reshape(-1, 2),
                             packed, qs], axis=1)
    return blocks.reshape(out, -1), values


def save_tiny_gguf(path: Path, model: Qwen2ForCausalLM) -> Path:
    """Save ``model`` as ``specdec models fetch`` leaves an embedded one: a GGUF file (its linear
    layers of 256-multiple width in Q4_K, everything else float32) and, beside it, the float
    checkpoint converted from that file (the model's linear weights are first set to the values
    their Q4_K blocks decode to)."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, model.config.num_hidden_layers)
    path.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path / "tiny.Q4_K_M.gguf", "qwen2")
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        for name, param in model.state_dict().items():
            stored = table.get_name(name, try_suffixes=(".weight", ".bias"))
            if name in linears and param.shape[1] % 256 == 0:
                blocks, values = encode_q4k(param)
                param.copy_(values.to(param.dtype))
                writer.add_tensor(stored, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
            else:
                writer.add_tensor(stored, param.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return save_tiny(path, model)
