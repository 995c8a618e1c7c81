"""The one place that picks attention kernels.

- ``varlen_attention``: the ViT's non-causal attention over packed segments (each image, each 2-frame slice of a
  video, attends only to itself). flash-attn's varlen kernel where installed (CUDA), else SDPA.
- ``causal_attention``: the LLM's, with GQA and an optional padding mask, or over one packed training row.

Never an N x N mask on the CPU: each run of equal-length segments is one batched SDPA call. On CUDA the launches,
not the arithmetic, would then set the step time of a row of many short segments, so up to ``MASKED_MAX_TOKENS``
tokens go through ONE SDPA call with a block-diagonal mask instead.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

try:  # optional, CUDA only
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

MASKED_MAX_TOKENS = 8192  # a [T, T] bool mask of 64 MiB at most


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA, except under the CPU's bf16 autocast, where it runs in fp32: the CPU's bf16 attention kernel (its
    backward above all) is slower than the fp32 one, and fp32 softmax is the more accurate anyway."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _one_masked_call(x: torch.Tensor, seqlens: list[int], runs: list) -> bool:
    return x.is_cuda and len(runs) > 1 and sum(seqlens) <= MASKED_MAX_TOKENS


def block_mask(seqlens: list[int], device: torch.device, causal: bool) -> torch.Tensor:
    """[T, T] bool, True = attend: each segment sees only itself (and, if causal, only its past)."""
    ids = torch.repeat_interleave(torch.arange(len(seqlens), device=device), torch.tensor(seqlens, device=device))
    mask = ids[:, None] == ids[None, :]
    return mask.tril() if causal else mask


def segment_runs(seqlens: list[int]) -> list[tuple[int, int, int]]:
    """Group consecutive equal lengths: [(offset, count, length), ...]."""
    groups = [(len(list(group)), n) for n, group in itertools.groupby(seqlens)]
    offsets = itertools.accumulate((count * n for count, n in groups), initial=0)
    return [(offset, count, n) for offset, (count, n) in zip(offsets, groups)]


def _block_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int], causal: bool):
    """q: [H, T, D]; k, v: [KVH, T, D]; each segment of ``seqlens`` attends only to itself.

    One SDPA call per run of equal-length segments, split off q, k, v, not sliced: under autograd a slice's
    backward fills a zero tensor of the whole row, once per run and input (10% of a training step with ~20 runs a
    row), a split's is one cat. Without autograd the outputs go into one preallocated tensor, so at most one run's
    output exists beside it (the ViT on large images).
    """
    runs = segment_runs(seqlens)
    if _one_masked_call(q, seqlens, runs):
        groups = q.shape[0] // k.shape[0]  # GQA by repetition: with a mask, SDPA's GQA may fall back
        k, v = (x.repeat_interleave(groups, dim=0) for x in (k, v))
        return _sdpa(q, k, v, attn_mask=block_mask(seqlens, q.device, causal))

    def attend(q, k, v, count, n):  # [H, count*n, D] -> [count, H, n, D] and back
        q, k, v = (x.unflatten(1, (count, n)).transpose(0, 1) for x in (q, k, v))
        return _sdpa(q, k, v, is_causal=causal, enable_gqa=True).transpose(0, 1).flatten(1, 2)

    sizes = [count * n for _, count, n in runs]
    parts = zip(runs, *(x.split(sizes, 1) for x in (q, k, v)))
    if torch.is_grad_enabled():
        return torch.cat([attend(q, k, v, count, n) for (_, count, n), q, k, v in parts], 1)
    out = None
    for (offset, count, n), q, k, v in parts:
        o = attend(q, k, v, count, n)
        if out is None:
            out = o.new_empty(o.shape[0], sum(sizes), o.shape[2])
        out[:, offset : offset + count * n] = o
    return out


def varlen_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Block-diagonal attention over packed tokens [T, heads, head_dim]; ``seqlens``: host ints summing to T."""
    if flash_attn_varlen_func is not None and q_THD.is_cuda and q_THD.dtype in (torch.float16, torch.bfloat16):
        cu = torch.tensor([0, *seqlens], device=q_THD.device).cumsum(0, dtype=torch.int32)
        m = max(seqlens)
        return flash_attn_varlen_func(q_THD, k_THD, v_THD, cu, cu, m, m, causal=False)
    q, k, v = (x.transpose(0, 1) for x in (q_THD, k_THD, v_THD))  # [H, T, D]
    return _block_diagonal(q, k, v, seqlens, causal=False).transpose(0, 1)


def causal_attention(
    q_BHLD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    mask_B1LS: torch.Tensor | None,
    seqlens: list[int] | None = None,
) -> torch.Tensor:
    """Causal GQA attention. q: [B, H, L, D]; k, v: [B, KVH, S, D] with S >= L (cached keys first). ``mask_B1LS``
    (bool, True = attend) holds causality and padding; None: the queries are the last L positions of an unpadded
    sequence. ``seqlens``: one packed training row (B = 1, no cache), each sequence attending to itself only."""
    L, S = q_BHLD.shape[2], k_BHSD.shape[2]
    if seqlens is not None:
        if q_BHLD.shape[0] != 1 or sum(seqlens) != L or S != L:
            raise ValueError(f"packed attention takes one row of {sum(seqlens)} tokens and no cache")
        return _block_diagonal(q_BHLD[0], k_BHSD[0], v_BHSD[0], seqlens, causal=True)[None]
    if mask_B1LS is None and L > 1:
        if L == S:
            return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, is_causal=True, enable_gqa=True)
        mask_B1LS = torch.ones(L, S, dtype=torch.bool, device=q_BHLD.device).tril(S - L)
    return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=mask_B1LS, enable_gqa=True)
