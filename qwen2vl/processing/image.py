"""Images to patches (REFERENCE §4): open, fix orientation and transparency, ``smart_resize``, normalise, patchify.

Follows transformers' ``Qwen2VLImageProcessorPil`` (PIL bicubic, rescale in float64 then float32, CLIP mean/std),
so that ``pixel_values`` equal its output; per-item options take qwen-vl-utils' names. ``patch_levels`` serves
video too (an image is a clip of one frame, repeated to fill the temporal patch).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MediaError, describe
from .sources import TRUST_LOCAL, MediaAccess

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28: one LLM token covers a 28x28 square
IMAGE_MIN_PIXELS = 4 * FACTOR * FACTOR  # 3136: 4 tokens
IMAGE_MAX_PIXELS = 16384 * FACTOR * FACTOR  # 12845056: 16384 tokens
MAX_ASPECT_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Image.MAX_IMAGE_PIXELS = 20000 * 20000  # PIL's decompression-bomb guard, at 400 Mpixel


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: float = IMAGE_MIN_PIXELS,
                 max_pixels: float = IMAGE_MAX_PIXELS, *, qwen_vl_utils: bool = False) -> tuple[int, int]:
    """The size closest to (height, width) whose sides are multiples of ``factor`` and whose area lies in
    [min_pixels, max_pixels], aspect ratio kept as far as possible: transformers' rules (REFERENCE §4), or with
    ``qwen_vl_utils`` that library's (video), where a side rounds to at least ``factor`` before the area is
    compared and a downscale below ``factor`` is refused instead of clamped."""
    if height <= 0 or width <= 0:
        raise MediaError(f"size {width}x{height} is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(f"aspect ratio {ratio:.0f}:1 of {width}x{height} is over the limit of {MAX_ASPECT_RATIO}:1")
    if min_pixels > max_pixels:
        raise MediaError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
    least = factor if qwen_vl_utils else 0
    h, w = max(least, round(height / factor) * factor), max(least, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
        if qwen_vl_utils and min(h, w) < factor:  # qwen-vl-utils would return 0 here and fail later
            raise MediaError(f"{width}x{height} is too thin for a budget of {max_pixels:g} pixels")
        h, w = max(factor, h), max(factor, w)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers and qwen-vl-utils 0.0.14 do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: object, *, name: str = "image", access: MediaAccess = TRUST_LOCAL) -> Image.Image:
    """An RGB PIL image from a path, URL, data URL, bytes or PIL image (``access`` says which sources are
    allowed), EXIF orientation applied. Decoded here, so that a truncated file fails now with a clear message."""
    what = f"{name} ({describe(source)})"
    if isinstance(source, Image.Image):
        image = source
    else:
        data = access.read(source, name)
        try:
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            image.load()
        except UnidentifiedImageError:
            raise MediaError(f"{what}: not a readable image (unknown or unsupported format)") from None
        except Image.DecompressionBombError as e:
            raise MediaError(f"{what}: too large to decode safely ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated/corrupt data as OSError/SyntaxError
            raise MediaError(f"{what}: corrupt or truncated image ({e})") from None
    if image.width == 0 or image.height == 0:
        raise MediaError(f"{what}: the image is empty ({image.width}x{image.height})")
    try:
        return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError) as e:
        raise MediaError(f"{what}: cannot convert to RGB ({e})") from None


def target_size(height: int, width: int, *, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                resized_height: int | None = None, resized_width: int | None = None,
                factor: int = FACTOR) -> tuple[int, int]:
    """The model input size of an image: ``resized_height``/``resized_width`` rounded to the factor (as
    qwen-vl-utils), or the smart_resize of its own size within [min_pixels, max_pixels]."""
    if (resized_height is None) != (resized_width is None):
        raise MediaError("resized_height and resized_width must be given together")
    if resized_height is not None:
        return smart_resize(int(resized_height), int(resized_width), factor)
    return smart_resize(height, width, factor, int(min_pixels), int(max_pixels))


def patch_levels(frames_THWC: np.ndarray, patch_size: int = PATCH, temporal_patch_size: int = 2,
                 merge_size: int = MERGE) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [T, H, W, C] -> (uint8 levels [t*gh*gw, C, tt, p*p], grid (t, gh, gw)) in 2x2-window order
    (REFERENCE §4): (t, gh/m, gw/m, m, m) over patches, (C, tt, p, p) within one. ``tt`` is 1 for an image (two
    copies fill its temporal patch in ``normalise_levels``), else ``temporal_patch_size`` (an odd-length clip repeats
    its last frame). As uint8 (1/8 of an image's float32 bytes, 1/4 of a clip's), training holds a corpus in memory."""
    T, H, W, C = frames_THWC.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    if T > 1 and T % tp:
        pad = np.repeat(frames_THWC[-1:], tp - T % tp, axis=0)
        frames_THWC = np.concatenate([frames_THWC, pad])
        T = frames_THWC.shape[0]
    t, tt = (1, 1) if T == 1 else (T // tp, tp)  # tt: distinct frames per temporal patch
    gh, gw = H // p, W // p
    x = frames_THWC.reshape(t, tt, gh // m, m, p, gw // m, m, p, C)
    return np.ascontiguousarray(x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)).reshape(t * gh * gw, C, tt, p * p), (t, gh, gw)


def normalise_levels(levels: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD, temporal_patch_size: int = 2) -> np.ndarray:
    """uint8 levels [N, C, tt, p*p] (``patch_levels``) -> float32 patches [N, C*tp*p*p] by table lookup; tt = 1 is
    broadcast over the temporal patch. The table is computed as transformers does (x/255 in float64, then float32,
    then (x - mean) / std in float32), so the lookup is bit-identical to its arithmetic."""
    N, C, _, pp = levels.shape
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    table = (scaled[None] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]  # [C, 256]
    out = np.empty((N, C, temporal_patch_size, pp), np.float32)
    for c in range(C):
        out[:, c] = np.take(table[c], levels[:, c])
    return out.reshape(N, C * temporal_patch_size * pp)


@dataclass
class ImageInput:
    pixel_values: np.ndarray  # float32 [gh*gw, 3*2*14*14] (uint8 [gh*gw, 3, 1, 14*14] with levels_only)
    grid: tuple[int, int, int]  # (1, gh, gw)
    size: tuple[int, int]  # (height, width) fed to the model
    original_size: tuple[int, int]  # (height, width) of the image as loaded

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2] // (MERGE * MERGE)


def preprocess_image(image: Image.Image, *, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                     resized_height: int | None = None, resized_width: int | None = None, mean=CLIP_MEAN,
                     std=CLIP_STD, patch_size: int = PATCH, temporal_patch_size: int = 2, merge_size: int = MERGE,
                     levels_only: bool = False) -> ImageInput:
    """An RGB PIL image -> its patches and grid (with ``levels_only``, the uint8 levels of ``patch_levels``)."""
    h, w = target_size(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels,
                       resized_height=resized_height, resized_width=resized_width, factor=patch_size * merge_size)
    resized = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))
    values, grid = patch_levels(resized[None], patch_size, temporal_patch_size, merge_size)
    if not levels_only:
        values = normalise_levels(values, mean, std, temporal_patch_size)
    return ImageInput(values, grid, (h, w), (image.height, image.width))
