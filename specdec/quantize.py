"""Weight-only int8 for a draft model: its linear layers and output head keep one int8 byte per
weight and one scale per output channel, and multiply with torch's own packed kernel
(``torch.ops.aten._weight_int8pack_mm``), whose cost is mostly reading the weights.

Why a draft only: a draft need not be exact, the target decides every token, so a cheaper draft
can cost acceptance but never output. Which int8 method is cheapest per one-row forward here
(this one, ``torch.ao.quantization.quantize_dynamic`` or torchao's) has not been measured on a quiet
machine yet (README, "Quantized drafts"). Activations keep the model's dtype; the embedding table stays in floating point (a lookup reads one row, not the table).
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.config import QUANTIZE_MODES
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
        w = linear.weight.detach().float()
        # The largest magnitude in each row maps to 127; -128 stays unused so the range is symmetric.
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        weight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight.contiguous(), scales.to(linear.weight.dtype), bias)

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


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace ``model``'s linear layers and output head in place by ``mode`` (``QUANTIZE_MODES``);
    returns the model. ``"none"`` leaves it as it is; ``"auto"`` is int8 on a CPU."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "auto":
        # Where the packed int8 kernel runs, an int8 draft step cost 0.6 of a float32 one (0.5B
        # draft, 2 cores); elsewhere the weights would be widened on every call.
        mode = "int8" if next(model.parameters()).device.type == "cpu" else "none"
    if mode == "none":
        return model
    # Collected first: replacing children while walking the module tree would skip some. A head tied
    # to the input embedding is replaced too; the embedding keeps its floating-point table.
    linears = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    if any(hasattr(module, "_specdec_kernel") for _, module in linears):
        raise ValueError("quantize the model before its linear layers are packed (specdec.kernels)")
    for name, module in linears:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Int8Linear.from_linear(module))
    return model
