"""How many LLM tokens an image or a video will cost, read from its header, without decoding a pixel: what
``qwen2vl data prepare`` stores so that the token-budget packer can plan rows before any media is loaded.

The numbers are those ``MediaLoader.load`` produces (the same options, the same sizing functions): an image's size
comes from its header with the EXIF orientation applied, a video's frame count, rate and size from its container.
A file whose decoding later disagrees (a truncated video decodes fewer frames) is caught when the sample is built.
A list of frames is loaded, as it has no header of its own.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import av
from PIL import ExifTags, Image, UnidentifiedImageError

from .chat import media_source
from .errors import MediaError, describe
from .image import target_size
from .processor import IMAGE_KEYS, VIDEO_KEYS, MediaLoader, _options
from .video import VIDEO_MAX_TOKENS, _check_sampling, _probe, plan_video

SWAPPED = {5, 6, 7, 8}  # EXIF orientations that turn the image a quarter: width and height trade places


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, from the header. A PNG's ``getexif`` decodes the image (its eXIf chunk may follow the
    pixels), so a PNG's is read from an eXIf chunk before them; one after them is caught when the sample is built."""
    if image.format == "PNG":
        exif = Image.Exif()
        if raw := image.info.get("exif"):
            exif.load(raw)
    else:
        exif = image.getexif()
    return exif.get(ExifTags.Base.Orientation, 1)


def media_tokens(loader: MediaLoader, kind: str, part: Mapping, name: str, options: Mapping) -> int:
    """The tokens (placeholders) of one image or video part, as ``loader.load(kind, part, name, options)`` would
    give them."""
    source = media_source(part)
    what = f"{name} ({describe(source)})"
    if kind == "video" and isinstance(source, (list, tuple)):
        return loader.load(kind, part, name, options, levels=True)[0].tokens
    data = loader.access.read(source, name)
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    if kind == "image":
        try:
            with Image.open(file) as image:
                width, height = image.size
                orientation = _orientation(image)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"{what}: not a readable image ({e})") from None
        if orientation in SWAPPED:
            width, height = height, width
        settings = {"min_pixels": loader.min_pixels, "max_pixels": loader.max_pixels,
                    **_options(IMAGE_KEYS, options, part)}  # fmt: skip
        try:
            h, w = target_size(height, width, **settings, factor=loader.patch_size * loader.merge_size)
        except MediaError as e:
            raise MediaError(f"{what}: {e}") from None
        return (h // loader.patch_size) * (w // loader.patch_size) // loader.merge_size**2
    settings = _options(VIDEO_KEYS, loader.video_options, options, part)
    timing = {k: settings.pop(k, None) for k in ("fps", "nframes", "min_frames", "max_frames", "video_start",
                                                 "video_end")}  # fmt: skip
    try:
        _check_sampling(timing["fps"], timing["nframes"])
        total, rate, height, width = _probe(lambda: av.open(file if isinstance(file, io.BytesIO) else str(file)))
        indices, (h, w) = plan_video(total, rate, height, width, **timing, max_tokens=VIDEO_MAX_TOKENS, **settings)
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"{what}: not a readable video ({e})") from None
    except MediaError as e:
        raise MediaError(f"{what}: {e}") from None
    grid = (len(indices) // loader.temporal_patch_size, h // loader.patch_size, w // loader.patch_size)
    return grid[0] * grid[1] * grid[2] // loader.merge_size**2
