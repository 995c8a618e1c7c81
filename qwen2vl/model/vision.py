"""The vision tower: patch embedding, 32 pre-norm ViT blocks with 2D RoPE, and the 2x2 patch merger.

Naive dynamic resolution (paper §2.1): the patches of a batch's images and videos arrive packed as ``[T, 1176]``
with a ``grid_thw`` row (t, h, w) per item; attention stays inside each 2-frame slice of an item. Follows
transformers' ``Qwen2VisionTransformerPretrainedModel`` (REFERENCE §2). Suffixes: T patch tokens, D width, H heads,
K head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .attention import varlen_attention
from .rope import apply_rotary, vision_cos_sin


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        # Kept as a Conv3d for the checkpoint's key and shape; a conv whose kernel equals its stride
        # is one matmul over flattened patches, which is how it runs (REFERENCE §9.7: conv3d is slow).
        self.proj = nn.Conv3d(c.in_channels, c.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, patches_TP: torch.Tensor) -> torch.Tensor:
        return F.linear(patches_TP.to(self.proj.weight.dtype), self.proj.weight.flatten(1))


# Inference runs a block's token-wise parts (projections, rotary, MLP) over chunks of this many patches, so that
# large images never hold a [T, 4 * width] intermediate at once; training runs them whole (autograd keeps them).
TOKEN_CHUNK = 4096


def rowwise(fn, *xs: torch.Tensor):
    """fn applied to row chunks of xs (all [T, ...]), outputs written into preallocated [T, ...] tensors."""
    T = xs[0].shape[0]
    if T <= TOKEN_CHUNK or torch.is_grad_enabled():
        return fn(*xs)
    outs = None
    for s in range(0, T, TOKEN_CHUNK):
        r = fn(*(x[s : s + TOKEN_CHUNK] for x in xs))
        parts = r if isinstance(r, tuple) else (r,)
        if outs is None:
            outs = tuple(p.new_empty((T, *p.shape[1:])) for p in parts)
        for o, p in zip(outs, parts):
            o[s : s + p.shape[0]] = p
    return outs if isinstance(r, tuple) else outs[0]


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.embed_dim, 3 * c.embed_dim, bias=True)
        self.proj = nn.Linear(c.embed_dim, c.embed_dim, bias=True)

    def project(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k (rotated), v: [T, H, K] each. Token-wise, so it can run in chunks."""
        qkv = self.qkv(x_TD).unflatten(-1, (3, self.num_heads, -1))  # q | k | v, heads contiguous
        # rotate in fp32 as the reference does, then back to the model dtype
        q, k = (apply_rotary(qkv[:, i].float(), cos, sin).to(x_TD.dtype) for i in (0, 1))
        return q, k, qkv[:, 2]

    def forward(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        q, k, v = rowwise(self.project, x_TD, cos, sin)
        return self.proj(varlen_attention(q, k, v, seqlens).flatten(1))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x). Without autograd it works in place: one [T, 4 * width] temporary, not three."""
    if torch.is_grad_enabled():
        return x * torch.sigmoid(1.702 * x)
    return x.mul_(torch.mul(x, 1.702).sigmoid_())


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.embed_dim, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x_TD = x_TD + self.attn(self.norm1(x_TD), cos, sin, seqlens)
        return rowwise(self.mlp_residual, x_TD)

    def mlp_residual(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD + self.mlp(self.norm2(x_TD))


class PatchMerger(nn.Module):
    """LayerNorm, then each 2x2 window (4 consecutive tokens) concatenated and mapped to the LLM width."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.ln_q = nn.LayerNorm(c.embed_dim, eps=1e-6)
        # index 1 of the checkpoint's Sequential is the parameter-free GELU (exact erf form)
        self.mlp = nn.Sequential(nn.Linear(c.merge_dim, c.merge_dim), nn.GELU(), nn.Linear(c.merge_dim, c.hidden_size))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x_TD).view(-1, self.mlp[0].in_features))  # [T/4, D_llm]


class VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list) -> torch.Tensor:
        """pixel_values [T, 1176] (the processor's layout), grid_thw [n, 3] -> features [T/4, D_llm]."""
        c = self.config
        grid = check_grid(grid_thw, c.spatial_merge_size)
        shape = (sum(t * h * w for t, h, w in grid), c.patch_dim)
        if pixel_values.shape != shape:
            raise ValueError(f"pixel values have shape {tuple(pixel_values.shape)} but grid_thw {grid} needs {shape}")
        x_TD = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(grid, c.head_dim, c.rope_theta, c.spatial_merge_size, x_TD.device)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        seqlens = [h * w for t, h, w in grid for _ in range(t)]  # one segment per 2-frame slice
        for block in self.blocks:
            x_TD = block(x_TD, cos, sin, seqlens)
        return self.merger(x_TD)


def check_grid(grid_thw: torch.Tensor | list, merge: int) -> list[tuple[int, int, int]]:
    """grid_thw as host ints, validated once per forward."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
    grid = [tuple(int(x) for x in row) for row in rows]
    for row in grid:
        if len(row) != 3 or row[0] < 1 or any(n < merge or n % merge for n in row[1:]):
            raise ValueError(f"grid_thw row {list(row)} is not (t, h, w): t >= 1, h, w positive multiples of {merge}")
    return grid
