"""Next-token choice from logits, in transformers' processor order: repetition penalty, temperature, top-k, top-p,
then argmax or a draw. Every value ``SamplingParams`` accepts is numerically safe: logits are fp32 with nan and inf
made finite, the temperature divides logits shifted to a maximum of 0 (so a tiny one never gives inf/inf), and
top-k / top-p always keep at least one token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling; got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.repetition_penalty is not None and not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be > 0 and finite; got {self.repetition_penalty}")
        if self.do_sample and not self.temperature < math.inf:
            raise ValueError(f"temperature must be finite; got {self.temperature}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits; got {self.seed}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive and multiply negative logits of the tokens ``seen`` ([B, V] bool) so far (CTRL paper)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
    drop_sorted[..., -1] = False
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def choose(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Token ids [B] from last-position logits [B, V]."""
    logits = _finite(logits.float())
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0 and seen is not None:
        logits = _finite(apply_repetition_penalty(logits, seen, params.repetition_penalty))
    if not params.do_sample:
        return logits.argmax(dim=-1)
    # max 0, so no inf - inf; a temperature below fp32's smallest normal would round to 0 (0 / 0)
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """nan -> the lowest value, +-inf -> the largest finite ones: a model's overflow never reaches the draw."""
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)


def sampling_state(params: SamplingParams, input_ids: torch.Tensor, vocab_size: int, device: torch.device | str):
    """What ``choose`` carries between steps: the [B, V] table of the ids seen (for the repetition penalty; as in
    transformers, every id of the prompt counts, pads too) and the seeded generator; each None when unused."""
    seen = None
    if params.repetition_penalty is not None:
        seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.to(device), True)
    seeded = params.do_sample and params.seed is not None
    return seen, torch.Generator(device=device).manual_seed(params.seed) if seeded else None


def openai_params(
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
) -> SamplingParams:
    """OpenAI's conventions: temperature 0 or None is greedy (top_p/top_k then do nothing); > 0 samples."""
    sample = temperature is not None and temperature > 0
    return SamplingParams(
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_k=top_k if sample and top_k not in (None, 0, -1) else None,  # vLLM's "off" values 0 / -1
        top_p=top_p if sample else None,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
