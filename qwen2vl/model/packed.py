"""CPU inference with the linear layers' weights in oneDNN's blocked layout.

Reordered once into that layout (what torch.compile's CPU "freezing" does), the products ``F.linear`` would run
through MKL on the weight as stored run faster, most for the few rows of decoding (bench/linear_speed.py); results
differ by float rounding only. The packed copy replaces the dense weight (a tied head's embedding keeps its own),
so memory stays the same and a packed model can no longer be trained or saved.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can pack weights of ``dtype`` on this CPU (its bf16 path needs AVX-512 or AVX-NE-CONVERT:
    on an AVX2-only CPU a bf16 model stays unpacked)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 16, dtype=dtype), w, None, "none", [], "")
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """``nn.Linear`` for CPU inference: ``y = x W^T + b`` with W in oneDNN's layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # a plain attribute, not a parameter or buffer: an opaque oneDNN tensor that state_dict cannot hold
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def pack_linears(module: nn.Module) -> int:
    """Replace every CPU ``nn.Linear`` under ``module`` by a :class:`PackedLinear`; the number replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and child.weight.device.type == "cpu" and available(child.weight.dtype):
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
