"""Messages -> model inputs: render the chat template, load and patchify each image and video, tokenize, expand
each placeholder to its token count, left-pad the batch (REFERENCE §4-6; transformers' ``Qwen2VLProcessor``).

Media options (``IMAGE_KEYS``, ``VIDEO_KEYS``: qwen-vl-utils' names) are given per call
(``processor(messages, max_pixels=...)``) or per content part, which wins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import image as img
from .chat import OFFICIAL_TEMPLATE, ChatTemplate, check_messages, media_parts, media_source
from .errors import MediaError, describe
from .sources import TRUST_LOCAL, MediaAccess
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .video_cache import VideoCache

IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_KEYS = IMAGE_KEYS + ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end", "total_pixels")


@dataclass
class MediaInfo:
    """What one image or video became: the numbers behind "why is my image so many tokens"."""

    kind: str  # "image" | "video"
    index: int  # position among the batch's items of this kind
    conversation: int
    source: str
    original_size: tuple[int, int]  # (height, width) as loaded
    size: tuple[int, int]  # (height, width) fed to the model
    grid: tuple[int, int, int]  # (t, gh, gw) in 14x14 patches
    tokens: int  # LLM tokens (placeholders), without <|vision_start|>/<|vision_end|>
    frames: int = 1  # frames fed to the model
    frame_indices: list[int] = field(default_factory=list)  # source frames sampled (video)
    sample_fps: float | None = None


class BatchInputs(dict):
    """The model inputs (``input_ids``, ``attention_mask``, ``pixel_values``/``image_grid_thw`` and
    ``pixel_values_videos``/``video_grid_thw`` when used), ``.media`` (a MediaInfo per item), ``.texts`` (prompts)."""

    media: list[MediaInfo]
    texts: list[str]


@dataclass
class MediaLoader:
    """How images and videos become patches: the checkpoint's preprocessor settings, default video options, and
    which sources are allowed. Needs no tokenizer, so that token counts can be computed without a model."""

    min_pixels: int = img.IMAGE_MIN_PIXELS
    max_pixels: int = img.IMAGE_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = img.CLIP_MEAN
    image_std: tuple[float, ...] = img.CLIP_STD
    video_options: dict = field(default_factory=dict)
    access: MediaAccess = TRUST_LOCAL  # which sources are allowed: local files, URLs (with limits), sizes
    video_cache: str | None = None  # a directory where videos' decoded clips are kept (video_cache.py)
    video_cache_size: int | None = None  # bytes the directory may hold, least recently used evicted; None: no bound
    _cache: VideoCache | None = field(default=None, init=False, repr=False, compare=False)

    def video(self, part: Mapping, name: str = "video", **defaults):
        from .video import load_video

        options = _options(VIDEO_KEYS, self.video_options, defaults, part)
        return load_video(media_source(part), name=name, access=self.access, cache=self.cache(), **options)

    def cache(self) -> VideoCache | None:
        """The VideoCache of ``video_cache`` and ``video_cache_size``, built on first use and again only when
        either field has been changed since (training sets ``video_cache`` on a loader it did not build)."""
        from .video_cache import VideoCache

        if not self.video_cache:
            return None
        cache = self._cache
        if cache is None or (cache.directory, cache.max_bytes) != (Path(self.video_cache), self.video_cache_size):
            cache = self._cache = VideoCache(self.video_cache, self.video_cache_size)
        return cache

    def load(self, kind: str, part: Mapping, name: str, options: Mapping, *,
             levels: bool = False) -> tuple[MediaInfo, np.ndarray]:
        """One image or video part -> (what it became, its patches); with ``levels``, the uint8 levels of
        ``image.patch_levels`` that ``normalise`` turns into the patches."""
        source = describe(media_source(part))
        if kind == "image":
            options = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                       **_options(IMAGE_KEYS, options, part)}
            picture = img.load_image(media_source(part), name=name, access=self.access)
            try:
                x = img.preprocess_image(
                    picture, **options, mean=self.image_mean, std=self.image_std, patch_size=self.patch_size,
                    temporal_patch_size=self.temporal_patch_size, merge_size=self.merge_size, levels_only=levels,
                )  # fmt: skip
            except MediaError as e:
                raise MediaError(f"{name} ({source}): {e}") from None
            return MediaInfo("image", 0, 0, source, x.original_size, x.size, x.grid, x.tokens), x.pixel_values
        values, meta = self._video_patches(part, name, options)
        if not levels:
            values = self.normalise(values)
        grid = tuple(meta["grid"])
        tokens = grid[0] * grid[1] * grid[2] // self.merge_size**2
        info = MediaInfo("video", 0, 0, source, tuple(meta["original_size"]), tuple(meta["size"]), grid, tokens,
                         frames=meta["frames"], frame_indices=meta["indices"], sample_fps=meta["sample_fps"])
        return info, values

    def _video_patches(self, part: Mapping, name: str, options: Mapping) -> tuple[np.ndarray, dict]:
        """A video part's uint8 patch levels and what they came from; through the video cache when there is one,
        whose entry then holds the patches themselves (training and serving both want them), so that a hit reads
        them back and does nothing else."""

        def cut(v) -> tuple[np.ndarray, dict]:
            values, grid = img.patch_levels(v.frames, self.patch_size, self.temporal_patch_size, self.merge_size)
            return values, {"grid": list(grid), "original_size": list(v.original_size), "size": list(v.frames.shape[1:3]),
                            "frames": len(v.frames), "indices": [int(i) for i in v.indices],
                            "sample_fps": float(v.sample_fps)}  # fmt: skip

        cache, source = self.cache(), media_source(part)
        if cache is None or isinstance(source, (list, tuple)):  # a list of frames is no file to key on
            return cut(self.video(part, name, **options))
        from .video import load_video

        data = self.access.read(source, name)  # here, so that the key is the content; errors name the source
        settings = _options(VIDEO_KEYS, self.video_options, options, part)
        layout = {"patch": [self.patch_size, self.temporal_patch_size, self.merge_size]}
        return cache.patches(data, {**settings, **layout},
                             lambda: cut(load_video(data, name=name, access=self.access, **settings)))

    def normalise(self, levels: np.ndarray) -> np.ndarray:
        """uint8 levels from ``load(..., levels=True)`` -> the float32 patches ``load`` would have returned."""
        return img.normalise_levels(levels, self.image_mean, self.image_std, self.temporal_patch_size)


def _options(keys: Sequence[str], *layers: Mapping) -> dict:
    """The media options among ``keys`` that ``layers`` set, a later layer winning; None means unset."""
    merged = {k: v for layer in layers for k, v in layer.items() if k in keys}
    return {k: v for k, v in merged.items() if v is not None}


class Processor:
    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None = None, **media_settings):
        """``media_settings``: the fields of :class:`MediaLoader` (min_pixels, max_pixels, patch_size, ...)."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template or ChatTemplate(None)
        settings = {k: tuple(v) if k in ("image_mean", "image_std") else v for k, v in media_settings.items()}
        self.media = MediaLoader(**settings)
        self.image_token_id = tokenizer.token_id("<|image_pad|>")
        self.video_token_id = tokenizer.token_id("<|video_pad|>")

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> Processor:
        """tokenizer.json (+ tokenizer_config.json), preprocessor_config.json and chat_template.json of a
        checkpoint directory; keyword arguments override the files."""
        path = Path(path)
        if not path.is_dir():
            raise MediaError(f"{path}: not a directory")
        settings = {**media_settings(path), **kwargs}
        return cls(Tokenizer.from_pretrained(path), ChatTemplate.from_pretrained(path), **settings)

    def render(self, messages, *, add_generation_prompt: bool = True, add_vision_id: bool = False,
               continue_final_message: bool = False) -> str:
        return self.chat_template(check_messages(messages), add_generation_prompt=add_generation_prompt,
                                  add_vision_id=add_vision_id, continue_final_message=continue_final_message)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def __call__(self, messages, add_generation_prompt: bool = True, *, add_vision_id: bool = False,
                 continue_final_message: bool = False, **media_options) -> BatchInputs:
        """One conversation (a list of messages) or a batch (a list of conversations) -> left-padded inputs.
        ``continue_final_message``: the last (assistant) message is left open for the model to go on writing."""
        if unknown := set(media_options) - set(VIDEO_KEYS):
            raise TypeError(f"unknown media options {sorted(unknown)}; known: {list(VIDEO_KEYS)}")
        # one conversation is a list of dicts, a batch a list of lists
        one = isinstance(messages, Sequence) and bool(messages) and isinstance(messages[0], Mapping)
        batch = [messages] if one else list(messages)
        if not batch:
            raise MediaError("messages: empty batch")
        texts, rows, media = [], [], []
        pixels: dict[str, list[np.ndarray]] = {"image": [], "video": []}
        for c, conversation in enumerate(batch):
            name = "messages" if len(batch) == 1 else f"conversation {c}"
            conversation = check_messages(conversation, name)
            text = self.chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                      add_vision_id=add_vision_id, continue_final_message=continue_final_message)
            counts = {"image": (self.image_token_id, []), "video": (self.video_token_id, [])}
            for kind, part in media_parts(conversation):
                n = sum(m.kind == kind for m in media)
                label = f"{kind} {n + 1}" + ("" if len(batch) == 1 else f" (conversation {c})")
                info, values = self.media.load(kind, part, label, media_options)
                info.index, info.conversation = n, c
                media.append(info)
                pixels[kind].append(values)
                counts[kind][1].append(info.tokens)
            texts.append(text)
            ids = self.tokenizer.encode(text)
            rows.append(np.repeat(ids, placeholder_repeats(ids, counts, name)).tolist())
        width = max(len(r) for r in rows)  # left padding
        out = BatchInputs(
            input_ids=torch.tensor([[self.tokenizer.pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long),
            attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long),
        )
        for kind, key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):  # fmt: skip
            if pixels[kind]:
                out[key] = torch.from_numpy(np.concatenate(pixels[kind]))
                out[grid_key] = torch.tensor([m.grid for m in media if m.kind == kind], dtype=torch.long)
        out.media, out.texts = media, texts
        return out


def placeholder_repeats(ids: list[int], items: dict[str, tuple[int, list[int]]], name: str) -> list[int]:
    """How many times each token of ``ids`` stands in the expanded prompt. ``items``: kind -> (its placeholder id,
    its items' token counts in order); the i-th placeholder of a kind stands for its i-th item, any other token once."""
    per_token = {}
    for kind, (token, sizes) in items.items():
        found = ids.count(token)
        if found != len(sizes):
            raise MediaError(
                f"{name}: the prompt has {found} {kind} placeholder(s) for {len(sizes)} {kind}(s) "
                "(is there a literal placeholder token in the text, or does the chat template drop media?)"
            )
        per_token[token] = iter(sizes)
    return [next(per_token[i]) if i in per_token else 1 for i in ids]


def preprocessor_config(min_pixels: int = img.IMAGE_MIN_PIXELS, max_pixels: int = img.IMAGE_MAX_PIXELS) -> dict:
    """The Qwen2-VL ``preprocessor_config.json`` (the same for 2B, 7B and 72B: REFERENCE §4)."""
    return {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": list(img.CLIP_MEAN), "image_std": list(img.CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }  # fmt: skip


def video_preprocessor_config(min_pixels: int, max_pixels: int, fps: float = 2.0, min_frames: int = 4,
                              max_frames: int = 768) -> dict:
    """``video_preprocessor_config.json`` as transformers' ``Qwen2VLVideoProcessor`` reads it: per-frame pixel
    bounds, sampling rate and frame limits (qwen-vl-utils' defaults unless a checkpoint was trained otherwise)."""
    return {
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "min_pixels": min_pixels,
        "max_pixels": max_pixels, "fps": fps, "min_frames": min_frames, "max_frames": max_frames,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(img.CLIP_MEAN),
        "image_std": list(img.CLIP_STD), "video_processor_type": "Qwen2VLVideoProcessor",
    }  # fmt: skip


def save_processor_files(path: str | Path, tokenizer_json: str, *, model_max_length: int = 32768,
                         video: dict | None = None, **pixels) -> None:
    """tokenizer.json, tokenizer_config.json (REFERENCE §1.3), chat_template.json (the official template) and
    preprocessor_config.json (``pixels``: min_pixels, max_pixels) of a Qwen2-VL-Instruct checkpoint; with
    ``video`` (the arguments of :func:`video_preprocessor_config`), video_preprocessor_config.json too."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "padding_side": "left", "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "errors": "replace",
    }))  # fmt: skip
    (path / "chat_template.json").write_text(json.dumps({"chat_template": OFFICIAL_TEMPLATE}))
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(**pixels)))
    if video is not None:
        (path / "video_preprocessor_config.json").write_text(json.dumps(video_preprocessor_config(**video)))


def media_settings(path: Path) -> dict:
    """MediaLoader settings from a checkpoint's preprocessor_config.json and video_preprocessor_config.json (its
    pixel bounds, fps and frame limits are the default video options; without it, qwen-vl-utils')."""
    cfg = _read_config(path / "preprocessor_config.json")
    if cfg is None:
        return {}
    out = _pixel_bounds(cfg, img.IMAGE_MIN_PIXELS, img.IMAGE_MAX_PIXELS)
    for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
        if key in cfg:
            out[key] = tuple(cfg[key]) if isinstance(cfg[key], list) else cfg[key]
    video = _read_config(path / "video_preprocessor_config.json")
    if video is not None:
        options = {**_pixel_bounds(video), **{k: video.get(k) for k in ("fps", "min_frames", "max_frames")}}
        for key, value in options.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise MediaError(f"{path / 'video_preprocessor_config.json'}: {key} must be a positive number, "
                                 f"not {value!r}")  # fmt: skip
        out["video_options"] = {k: v for k, v in options.items() if v is not None}
    return out


def _pixel_bounds(cfg: dict, low: int | None = None, high: int | None = None) -> dict:
    """min_pixels and max_pixels, or transformers >= 4.5x's size={shortest_edge, longest_edge}, else low/high."""
    size = cfg.get("size") or {}
    return {"min_pixels": cfg.get("min_pixels", size.get("shortest_edge", low)),
            "max_pixels": cfg.get("max_pixels", size.get("longest_edge", high))}


def _read_config(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MediaError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise MediaError(f"{file}: expected a JSON object")
    return cfg

