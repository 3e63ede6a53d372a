"""Quantized linear layers: a model's linear layers and output head replaced in place
(:func:`quantize_model`), the embedding table left in floating point (a lookup reads one row, not
the table).

- ``int8`` (:class:`Int8Linear`): int8 weights, one scale per output channel, multiplied in
  bfloat16 by torch's packed kernel (``torch.ops.aten._weight_int8pack_mm``), whose cost is mostly
  reading the weights. Any device; the embedded draft's default on a CPU.
- ``int4`` (:class:`Int4Linear`): 4-bit weights in groups of 32 along the input, each group with its
  own scale and offset (a model converted from a 4-bit GGUF keeps its own values, as near as
  bfloat16 scales hold them), multiplied in bfloat16 by torch's packed kernel
  (``torch.ops.aten._weight_int4pack_mm_for_cpu``), which reads half a byte a weight and gives every
  row the bits it gets alone (checked per weight shape at start-up, :mod:`specdec.kernels`). CPUs.
- ``w8a8`` (:class:`W8A8Linear`): int8 weights *and* int8 activations with one scale per row (per
  token), multiplied by oneDNN's int8 product (``torch.ops.onednn.qlinear_pointwise``, VNNI where
  the CPU has it), summed in int32. Integer sums are exact in any order or blocking, and a row's
  scale depends on that row alone, so every row gets the same bits whatever else shares the pass:
  batch-invariant by construction, and the flattest exact product measured on 2 cores (docs,
  "Quantized engines"). x86 CPUs only (torch has no such product elsewhere).

A quantized target is another model than the float one (each format's top-1 agreement with the
float model is in the docs); speculation stays exact against that model's own one-token decoding.
A quantized draft can cost acceptance, never output: the target decides every token.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from torch import nn

from specdec.config import QUANTIZE_MODES
from specdec.gguf_weights import Q4KTensor, read_q4k

log = logging.getLogger("specdec")

#: The model dtype each quantized format runs the rest of the model in (norms, attention): the int8
#: weight-only kernel wants bfloat16 activations; the w8a8 product takes float32 and returns it.
MODEL_DTYPES = {"int8": ("bfloat16",), "int4": ("bfloat16",), "w8a8": ("float32",)}
# Devices with a kernel for the packed product; elsewhere the int8 weights are widened per call
# (the memory saving stays, the speed-up does not).
_PACKED_DEVICES = ("cpu", "mps")
# The CPU kernel's AVX-512 path reads the reduction dimension 16 at a time with no tail: other
# widths crashed the process (torch 2.13, AMD EPYC with AVX-512). Such layers (tiny test models
# only; real ones are multiples of 64) widen their weights instead.
_PACKED_IN_MULTIPLE = 16


class Int8Linear(nn.Module):
    """A bias-optional linear layer with int8 weights, symmetric per output channel:
    ``weight_float[n, k] ≈ weight[n, k] * scales[n]``."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # [out_features, in_features] int8
        self.register_buffer("scales", scales)  # [out_features], the activations' dtype
        self.register_buffer("bias", bias)  # [out_features] or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight, scales = _int8_per_channel(linear.weight.detach().float())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight, scales.to(linear.weight.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scales = self.scales.to(x.dtype)
        if x.device.type in _PACKED_DEVICES and self.in_features % _PACKED_IN_MULTIPLE == 0:
            # The kernel's fast path takes bfloat16 activations (float32 ones cost 5 to 25 times
            # more, measured on 2 cores); a draft need not be exact, so it always runs in bfloat16.
            out = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.weight,
                                                     self.scales.to(torch.bfloat16)).to(x.dtype)
        else:
            out = (rows @ self.weight.to(x.dtype).T) * scales
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized_rows(self, limit: int) -> torch.Tensor:
        """The first ``limit`` rows of the weight in floating point, ``[limit, in_features]``."""
        return self.weight[:limit].to(self.scales.dtype) * self.scales[:limit, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


#: Weights per group of :class:`Int4Linear` (each with its own scale and offset): the sub-block of
#: llama.cpp's Q4_K, so a tensor read from such a GGUF keeps its own grid.
INT4_GROUP = 32
# What torch's packed int4 product takes: output features a multiple of 16, input features of the group.
_INT4_OUT_MULTIPLE = 16


class Int4Linear(nn.Module):
    """A bias-optional linear layer with 4-bit weights, asymmetric per group of :data:`INT4_GROUP`
    inputs: ``weight_float[n, k] = (q[n, k] - 8) * scale[g, n] + offset[g, n]`` for ``g = k // 32``,
    ``q`` in 0..15 (torch's packed int4 layout). Activations and output in bfloat16.

    Where torch's product takes the shape (CPUs; output features a multiple of 16), the weight is
    packed once and read half a byte a weight; elsewhere (tiny test models, other devices) the 4-bit
    values are widened once to a bfloat16 matrix (the same model, without the saving). A head also
    keeps its 4-bit values, two to a byte, so a draft can widen a slice of its rows."""

    def __init__(self, q: torch.Tensor, scales_and_offsets: torch.Tensor, bias: torch.Tensor | None,
                 keep_values: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("nibbles", (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8))  # [out, in / 2]
        self.register_buffer("scales_and_offsets", scales_and_offsets)  # [in / 32, out, 2] bfloat16
        self.register_buffer("bias", bias)
        self.packed = None
        if q.device.type == "cpu" and self.out_features % _INT4_OUT_MULTIPLE == 0:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        else:
            self.register_buffer("widened", self.dequantized_rows(self.out_features))
        if not keep_values:  # only a head keeps them (a draft scores a slice of its rows)
            self.nibbles = None
        # A shape-only stand-in (code reads the weight's shape and dtype).
        self.register_buffer("weight", torch.empty(q.shape, dtype=torch.bfloat16, device="meta"))

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_values: bool = False) -> "Int4Linear":
        """The layer's float weight in 4 bits, each group of 32 spanning its own range in 15 steps."""
        if linear.in_features % INT4_GROUP:
            raise ValueError(f"int4 needs input features in multiples of {INT4_GROUP}, got {linear.in_features}")
        q, scales_and_offsets = _int4_per_group(linear.weight.detach().float())
        return cls(q, scales_and_offsets, _bf16_bias(linear), keep_values)

    @classmethod
    def from_q4k(cls, stored, linear: nn.Linear, keep_values: bool = False) -> "Int4Linear":
        """The layer as a GGUF stores it in Q4_K (:class:`specdec.gguf_weights.Q4KTensor`: levels, and a
        scale and minimum per group of 32): its own levels, the scale and the value at level 8 rounded
        to bfloat16 (the only change from the file's values, under a thirtieth of a level)."""
        offsets = 8 * stored.scales - stored.minimums
        scales_and_offsets = torch.stack([stored.scales.T, offsets.T], dim=-1).to(torch.bfloat16).contiguous()
        return cls(stored.levels, scales_and_offsets, _bf16_bias(linear), keep_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.packed is not None:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_and_offsets)
        else:
            out = rows @ self.widened.T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized_rows(self, limit: int) -> torch.Tensor:
        """The first ``limit`` rows of the weight in bfloat16, ``[limit, in_features]`` (a head only)."""
        if self.nibbles is None:
            raise ValueError("this layer keeps only its packed weight")
        nibbles = self.nibbles[:limit]
        q = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).reshape(nibbles.shape[0], -1).float()
        scales, offsets = self.scales_and_offsets[:, :limit].float().repeat_interleave(INT4_GROUP, 0).unbind(-1)
        return ((q - 8) * scales.T + offsets.T).to(torch.bfloat16)

    def __deepcopy__(self, memo) -> "Int4Linear":
        return self  # the packed weight is read-only: copies share the layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int4"


def _bf16_bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).clone()


def _int4_per_group(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[out, in]`` float as 4-bit levels (uint8, 0..15) and ``[in / 32, out, 2]`` bfloat16
    scales and values at level 8: each group of 32 spans its own minimum to maximum in 15 steps."""
    out_features, in_features = w.shape
    groups = w.reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    offsets = (low + 8 * scales.float()).to(torch.bfloat16)  # the value at level 8
    q = torch.round((groups - offsets.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    return (q.to(torch.uint8).reshape(out_features, in_features),
            torch.stack([scales.T, offsets.T], dim=-1).contiguous())


class W8A8Linear(nn.Module):
    """A bias-optional linear layer with int8 weights (symmetric, one scale per output channel) and
    int8 activations (symmetric, one scale per row), multiplied in integers by oneDNN:
    ``out[r, n] = (sum_k qx[r, k] * qw[n, k]) * w_scale[n] * x_scale[r]``.

    Each row is quantized by its own largest magnitude and its integer sums are exact, so a row's
    output never depends on the other rows of the pass (checked anyway by
    :func:`specdec.kernels.make_batch_invariant`, as every kernel is). The packed weight is opaque:
    only the output head keeps its int8 matrix too (a draft scores a slice of it)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, keep_weight: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.levels, self.zero_point = activation_range()
        self.packed = torch.ops.onednn.qlinear_prepack(weight, None)
        self.register_buffer("scales", scales.float())  # [out_features]
        self.register_buffer("bias", None if bias is None else bias.float())
        self.register_buffer("zero_points", torch.zeros(self.out_features, dtype=torch.long))
        # A shape-only stand-in where the int8 matrix is not kept (code reads the head's shape).
        self.register_buffer("weight", weight if keep_weight else torch.empty_like(weight, device="meta"))

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_weight: bool = False) -> "W8A8Linear":
        weight, scales = _int8_per_channel(linear.weight.detach().float())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight, scales, bias, keep_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        step = rows.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / self.levels
        # Unsigned with a zero point: oneDNN's fast int8 path takes u8 activations (s8 ones ran a
        # reference path, 20 to 100 times slower, on the EPYC measured).
        q = (torch.round(rows / step) + self.zero_point).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(q, 1.0, self.zero_point, self.packed, self.scales, self.zero_points,
                                                 None, 1.0, 0, torch.float32, "none", [], "")
        out = out * step
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized_rows(self, limit: int) -> torch.Tensor:
        """The first ``limit`` rows of the weight in float32 (the output head only)."""
        if self.weight.is_meta:
            raise ValueError("this layer keeps only its packed weight")
        return self.weight[:limit].float() * self.scales[:limit, None]

    def __deepcopy__(self, memo) -> "W8A8Linear":
        return self  # the packed weight is read-only and torch cannot copy it: copies share the layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, w8a8"


#: Sibling projections that read the same input in the model families this runs (Llama, Qwen, Mistral,
#: Gemma...): as w8a8 or int4 they are one product over their weights stacked, so the input is read
#: (and for w8a8 quantized) once and the weights in one call.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SharedProduct:
    """One product for several sibling layers (:data:`SHARED_INPUTS`): the first sibling called
    with an input runs it, and each sibling takes its own columns. A sibling called with another
    input runs it again (still right, only slower). Each column is summed over the inputs alone, so
    a row's bits never depend on the other rows (checked like every kernel, specdec.kernels)."""

    def __init__(self, layer: nn.Module, sizes: list[int]) -> None:
        self.layer, self.sizes = layer, sizes
        self.input, self.outputs = None, None

    def __call__(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self.input or self.outputs[index] is None:
            self.input, self.outputs = x, list(self.layer(x).split(self.sizes, dim=-1))
        out, self.outputs[index] = self.outputs[index], None
        if all(o is None for o in self.outputs):
            self.input = self.outputs = None  # all taken: hold no activations between passes
        return out


class SharedInputLinear(nn.Module):
    """One sibling of a :class:`_SharedProduct`: its columns of the stacked product."""

    def __init__(self, shared: _SharedProduct, index: int) -> None:
        super().__init__()
        self.shared, self.index = shared, index
        self.in_features, self.out_features = shared.layer.in_features, shared.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 shared input ({self.index})"


def _share_inputs(model: nn.Module, linears: list[tuple[str, nn.Linear]], build) -> list[tuple[str, nn.Linear]]:
    """Replace each complete group of :data:`SHARED_INPUTS` siblings under one parent by one stacked
    product, ``build(names, stacked)`` (``stacked``: an ``nn.Linear`` of the siblings' weights one
    after the other; it may return None to leave the group as it is), registered on the parent so
    that kernel checks see it; returns the linears left."""
    by_name = dict(linears)
    done = set()
    for name, _ in linears:
        parent_name, _, child = name.rpartition(".")
        for group in SHARED_INPUTS:
            names = [f"{parent_name}.{g}" if parent_name else g for g in group]
            if child != group[0] or not all(n in by_name for n in names):
                continue
            layers = [by_name[n] for n in names]
            if len({m.in_features for m in layers}) != 1 or len({m.bias is None for m in layers}) != 1:
                continue
            stacked = nn.Linear(layers[0].in_features, sum(m.out_features for m in layers), bias=layers[0].bias is not None,
                                dtype=layers[0].weight.dtype)
            with torch.no_grad():
                stacked.weight.copy_(torch.cat([m.weight.detach() for m in layers]))
                if stacked.bias is not None:
                    stacked.bias.copy_(torch.cat([m.bias.detach() for m in layers]))
            product = build(names, stacked)
            if product is None:
                continue
            parent = model.get_submodule(parent_name) if parent_name else model
            parent.add_module(f"specdec_{'_'.join(group)}", product)
            shared = _SharedProduct(product, [m.out_features for m in layers])
            for i, g in enumerate(group):
                setattr(parent, g, SharedInputLinear(shared, i))
            done.update(names)
    return [(n, m) for n, m in linears if n not in done]


def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[out, in]`` float as int8 with one scale per output row: the row's largest magnitude
    maps to 127 (-128 stays unused, so the range is symmetric)."""
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scales


@functools.cache
def activation_range() -> tuple[int, int]:
    """(largest activation level, zero point) for :class:`W8A8Linear`: ±127 around 128 where oneDNN's
    int8 product sums exactly; ±63 around 64 where full-range activations overflowed its 16-bit
    intermediate sums (CPUs without VNNI pair products in 16 bits), so that a sum is always exact."""
    if not w8a8_available():
        raise ValueError("w8a8 needs oneDNN's int8 product (torch.ops.onednn.qlinear_pointwise on an x86 CPU)")
    k = 64
    weight = torch.full((4, k), 127, dtype=torch.int8)
    x = torch.full((2, k), 255, dtype=torch.uint8)  # +127 around 128 times +127: the largest pair sums
    packed = torch.ops.onednn.qlinear_prepack(weight, None)
    out = torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, packed, torch.ones(4), torch.zeros(4, dtype=torch.long),
                                             None, 1.0, 0, torch.float32, "none", [], "")
    return (127, 128) if torch.equal(out, torch.full((2, 4), 127.0 * 127 * k)) else (63, 64)


def w8a8_available() -> bool:
    """Whether this torch has oneDNN's int8 linear product (x86 CPUs)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


#: What ``auto`` may pick, most faithful first: a near tie (within ``_TIE``) goes to the earlier one.
AUTO_CANDIDATES = ("none", "int8", "int4", "w8a8")
_TIE = 0.03
_PROBE_ROWS = (1, 4)  # a chain's step feeds one row, a tree's a few


def fastest_quantization(model: nn.Module, candidates=AUTO_CANDIDATES, repeats: int = 5) -> tuple[str, dict[str, float]]:
    """The candidate format whose linear layers cost ``model`` least per step on this machine, and
    each one's measured cost (ms, the mean over 1 and 4 rows). Measured, not assumed: on one 2-core
    AMD EPYC with VNNI, w8a8 was the fastest (0.5B draft, one row: 47 ms against int8's 49); on
    another with AVX2 only, int8 (60 ms against w8a8's 97, whose activations drop to 7 bits there,
    which also costs it acceptance: it is not a candidate there).

    Every distinct weight shape is timed once as each format (a copy of the first layer of that
    shape) and counted as often as it occurs: the linear layers are what the formats change, and
    the model's own weights are left untouched."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    head = model.get_output_embeddings()
    shapes: dict[tuple, list] = {}
    for m in linears:
        shapes.setdefault((m.in_features, m.out_features, m.bias is not None), [m, 0])[1] += 1
    # Not w8a8 where its activations drop to 7 bits (no VNNI): on an AVX2-only EPYC the draft's
    # first tokens were accepted 0.52 of the time as w8a8 against 1.00 as int8, same prompts.
    usable = [c for c in candidates if c != "w8a8" or (w8a8_available() and activation_range()[0] == 127)]
    costs = {}
    with torch.inference_mode():
        for mode in usable:
            total = 0.0
            for linear, count in shapes.values():
                layer = (linear if mode == "none" else Int8Linear.from_linear(linear) if mode == "int8"
                         else _int4_layer(linear, None, linear is head, False) if mode == "int4"
                         else W8A8Linear.from_linear(linear))
                for rows in _PROBE_ROWS:
                    x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype)
                    layer(x)  # the first call packs or warms up
                    times = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        layer(x)
                        times.append(time.perf_counter() - start)
                    total += count * sorted(times)[repeats // 2] * 1e3 / len(_PROBE_ROWS)
            costs[mode] = total
    return fastest_of(costs), costs


def fastest_of(costs: dict[str, float]) -> str:
    """The cheapest entry of ``costs`` (ordered most faithful first), a near tie going to the earlier one."""
    best = min(costs.values())
    return next(mode for mode, cost in costs.items() if cost <= best * (1 + _TIE))


def quantize_model(model: nn.Module, mode: str, gguf: Path | None = None) -> nn.Module:
    """Replace ``model``'s linear layers and output head in place by ``mode`` (``QUANTIZE_MODES``);
    returns the model. ``"none"`` leaves it as it is; ``"auto"`` is, on a CPU, the format measured
    fastest there (:func:`fastest_quantization`), and none elsewhere. Raises ValueError for a mode
    this device has no kernel for.

    ``int4`` with ``gguf`` (the file the model was converted from): every layer the file stores in
    Q4_K runs its own 4-bit levels (:mod:`specdec.gguf_weights`), every other one (stored at 5 to 8
    bits) int8 weight-only. Without it: 4 bits from the floats, the output head in int8 (in 4 bits
    it cost the most agreement with the float model)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "auto":
        # Elsewhere than on a CPU the int8 weights would be widened on every call.
        on_cpu = next(model.parameters()).device.type == "cpu"
        if on_cpu:
            mode, costs = fastest_quantization(model)
            log.info("quantize auto: %s, the fastest measured here (linear layers per step, mean of 1 and 4 rows: %s)",
                     mode, ", ".join(f"{m} {ms:.1f} ms" for m, ms in costs.items()))
        else:
            mode = "none"
    if mode == "none":
        return model
    # Collected first: replacing children while walking the module tree would skip some. A head tied
    # to the input embedding is replaced too; the embedding keeps its floating-point table.
    linears = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    if any(hasattr(module, "_specdec_kernel") for _, module in linears):
        raise ValueError("quantize the model before its linear layers are packed (specdec.kernels)")
    if mode == "w8a8" and next(model.parameters()).device.type != "cpu":
        raise ValueError("w8a8 runs on a CPU only (oneDNN's int8 product); use none or int8 on this device")
    head = model.get_output_embeddings()
    stored = read_q4k(gguf, [f"{name}.weight" for name, _ in linears]) if mode == "int4" and gguf else {}
    if mode == "w8a8":
        linears = _share_inputs(model, linears, lambda names, stacked: W8A8Linear.from_linear(stacked))
    elif mode == "int4":
        linears = _share_inputs(model, linears, functools.partial(_stacked_int4, stored, from_file=gguf is not None))
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        if mode == "int4":
            quantized = _int4_layer(module, stored.get(f"{name}.weight"), module is head, from_file=gguf is not None)
        else:
            quantized = (Int8Linear.from_linear(module) if mode == "int8"
                         else W8A8Linear.from_linear(module, keep_weight=module is head))
        setattr(model.get_submodule(parent_name), child, quantized)
    if stored:
        kept = sum(isinstance(m, Int4Linear) for m in model.modules())
        log.info("int4: %d of %d linear layers run their 4-bit levels from %s; the rest int8", kept, len(linears), gguf.name)
    return model


def _stacked_int4(stored: dict, names: list[str], stacked: nn.Linear, from_file: bool) -> nn.Module | None:
    """One int4 product over sibling layers (:data:`SHARED_INPUTS`) where every one of them is int4:
    all stored in Q4_K by the GGUF (their levels stacked), or all quantized from floats."""
    parts = [stored.get(f"{name}.weight") for name in names]
    if all(p is not None for p in parts):
        layer = _int4_layer(stacked, Q4KTensor(*(torch.cat([getattr(p, f) for p in parts]) for f in ("levels", "scales", "minimums"))),
                            head=False, from_file=True)
    elif not from_file:
        layer = _int4_layer(stacked, None, head=False, from_file=False)
    else:
        return None
    return layer if isinstance(layer, Int4Linear) else None


def _int4_layer(linear: nn.Linear, stored, head: bool, from_file: bool) -> nn.Module:
    """One layer of an int4 model: its Q4_K levels where the GGUF has them (and they are the float
    weight the model holds, as rounded to its dtype); int8 where the file keeps it at more bits, for
    the head, and where the input width is no multiple of a group; else 4 bits from the floats."""
    if stored is not None and torch.equal(stored.dequantized().to(linear.weight.dtype), linear.weight.detach()):
        return Int4Linear.from_q4k(stored, linear, keep_values=head)
    if from_file or head or linear.in_features % INT4_GROUP:
        return Int8Linear.from_linear(linear)
    return Int4Linear.from_linear(linear)
