"""The one place that picks attention kernels.

- ``varlen_attention``: non-causal attention over packed sequences (the ViT: every image, and every
  2-frame slice of a video, attends only to itself). Never builds an N x N mask: runs of equal-length
  segments become one batched SDPA call (all slices of a video, or same-size images), other segments
  get their own call. On CUDA with flash-attn installed, one varlen kernel call does it all.
- ``causal_attention``: the LLM's attention, with GQA and an optional boolean mask for padding, or over one
  packed training row (each sequence causal within itself), again one call per run of equal lengths.

On CUDA without flash-attn, a packed row of many short segments would cost a kernel launch chain per run, and the
launches, not the arithmetic, would set the step time. There, up to ``MASKED_MAX_TOKENS`` tokens go through ONE
SDPA call with a block-diagonal mask instead. The CPU keeps the per-run calls (the arithmetic dominates).
"""

from __future__ import annotations

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


def _per_run(qkv: tuple[torch.Tensor, ...], runs: list[tuple[int, int, int]], dim: int, attend) -> torch.Tensor:
    """``attend(q, k, v, count, n)`` on each run of ``count`` segments of length ``n``, the runs split off q, k, v
    along ``dim`` and their outputs joined along it. Split, not sliced: under autograd a slice's backward fills a
    zero tensor of the whole row, once per run and per input (with ~20 runs a row, 10% of a training step here),
    where a split's backward is one cat. Without autograd the outputs go into one preallocated tensor, so no more
    than one run's output exists beside it (the ViT on large images at inference)."""
    sizes = [count * n for _, count, n in runs]
    parts = zip(runs, *(x.split(sizes, dim) for x in qkv))
    if torch.is_grad_enabled():
        return torch.cat([attend(q, k, v, count, n) for (_, count, n), q, k, v in parts], dim)
    out = None
    for (offset, count, n), q, k, v in parts:
        o = attend(q, k, v, count, n)
        if out is None:
            out = o.new_empty(o.shape[:dim] + (sum(sizes),) + o.shape[dim + 1 :])
        out.narrow(dim, offset, count * n).copy_(o)
    return out


def _one_masked_call(x: torch.Tensor, seqlens: list[int], runs: list) -> bool:
    return x.is_cuda and len(runs) > 1 and sum(seqlens) <= MASKED_MAX_TOKENS


def block_mask(seqlens: list[int], device: torch.device, causal: bool) -> torch.Tensor:
    """[T, T] bool, True = attend: each segment sees only itself (and, if causal, only its past)."""
    ids = torch.repeat_interleave(torch.arange(len(seqlens), device=device), torch.tensor(seqlens, device=device))
    mask = ids[:, None] == ids[None, :]
    return mask.tril() if causal else mask


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
    runs = segment_runs(seqlens)
    if _one_masked_call(q_THD, seqlens, runs):
        q, k, v = (x.transpose(0, 1) for x in (q_THD, k_THD, v_THD))  # [H, T, D]
        o = _sdpa(q, k, v, attn_mask=block_mask(seqlens, q.device, causal=False))
        return o.transpose(0, 1)

    def attend(q, k, v, count, n):  # [count*n, H, D] -> [count, H, n, D] and back
        q, k, v = (x.unflatten(0, (count, n)).transpose(1, 2) for x in (q, k, v))
        return _sdpa(q, k, v).transpose(1, 2).flatten(0, 1)

    return _per_run((q_THD, k_THD, v_THD), runs, 0, attend)


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


def _packed_causal(
    q_1HLD: torch.Tensor, k_1HLD: torch.Tensor, v_1HLD: torch.Tensor, seqlens: list[int]
) -> torch.Tensor:
    """Block-diagonal causal attention over one packed row, one SDPA call per run of equal-length sequences."""
    if q_1HLD.shape[0] != 1 or sum(seqlens) != q_1HLD.shape[2] or k_1HLD.shape[2] != q_1HLD.shape[2]:
        raise ValueError(f"packed attention takes one row of {sum(seqlens)} tokens and no cache")
    runs = segment_runs(seqlens)
    if _one_masked_call(q_1HLD, seqlens, runs):
        groups = q_1HLD.shape[1] // k_1HLD.shape[1]  # GQA by repetition: with a mask, SDPA's GQA may fall back
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k_1HLD, v_1HLD))
        mask = block_mask(seqlens, q_1HLD.device, causal=True)
        return F.scaled_dot_product_attention(q_1HLD, k, v, attn_mask=mask)

    def attend(q, k, v, count, n):  # [H, count*n, D] -> [count, H, n, D] and back
        q, k, v = (x.unflatten(1, (count, n)).transpose(0, 1) for x in (q, k, v))
        return _sdpa(q, k, v, is_causal=True, enable_gqa=True).transpose(0, 1).flatten(1, 2)

    return _per_run((q_1HLD[0], k_1HLD[0], v_1HLD[0]), runs, 1, attend)[None]
