"""Shared test helpers: a random-init transformers reference model saved to disk, and prompts."""

from __future__ import annotations

import torch

import qwen2vl

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def hf_config(config: qwen2vl.Qwen2VLConfig):
    import transformers

    return transformers.Qwen2VLConfig(**config.to_dict())


def make_reference(config: qwen2vl.Qwen2VLConfig, path, seed: int = 0, attn: str = "eager"):
    """A random-init transformers Qwen2VLForConditionalGeneration, saved to ``path`` (hub layout)."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(config)
    cfg._attn_implementation = attn
    ref = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    # transformers' init leaves some norms at 1/0; perturb everything so that no mistake hides
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(path)
    return ref


def prompt(*parts, merge: int = 2):
    """Build (input_ids, image_grid_thw, video_grid_thw) from parts: ints are text tokens,
    ("image", t, h, w) / ("video", t, h, w) become <|vision_start|> + placeholders + <|vision_end|>."""
    ids, images, videos = [], [], []
    for p in parts:
        if isinstance(p, int):
            ids.append(p)
            continue
        kind, t, h, w = p
        n = t * h * w // merge**2
        ids += [VS] + [IMG if kind == "image" else VID] * n + [VE]
        (images if kind == "image" else videos).append([t, h, w])
    grid = lambda g: torch.tensor(g, dtype=torch.long) if g else None  # noqa: E731
    return ids, grid(images), grid(videos)


def pixels(grid: torch.Tensor | None, patch_dim: int, seed: int = 1):
    if grid is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == IMG).long() + 2 * (input_ids == VID).long()


def left_pad(rows: list[list[int]], pad: int = 151643):
    L = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def ref_logits(ref, ids, mask=None, pv=None, ig=None, pvv=None, vg=None):
    """transformers' logits for the same inputs as ``Qwen2VL.forward`` (it also wants mm_token_type_ids)."""
    with torch.no_grad():
        return ref(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pv,
            image_grid_thw=ig,
            pixel_values_videos=pvv,
            video_grid_thw=vg,
            mm_token_type_ids=mm_token_type_ids(ids),
        ).logits
