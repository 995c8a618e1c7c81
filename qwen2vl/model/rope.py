"""Rotary embeddings: the ViT's 2D RoPE and the LLM's M-RoPE (REFERENCE §2.2-2.3 and §3.2).

Both rotate halves (x1, x2 the two halves of the head dimension); angles are computed in fp32.
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + cat(-x2, x1) * sin, written per half: the same roundings as the reference (negation
    is exact) with fewer full-size temporaries. Our cos/sin tables repeat their first half."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[..., : x1.shape[-1]], sin[..., : x1.shape[-1]]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def inv_freq(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, in fp32 (no buffer: nothing to re-create after meta loading)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


def vision_position_ids(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(h, w) patch coordinates [N, 2] in the order of the rows of pixel_values: 2x2 windows in raster order, the
    same for each frame pair. Grid (1, 4, 4): h = [0,0,1,1, 0,0,1,1, 2,2,3,3, ...], w = [0,1,0,1, 2,3,2,3, ...]."""
    out = []
    for t, h, w in grid_thw:
        hw = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)  # [h, w, 2]
        # (h/m, m, w/m, m) -> (h/m, w/m, m, m): one 2x2 window after another
        hw = hw.view(h // merge, merge, w // merge, merge, 2).transpose(1, 2).reshape(-1, 2)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def vision_cos_sin(
    grid_thw: list[tuple[int, int, int]], head_dim: int, theta: float, merge: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] in fp32: dims [0, hd/4) and [hd/2, 3hd/4) rotate by the row (h), the rest by w."""
    pos = vision_position_ids(grid_thw, merge).to(device)  # [N, 2]
    freqs = inv_freq(head_dim // 2, theta, device)  # [hd/4]
    angles = (pos[:, :, None].float() * freqs).flatten(1)  # [N, hd/2]: h angles then w angles
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def mrope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, section: tuple[int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, L, head_dim] for position ids [3, B, L]. Frequency j takes its angle from the t row for j < s0,
    the h row for j < s0+s1, else the w row (contiguous bands, not interleaved); repeated for the second half."""
    freqs = inv_freq(head_dim, theta, position_ids.device)  # [hd/2]
    angles = position_ids[..., None].float() * freqs  # [3, B, L, hd/2]
    bands = angles.split(list(section), dim=-1)
    angles = torch.cat([band[i] for i, band in enumerate(bands)], dim=-1)  # [B, L, hd/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)
