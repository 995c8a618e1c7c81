"""M-RoPE position ids: pure functions on the host, no state (paper §2.1, REFERENCE §3.3-3.4).

Rows are (temporal, height, width). Text tokens take the same id in all three rows, one more per
token. A visual block of grid (t, h, w) after the 2x2 merge (h' = h/2, w' = w/2) covers t*h'*w'
placeholder tokens with ids ``start + (ti, hi, wi)``; the next token then starts at the previous
maximum + 1, i.e. ``start + max(t, h', w')`` (the paper's rule).

``hf5_compat=True`` reproduces transformers 5.x, which advances by ``max(h', w')`` and ignores t: it
differs only for videos with more temporal patches than max(h', w') (REFERENCE §3.3).

Deltas follow transformers 5.x: ``delta = max position + 1 - number of real tokens``, so the next
token of a row is at ``n_real + delta`` whatever its left padding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class PlaceholderError(ValueError):
    """input_ids and the grids disagree on how many visual tokens there are."""


def mrope_positions(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    spatial_merge_size: int = 2,
    hf5_compat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [3, B, L] (padding slots hold 0) and deltas [B] for a batch of prompts.

    Grids are consumed in order across the whole batch: image rows by the image placeholders in
    reading order, video rows likewise. Each visual block must be one unbroken run of its token.
    """
    B, L = input_ids.shape
    ids_cpu = input_ids.cpu()
    mask_cpu = None if attention_mask is None else attention_mask.cpu().bool()
    grids = {
        image_token_id: _grid_iter(image_grid_thw),
        video_token_id: _grid_iter(video_grid_thw),
    }
    positions = torch.zeros(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        ids = ids_cpu[b] if mask_cpu is None else ids_cpu[b][mask_cpu[b]]
        pos = _row_positions(ids, grids, image_token_id, video_token_id, spatial_merge_size, hf5_compat)
        if mask_cpu is None:
            positions[:, b] = pos
        else:
            positions[:, b, mask_cpu[b]] = pos
        deltas[b] = (int(pos.max()) + 1 if pos.numel() else 0) - len(ids)
    for token, it in grids.items():
        left = sum(1 for _ in it)
        if left:
            kind = "image" if token == image_token_id else "video"
            raise PlaceholderError(f"{kind}_grid_thw has {left} more row(s) than the {kind} blocks in input_ids")
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def next_positions(attention_mask: torch.Tensor | None, deltas: torch.Tensor, length: int) -> torch.Tensor:
    """Position [B] of the token that follows a prompt of ``length`` slots: real tokens + delta."""
    n_real = attention_mask.sum(-1) if attention_mask is not None else torch.full_like(deltas, length)
    return n_real.to(deltas.device) + deltas


def decode_positions(next_position: torch.Tensor) -> torch.Tensor:
    """Position ids [3, B, 1] of one decoded token per row: a text token, so the same id in all three rows."""
    return next_position.view(1, -1, 1).expand(3, -1, 1)


def _grid_iter(grid_thw: torch.Tensor | None) -> Iterator[tuple[int, int, int]]:
    rows = [] if grid_thw is None else grid_thw.tolist()
    for row in rows:
        yield tuple(int(x) for x in row)  # type: ignore[misc]


def _row_positions(
    ids: torch.Tensor,
    grids: dict[int, Iterator[tuple[int, int, int]]],
    image_token_id: int,
    video_token_id: int,
    merge: int,
    hf5_compat: bool,
) -> torch.Tensor:
    """Positions [3, n] for the real tokens of one sequence."""
    is_visual = (ids == image_token_id) | (ids == video_token_id)
    starts = torch.nonzero(is_visual).flatten().tolist()
    chunks: list[torch.Tensor] = []
    cursor = 0  # index into ids
    nxt = 0  # next position id
    j = 0
    counts = {image_token_id: 0, video_token_id: 0}
    while j < len(starts):
        s = starts[j]
        if s > cursor:  # text before this block
            chunks.append(torch.arange(nxt, nxt + s - cursor).expand(3, -1))
            nxt += s - cursor
        token = int(ids[s])
        kind = "image" if token == image_token_id else "video"
        counts[token] += 1
        try:
            t, h, w = next(grids[token])
        except StopIteration:
            raise PlaceholderError(
                f"input_ids hold more {kind} blocks than {kind}_grid_thw rows ({counts[token] - 1})"
            ) from None
        h, w = h // merge, w // merge
        n = t * h * w
        block = ids[s : s + n]
        if len(block) < n or not bool((block == token).all()):
            found = int((block == token).long().cumprod(0).sum())
            raise PlaceholderError(
                f"{kind} {counts[token]} (grid {[t, h * merge, w * merge]}) needs {n} consecutive "
                f"{kind} tokens but input_ids have {found} there"
            )
        tt = torch.arange(t).view(t, 1, 1).expand(t, h, w).flatten()
        hh = torch.arange(h).view(1, h, 1).expand(t, h, w).flatten()
        ww = torch.arange(w).view(1, 1, w).expand(t, h, w).flatten()
        chunks.append(torch.stack([tt, hh, ww]) + nxt)
        nxt += max(h, w) if (hf5_compat and token == video_token_id) else max(t, h, w)
        cursor = s + n
        j += n
    if cursor < len(ids):
        chunks.append(torch.arange(nxt, nxt + len(ids) - cursor).expand(3, -1))
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(chunks, dim=1)
