"""Weight-only int8 linear layers, for CPU decoding.

Decoding a token reads every weight of the LLM once, so its time is about the weights' bytes over the memory
bandwidth; int8 weights (a byte each, and one scale per output row) read half of bf16's bytes. The product runs on
PyTorch's own kernel, ``aten._weight_int8pack_mm`` (activations in fp32, bf16 or fp16, the weight dequantised
inside the matmul): the kernel gpt-fast's int8 path and torchao's int8 weight-only layout call on the CPU, used
here directly so that no extra package is needed.

Quantisation is symmetric per output channel: ``scale = max|w| / 127`` over a row, ``w8 = round(w / scale)``, so
each weight is off by at most half a step of its row. Only the LLM is quantised (its decoder layers and the output
head: what decoding reads); the vision tower runs on many tokens at once, where int8 weights would save no time.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("int8",)  # quantize= values that are implemented; "int4" and "w8a8" are refused by name


class Int8Linear(nn.Module):
    """``nn.Linear`` for inference with int8 weights: ``y = x (w8 * scale)^T + b``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [out]
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)  # fp32; cast to the activations' dtype per call
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the layer computes with."""
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        # The kernel's fp32 path is a plain loop, several times slower than its bf16 one (4x on a 2-core EPYC for a
        # 1536 x 8960 decode step): fp32 activations go through it in bf16, whose rounding (2^-9 relative) is
        # below the weights' own (half a step of 1/127 of a row's largest).
        compute = torch.bfloat16 if dtype == torch.float32 and x.device.type == "cpu" else dtype
        x_MK = x.reshape(-1, self.in_features).to(compute)
        y = torch.ops.aten._weight_int8pack_mm(x_MK, self.weight_int8, self.scale.to(compute)).to(dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"quantize={kind!r} is not implemented yet; implemented: {', '.join(KINDS)} (or None)")


@torch.no_grad()
def quantize_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by an :class:`Int8Linear`; the number replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, Int8Linear(child))
            count += 1
        else:
            count += quantize_linears(child)
    return count
