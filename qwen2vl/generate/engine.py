"""Generation: token ids in, token ids out. ``stream`` is a generator of one token per row per step;
``generate`` collects it. Streaming text, servers and chat build on ``stream``."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.cache import KVCache
from ..model.qwen2vl import Media, Qwen2VLModel
from .sampling import SamplingParams, choose, sampling_state


@torch.inference_mode()
def stream(
    model: Qwen2VLModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    media: Media | None = None,
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_token_ids: tuple[int, ...] | list[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], once per step. A row that has produced an eos id
    yields the pad id from then on; the stream ends when every row is done or after max_new_tokens."""
    if max_new_tokens < 1:
        return
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1; got {tuple(input_ids.shape)}")
    cfg = model.config
    B, L = input_ids.shape
    device = model.device
    eos = torch.tensor(list(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids), device=device)

    cache = KVCache.allocate(cfg.text, B, L + max_new_tokens, model.dtype, device)
    mask = None if attention_mask is None else attention_mask.to(device)
    logits, cache = model.prefill(input_ids.to(device), cache, mask, (media or Media()).to(device))
    seen, generator = sampling_state(params, input_ids, logits.shape[-1], device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = choose(logits, params, seen, generator).masked_fill(finished, cfg.pad_token_id)
        yield token
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits, cache = model.decode(token, cache)


def generate(model: Qwen2VLModel, input_ids: torch.Tensor, *, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """All new tokens [B, max_new_tokens]; positions after a row's end hold the pad id."""
    out = torch.full((input_ids.shape[0], max_new_tokens), model.config.pad_token_id, dtype=torch.long)
    for step, token in enumerate(stream(model, input_ids, max_new_tokens=max_new_tokens, **kwargs)):
        out[:, step] = token.cpu()
    return out
