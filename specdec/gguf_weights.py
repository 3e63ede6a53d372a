"""A model's 4-bit weights read from the GGUF file it was converted from, at their stored precision.

``specdec models fetch`` keeps each embedded model's Q4_K_M GGUF beside the float checkpoint
converted from it. The float checkpoint holds every Q4_K tensor's values exactly (the GGUF's own
``d * sc * q - dmin * m``), but quantizing those floats again cannot always find the grid they came
from (a 32-weight group that never uses level 0 or 15 has a narrower range than its grid). Read from
the file, each Q4_K group is its 4-bit levels, one scale and one minimum: exactly the layout of
torch's packed int4 product (:class:`specdec.quantize.Int4Linear`), so the int4 engine runs the
GGUF's own weights. Tensors stored at other precisions (Q6_K, Q5_0, Q8_0, ...) are not read here.

The GGUF's tensor names are mapped to the model's parameter names by the ``gguf`` package's own
table (:func:`gguf.get_tensor_name_map`), and every tensor read is checked against the model's
float weight (a tensor the conversion changed, e.g. a permuted projection, is left to the floats).
Decoding follows the Q4_K block layout of ggml (``block_q4_K``: two float16 super-scales, twelve
bytes of 6-bit scales and minimums, 128 bytes of levels), vectorized with numpy; the ``gguf``
package dequantizes but has no call that returns the levels, so the few lines that split a block
are written here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specdec.model_store import ModelStoreError

log = logging.getLogger("specdec")

#: Weights per Q4_K group (one scale and one minimum each), eight groups to a 256-weight block.
GROUP = 32


class GgufError(ModelStoreError):
    """A GGUF file that cannot serve: truncated, unreadable, or of an architecture without a name table."""


@dataclass
class Q4KTensor:
    """One Q4_K tensor ``[out, in]``: ``weight = levels * scales - minimums`` per group of 32 inputs."""

    levels: torch.Tensor  # [out, in] uint8, 0..15
    scales: torch.Tensor  # [out, in / 32] float32 (d * sc)
    minimums: torch.Tensor  # [out, in / 32] float32 (dmin * m)

    def dequantized(self) -> torch.Tensor:
        out, in_features = self.levels.shape
        groups = self.levels.reshape(out, in_features // GROUP, GROUP).float()
        return (groups * self.scales[..., None] - self.minimums[..., None]).reshape(out, in_features)


def model_gguf(path: str | Path) -> Path | None:
    """The GGUF file in a model directory (``specdec models fetch`` keeps one beside the converted
    weights), or None where it holds none. Raises GgufError where it holds several."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise GgufError(f"{directory} holds several GGUF files ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def read_q4k(path: Path, names: list[str]) -> dict[str, Q4KTensor]:
    """The Q4_K tensors among the model parameters ``names`` (``model.layers.0.mlp.up_proj.weight``
    and so on), decoded from the GGUF at ``path``. Parameters stored otherwise are left out. Raises
    GgufError for a file that cannot be read or an architecture the ``gguf`` package has no names for."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as exc:  # a truncated file fails its own size checks
        raise GgufError(f"GGUF file {path} cannot be read (truncated or not a GGUF file?): {exc}") from exc
    field = reader.fields.get(gguf.KEY_GENERAL_ARCHITECTURE)
    arch_name = field.contents() if field is not None else None
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise GgufError(f"GGUF file {path}: architecture {arch_name!r} has no tensor name table in the gguf package")
    blocks = 1 + max((int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")), default=-1)
    table = gguf.get_tensor_name_map(arch, blocks)
    tensors = {t.name: t for t in reader.tensors}
    found = {}
    for name in names:
        stored = tensors.get(table.get_name(name, try_suffixes=(".weight", ".bias")) or "")
        if stored is not None and stored.tensor_type == gguf.GGMLQuantizationType.Q4_K:
            found[name] = decode_q4k(np.asarray(stored.data), [int(n) for n in reversed(stored.shape)])
    return found


def decode_q4k(data: np.ndarray, shape: list[int]) -> Q4KTensor:
    """Q4_K blocks (``data``: raw bytes, 144 a block of 256 weights) as levels, scales and minimums of
    a ``shape`` = ``[out, in]`` tensor."""
    out, in_features = shape
    blocks = data.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, 4:16].reshape(-1, 3, 4)  # six-bit scales and minimums of the eight groups
    low, high, mixed = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = np.concatenate([low & 0x3F, (mixed & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)], axis=-1)
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    levels = (qs & 0x0F).reshape(out, in_features)  # groups in order: low nibbles, then high, per 32 bytes
    return Q4KTensor(torch.from_numpy(np.ascontiguousarray(levels)),
                     torch.from_numpy((d * sc).reshape(out, in_features // GROUP)),
                     torch.from_numpy((dmin * mn).reshape(out, in_features // GROUP)))
