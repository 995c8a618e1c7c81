"""Packing: several samples in one row up to a token budget, each attending only to itself (in the LLM through
``seqlens``; the ViT already attends within each image and frame pair) and keeping its own M-RoPE positions.
The loss is summed over supervised tokens (times their weights, when the samples carry them), so that a window of
rows can be normalised by its total count (or weight).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from ..config import Qwen2VLConfig
from ..positions import mrope_positions
from .data import IGNORE, Sample


@dataclass
class PackedRow:
    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [3, 1, T]: each sample's own positions, from 0
    seqlens: list[int]  # tokens of each sample, in order
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # [1, T] per-token loss weights; None: 1 per supervised token

    def to(self, device: torch.device) -> PackedRow:
        """The tensors the model computes with on ``device``; the grids stay on the host (read as ints)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "seqlens" and "grid" not in f.name}
        return replace(self, **{k: v.to(device, non_blocking=True) for k, v in moved.items() if v is not None})

    @property
    def supervised(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def plan_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Group sample indices into rows of at most ``budget`` tokens, in order (first fit over the open rows, so
    that data order is roughly kept and resuming is deterministic). A longer sample is an error for the caller
    to count, not something to drop silently here.

    First fit is found in O(log rows) a sample, so that an epoch of a million samples plans in seconds: ``room``
    is a tournament tree whose leaves are the rows' free tokens (-1: no row yet) and whose inner nodes hold the
    largest free room below them; the first row that fits is found by walking down, left whenever the left fits."""
    size = 1
    while size < len(lengths):
        size *= 2
    room = [-1] * (2 * size)
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, over the row budget of {budget}")
        if room[1] >= n:
            k = 1
            while k < size:
                k = 2 * k if room[2 * k] >= n else 2 * k + 1
            rows[k - size].append(i)
            left = room[k] - n
        else:
            k = size + len(rows)
            rows.append([i])
            left = budget - n
        room[k] = left
        k //= 2
        while k and room[k] != (best := max(room[2 * k], room[2 * k + 1])):  # ancestors of an unchanged node
            room[k] = best                                                     # are unchanged too
            k //= 2
    return rows


def pack(samples: list[Sample], config: Qwen2VLConfig) -> PackedRow:
    """One row of these samples, in order."""
    options = {"image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
               "spatial_merge_size": config.vision.spatial_merge_size}
    positions = [mrope_positions(s.input_ids[None], s.image_grid_thw, s.video_grid_thw, **options)[0] for s in samples]

    def cat(key: str) -> torch.Tensor | None:
        parts = [s.patches(key) if key.startswith("pixel") else getattr(s, key) for s in samples
                 if getattr(s, key) is not None]  # fmt: skip
        return torch.cat(parts) if parts else None

    weighted = any(s.weights is not None for s in samples)
    return PackedRow(
        input_ids=torch.cat([s.input_ids for s in samples])[None],
        labels=torch.cat([s.labels for s in samples])[None],
        position_ids=torch.cat(positions, dim=-1),
        seqlens=[len(s) for s in samples],
        **{key: cat(key) for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")},
        weights=torch.cat([(s.labels != IGNORE).float() if s.weights is None else s.weights
                           for s in samples])[None] if weighted else None,
    )  # fmt: skip


def loss_sum(model, row: PackedRow) -> tuple[torch.Tensor, float]:
    """(sum of the cross-entropy over the row's supervised tokens, their number), or with ``row.weights`` (the
    weighted sum, the sum of the weights). Logits are computed only at the positions that predict a supervised
    token."""
    h = model.hidden(
        row.input_ids, None, row.pixel_values, row.image_grid_thw, row.pixel_values_videos, row.video_grid_thw,
        position_ids=row.position_ids, seqlens=row.seqlens if len(row.seqlens) > 1 else None,
    )  # fmt: skip
    targets = row.labels[0, 1:]
    keep = targets != IGNORE
    logits = model.lm_head(h[0, :-1][keep]).float()
    if row.weights is None:
        return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())
    w = row.weights[0, 1:][keep].float()
    return (F.cross_entropy(logits, targets[keep], reduction="none") * w).sum(), float(w.sum())
