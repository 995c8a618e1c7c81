"""M-RoPE position ids: pure functions on the host, no state (paper §2.1, REFERENCE §3.3-3.4).

Rows are (temporal, height, width); a text token has the same id in all three, one more per token. A visual
block of merged grid (t, h', w') has ids ``start + (ti, hi, wi)``, and the next token starts at
``start + max(t, h', w')`` (the paper's rule). ``hf5_compat=True`` advances by ``max(h', w')`` as transformers
5.x does: different only for videos with more temporal patches than max(h', w') (REFERENCE §3.3).

``delta = max position + 1 - number of real tokens`` (as transformers 5.x), so the next token of a row is at
``n_real + delta`` whatever its left padding.
"""

from __future__ import annotations

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
    """Position ids [3, B, L] (padding slots hold 0) and deltas [B]. Grid rows are consumed in reading order
    across the whole batch; each visual block must be one unbroken run of its token."""
    B, L = input_ids.shape
    ids_cpu = input_ids.cpu()
    real = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    grids = {  # token -> (kind, its grid rows)
        image_token_id: ("image", iter([] if image_grid_thw is None else image_grid_thw.tolist())),
        video_token_id: ("video", iter([] if video_grid_thw is None else video_grid_thw.tolist())),
    }
    positions = torch.zeros(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        ids = ids_cpu[b][real[b]]
        pos = _row_positions(ids, grids, spatial_merge_size, hf5_compat)
        positions[:, b, real[b]] = pos
        deltas[b] = (int(pos.max()) + 1 if pos.numel() else 0) - len(ids)
    for kind, rows in grids.values():
        if left := len(list(rows)):
            raise PlaceholderError(f"{kind}_grid_thw has {left} more row(s) than the {kind} blocks in input_ids")
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def _row_positions(ids: torch.Tensor, grids: dict, merge: int, hf5_compat: bool) -> torch.Tensor:
    """Positions [3, n] for the real tokens ``ids`` of one sequence; ``grids`` as built by mrope_positions."""
    starts = torch.nonzero(torch.isin(ids, torch.tensor(list(grids)))).flatten().tolist()
    chunks: list[torch.Tensor] = []
    cursor = 0  # index into ids
    nxt = 0  # next position id
    counts = dict.fromkeys(grids, 0)
    for s in starts:
        if s < cursor:  # inside the block just placed
            continue
        chunks.append(torch.arange(nxt, nxt + s - cursor).expand(3, -1))  # the text before this block
        nxt += s - cursor
        token = int(ids[s])
        kind, rows = grids[token]
        counts[token] += 1
        try:
            t, h, w = next(rows)
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
        thw = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        chunks.append(torch.stack(thw).flatten(1) + nxt)
        nxt += max(h, w) if (hf5_compat and kind == "video") else max(t, h, w)
        cursor = s + n
    chunks.append(torch.arange(nxt, nxt + len(ids) - cursor).expand(3, -1))  # the text after the last block
    return torch.cat(chunks, dim=1)
