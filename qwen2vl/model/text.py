"""The Qwen2 decoder with M-RoPE: GQA with q/k/v bias, RMSNorm, SwiGLU (REFERENCE §3.1-3.2).

Module and parameter names equal the checkpoint's (``model.layers.N.self_attn.q_proj`` ...). The KV cache is
passed in (model/cache.py); nothing is kept on the modules between calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .attention import causal_attention
from .rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back, then scale: the reference's order, which matters in bf16
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x_BLD, cos, sin, mask, kv, start, seqlens=None):  # types as in TextModel.forward
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, L, K]
        k = self.k_proj(x_BLD).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # [B, KVH, L, K]
        v = self.v_proj(x_BLD).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:  # write into the preallocated cache, attend over everything so far
            for cache, new in zip(kv, (k, v)):
                cache[:, :, start : start + L] = new
            k, v = (cache[:, :, : start + L] for cache in kv)
        out = causal_attention(q, k, v, mask, seqlens)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h, cos, sin, mask, kv, start, seqlens=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, kv, start, seqlens)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(
        self,
        h_BLD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        start: int = 0,
        seqlens: list[int] | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm; ``seqlens``: one row packing several sequences (causal_attention)."""
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(self.layers):
            h_BLD = layer(h_BLD, cos, sin, mask, None if kv_cache is None else kv_cache[i], start, seqlens)
        return self.norm(h_BLD)
