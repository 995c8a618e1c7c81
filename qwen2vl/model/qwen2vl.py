"""Qwen2-VL: the vision tower, the Qwen2 decoder with M-RoPE, and the LM head, on one device.

Takes the tensors transformers' processor produces; visual features replace the ``<|image_pad|>`` /
``<|video_pad|>`` embeddings in reading order. ``state_dict()`` is the hub layout. The network alone: no
checkpoint files, tokenizers or sampling (``qwen2vl.Qwen2VL`` in pretrained.py adds those).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from ..config import Qwen2VLConfig
from ..positions import PlaceholderError, mrope_positions
from .cache import KVCache, causal_padding_mask
from .packed import pack_linears
from .quant import Int8Linear, check_kind, quantize_linears
from .rope import mrope_cos_sin
from .text import RMSNorm, TextModel
from .vision import VisionTransformer


@dataclass(frozen=True)
class Media:
    """The patches and (t, h, w) grids of all images, and of all videos, of a batch; empty for text only."""

    pixel_values: torch.Tensor | None = None  # [patches, 1176]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    @classmethod
    def of(cls, inputs) -> Media:
        """The media tensors of a processor's output (a mapping that may hold other keys)."""
        return cls(**{f.name: inputs.get(f.name) for f in fields(cls)})

    def to(self, device: torch.device | str) -> Media:
        return Media(**{f.name: None if (x := getattr(self, f.name)) is None else x.to(device) for f in fields(self)})


class Qwen2VLModel(nn.Module):
    def __init__(self, config: Qwen2VLConfig, *, hf5_compat: bool = False):
        """``hf5_compat``: place text after long videos as transformers 5.x does (see positions.py)."""
        super().__init__()
        self.config = config
        self.hf5_compat = hf5_compat
        self.visual = VisionTransformer(config.vision)
        self.model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    @property
    def packed(self) -> bool:
        return not isinstance(self.lm_head, nn.Linear)

    @torch.no_grad()
    def quantize(self, kind: str = "int8") -> Qwen2VLModel:
        """The LLM's linear layers and the output head with int8 weights (model/quant.py): decoding reads about half
        of bf16's bytes. Inference only, like packing (which then packs what is left: the vision tower). A tied
        head gets its own int8 copy; the embedding table stays as it is, for lookups."""
        check_kind(kind)
        if not self.packed:
            quantize_linears(self.model)
            self.lm_head = Int8Linear(self.lm_head)
        return self

    @torch.no_grad()
    def pack_for_cpu(self) -> Qwen2VLModel:
        """Every Linear's weight reordered once into oneDNN's layout (model/packed.py): faster CPU inference, but
        no more training or saving. A no-op off the CPU or where oneDNN is missing."""
        if self.device.type == "cpu":  # what is plain nn.Linear still (after quantize: the vision tower)
            pack_linears(self)
        return self

    def tie_weights(self) -> None:
        """2B: the output projection is the embedding table. Call again after ``to_empty()``, which unties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Linear, Conv3d and Embedding weights ~ N(0, std) (transformers' initializer_range), biases 0, norms 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d, nn.Embedding)):
                m.weight.normal_(0.0, std)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- the pieces of a forward ---------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, media: Media | None = None) -> torch.Tensor:
        """Token embeddings [B, L, D] with the visual features scattered into their placeholders."""
        h = self.model.embed_tokens(input_ids)
        c, m = self.config, media or Media()
        for kind, token, pixels, grid in (
            ("image", c.image_token_id, m.pixel_values, m.image_grid_thw),
            ("video", c.video_token_id, m.pixel_values_videos, m.video_grid_thw),
        ):
            slots = input_ids == token
            n_slots = int(slots.sum())
            if pixels is None:
                if n_slots:
                    raise PlaceholderError(f"input_ids hold {n_slots} {kind} tokens but no {kind} pixels were given")
                continue
            if grid is None:
                raise ValueError(f"{kind} pixels were given without {kind}_grid_thw")
            feats = self.visual(pixels, grid)
            if feats.shape[0] != n_slots:
                raise PlaceholderError(
                    f"{kind} tokens and {kind} features do not match: input_ids hold {n_slots} {kind} tokens, "
                    f"{kind}_grid_thw {grid.tolist()} gives {feats.shape[0]} features"
                )
            h = h.masked_scatter(slots[..., None], feats.to(h.dtype))
        return h

    def positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """M-RoPE position ids [3, B, L] and each row's decode delta [B] (positions.py, with this config)."""
        c = self.config
        return mrope_positions(
            input_ids, image_grid_thw, video_grid_thw, attention_mask, image_token_id=c.image_token_id,
            video_token_id=c.video_token_id, spatial_merge_size=c.vision.spatial_merge_size, hf5_compat=self.hf5_compat,
        )  # fmt: skip

    def _cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.config.text
        return mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, dtype)

    # ---- public entry points ------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, L, V] for every position (no cache)."""
        return self.lm_head(
            self.hidden(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        )

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        seqlens: list[int] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, L, D] (no cache): training computes logits only where there are labels. A packed
        row (B = 1, train/packing.py) passes ``seqlens`` and each sample's own ``position_ids`` [3, 1, L]."""
        h = self.embed(input_ids, Media(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw))
        if position_ids is None:
            position_ids, _ = self.positions(input_ids, attention_mask, image_grid_thw, video_grid_thw)
        cos, sin = self._cos_sin(position_ids, h.dtype)
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = causal_padding_mask(attention_mask.bool(), 0) if padded else None
        return self.model(h, cos, sin, mask, seqlens=seqlens)

    def prefill(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        attention_mask: torch.Tensor | None = None,
        media: Media | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run a left-padded prompt into ``cache``, after what it holds (positions continue at each row's
        ``cache.next_position``); logits [B, V] of the last position."""
        B, L = input_ids.shape
        start = cache.length
        if start + L > cache.capacity:
            raise ValueError(f"the prompt needs {start + L} cache slots but the cache holds {cache.capacity}")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: attention_mask[:, -1] has a 0")
        media = media or Media()
        h = self.embed(input_ids, media)
        pos, deltas = self.positions(input_ids, attention_mask, media.image_grid_thw, media.video_grid_thw)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = pos + cache.next_position.view(1, B, 1) * real  # continue after earlier turns
        cos, sin = self._cos_sin(pos, h.dtype)

        cache.key_mask[:, start : start + L] = real
        cache.padded = cache.padded or not bool(real.all())
        h = self.model(h, cos, sin, cache.attention_mask(L), cache.layers, start)
        cache.length = start + L
        cache.next_position = cache.next_position + real.sum(-1) + deltas  # positions.py: real tokens + delta
        return self.lm_head(h[:, -1]), cache

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One step for tokens [B] at each row's next position; logits [B, V]."""
        start = cache.length
        if start + 1 > cache.capacity:
            raise ValueError(f"the KV cache is full ({cache.capacity} slots)")
        h = self.model.embed_tokens(tokens[:, None])
        pos = cache.next_position.view(1, -1, 1).expand(3, -1, 1)  # a text token: one id in all three rows
        cos, sin = self._cos_sin(pos, h.dtype)
        cache.key_mask[:, start] = True
        h = self.model(h, cos, sin, cache.attention_mask(1), cache.layers, start)
        cache.length = start + 1
        cache.next_position = cache.next_position + 1
        return self.lm_head(h[:, -1]), cache
