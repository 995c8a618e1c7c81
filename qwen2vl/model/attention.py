"""The one place that picks attention kernels.

- ``varlen_attention``: non-causal attention over packed sequences (the ViT: every image, and every
  2-frame slice of a video, attends only to itself). Never builds an N x N mask: runs of equal-length
  segments become one batched SDPA call (all slices of a video, or same-size images), other segments
  get their own call. On CUDA with flash-attn installed, one varlen kernel call does it all.
- ``causal_attention``: the LLM's attention, with GQA and an optional boolean mask for padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional, CUDA only
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def segment_runs(seqlens: list[int]) -> list[tuple[int, int, int]]:
    """Group consecutive equal lengths: [(offset, count, length), ...]."""
    runs: list[tuple[int, int, int]] = []
    offset = 0
    for n in seqlens:
        if runs and runs[-1][2] == n and runs[-1][0] + runs[-1][1] * n == offset:
            o, c, _ = runs[-1]
            runs[-1] = (o, c + 1, n)
        else:
            runs.append((offset, 1, n))
        offset += n
    return runs


def varlen_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Block-diagonal attention over packed tokens. q, k, v: [T, heads, head_dim] -> [T, heads, head_dim].

    ``seqlens`` are host ints (one per segment, summing to T), computed once per forward.
    """
    if flash_attn_varlen_func is not None and q_THD.is_cuda and q_THD.dtype in (torch.float16, torch.bfloat16):
        cu = torch.tensor([0, *seqlens], device=q_THD.device).cumsum(0, dtype=torch.int32)
        m = max(seqlens)
        return flash_attn_varlen_func(q_THD, k_THD, v_THD, cu, cu, m, m, causal=False)
    out = torch.empty_like(q_THD)
    for offset, count, n in segment_runs(seqlens):
        sl = slice(offset, offset + count * n)
        # [count*n, H, D] -> [count, H, n, D]
        q, k, v = (x[sl].unflatten(0, (count, n)).transpose(1, 2) for x in (q_THD, k_THD, v_THD))
        o = F.scaled_dot_product_attention(q, k, v)
        out[sl] = o.transpose(1, 2).flatten(0, 1)
    return out


def causal_attention(
    q_BHLD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    mask_B1LS: torch.Tensor | None,
    seqlens: list[int] | None = None,
) -> torch.Tensor:
    """Causal GQA attention. q: [B, H, L, D]; k, v: [B, KVH, S, D] with S >= L (cached keys first).

    ``mask_B1LS`` (bool, True = attend) already holds causality and padding; when it is None the
    queries are the last L positions of an unpadded sequence. ``seqlens``: one packed row (B = 1, no cache)
    of several sequences, each attending causally to itself only (training with packing).
    """
    if seqlens is not None:
        return _packed_causal(q_BHLD, k_BHSD, v_BHSD, seqlens)
    L, S = q_BHLD.shape[2], k_BHSD.shape[2]
    if mask_B1LS is None and L > 1:
        if L == S:
            return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, is_causal=True, enable_gqa=True)
        mask_B1LS = torch.ones(L, S, dtype=torch.bool, device=q_BHLD.device).tril(S - L)
    return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=mask_B1LS, enable_gqa=True)


def _packed_causal(q_1HLD: torch.Tensor, k_1HLD: torch.Tensor, v_1HLD: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Block-diagonal causal attention over one packed row, one SDPA call per run of equal-length sequences."""
    if q_1HLD.shape[0] != 1 or sum(seqlens) != q_1HLD.shape[2] or k_1HLD.shape[2] != q_1HLD.shape[2]:
        raise ValueError(f"packed attention takes one row of {sum(seqlens)} tokens and no cache")
    out = torch.empty_like(q_1HLD)
    for offset, count, n in segment_runs(seqlens):
        sl = slice(offset, offset + count * n)
        # [1, H, count*n, D] -> [count, H, n, D]
        q, k, v = (x[0, :, sl].unflatten(1, (count, n)).transpose(0, 1) for x in (q_1HLD, k_1HLD, v_1HLD))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out[0, :, sl] = o.transpose(0, 1).flatten(1, 2)
    return out
