"""``qwen2vl.Qwen2VL``: the network (model/qwen2vl.py) plus loading, saving and generating, each a thin call into
the room that owns it (weights.py, generate/engine.py), so that the model itself imports neither."""

from __future__ import annotations

from pathlib import Path

import torch

from .generate.engine import generate
from .generate.sampling import SamplingParams
from .model.qwen2vl import Media, Qwen2VLModel
from .weights import load_pretrained, save_pretrained


class Qwen2VL(Qwen2VLModel):
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, *, hf5_compat: bool = False) -> Qwen2VL:
        """Load a local checkpoint directory (hub layout or transformers >= 4.52 layout), strictly."""
        return load_pretrained(cls, path, dtype=dtype, device=device, hf5_compat=hf5_compat)

    def save_pretrained(self, path: str | Path, max_shard_size: int = 5 * 2**30) -> None:
        """Write config.json, generation_config.json and safetensors in the hub layout, atomically."""
        if self.packed:
            raise ValueError("this model was packed for CPU inference or quantized (pack_for_cpu, quantize); load "
                             "it again to save it")  # fmt: skip
        save_pretrained(self, path, max_shard_size=max_shard_size)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_ids: tuple[int, ...] | list[int] | None = None,
    ) -> torch.Tensor:
        """New token ids [B, max_new_tokens]; a row that stopped on an eos id is filled with the pad id
        after it. ``eos_token_ids`` defaults to the checkpoint's (generation_config.json)."""
        return generate(
            self, input_ids, attention_mask=attention_mask,
            media=Media(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw),
            max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
            params=SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed),
        )  # fmt: skip
