"""Attention over packed segments (model/attention.py): the ViT's per-image blocks and a packed LLM row's
samples each attend only to themselves; the one masked call the GPU takes equals the per-run calls; the CPU's bf16
autocast attends in fp32."""

import torch

from qwen2vl.model import attention
from qwen2vl.model.attention import segment_runs


def test_attention_segments():
    # grid [[1,4,6],[3,4,4]] -> cu_seqlens [0,24,40,56,72]; a video with t = 3 is 3 separate segments
    seqlens = [h * w for t, h, w in [(1, 4, 6), (3, 4, 4)] for _ in range(t)]
    assert [0, *torch.tensor(seqlens).cumsum(0).tolist()] == [0, 24, 40, 56, 72]
    assert segment_runs(seqlens) == [(0, 1, 24), (24, 3, 16)]


def test_one_masked_call_equals_the_calls_per_run(monkeypatch):
    """The GPU's single block-diagonal SDPA call (attention.py) gives what the per-run calls give, values and
    gradients, for the ViT (non-causal) and a packed LLM row (causal, GQA). Forced here on the CPU."""
    seqlens = [24, 16, 16, 16, 5, 30, 30, 1]  # runs of equal lengths and singles, one of a single token
    g = torch.Generator().manual_seed(0)
    T = sum(seqlens)
    vit = [torch.randn(T, 4, 8, generator=g, requires_grad=True) for _ in range(3)]  # [T, heads, D]
    llm = [torch.randn(1, h, T, 8, generator=g, requires_grad=True) for h in (4, 2, 2)]  # GQA: 4 query heads, 2 kv

    def both(fn, inputs):
        results = []
        for forced in (False, True):
            monkeypatch.setattr(attention, "_one_masked_call", lambda x, s, r, forced=forced: forced)
            out = fn(*inputs)
            grads = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape).sin()).sum(), inputs)
            results.append((out, grads))
        return results

    for fn, inputs in ((lambda q, k, v: attention.varlen_attention(q, k, v, seqlens), vit),
                       (lambda q, k, v: attention.causal_attention(q, k, v, None, seqlens), llm)):  # fmt: skip
        (o1, g1), (o2, g2) = both(fn, inputs)
        assert (o1 - o2).abs().max() < 1e-5
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(g1, g2))
    assert attention.block_mask([2, 1], torch.device("cpu"), causal=True).tolist() == [
        [True, False, False], [True, True, False], [False, False, True]]  # fmt: skip


def test_cpu_bf16_autocast_attends_in_fp32():
    """Under the CPU's bf16 autocast (``qwen2vl train --dtype bfloat16``) the per-run attention runs in fp32 (the
    CPU's bf16 kernel is the slower one): exactly what fp32 attention gives on the same inputs."""
    seqlens = [24, 16, 16, 5, 30]
    g = torch.Generator().manual_seed(0)
    T = sum(seqlens)
    vit = [torch.randn(T, 4, 8, generator=g).bfloat16() for _ in range(3)]
    llm = [torch.randn(1, h, T, 8, generator=g).bfloat16() for h in (4, 2, 2)]
    for fn, inputs in ((lambda q, k, v: attention.varlen_attention(q, k, v, seqlens), vit),
                       (lambda q, k, v: attention.causal_attention(q, k, v, None, seqlens), llm)):  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*inputs)
        assert out.dtype == torch.float32 and torch.equal(out, fn(*(x.float() for x in inputs)))
