"""Video loading and frame sampling (REFERENCE §5), following qwen-vl-utils 0.0.14.

``sample_indices`` is its ``calculate_video_frame_range`` and ``smart_nframes``, then ``linspace(start, end,
n).round()`` as its decord/torchcodec readers (``torch.linspace``, so that float32 rounding ties match).
``frame_size`` is ``fetch_video``'s sizing, except that the default ``total_pixels`` is ``max_tokens * 28 * 28``
(the paper's 16384 tokens per video; ``max_tokens=None`` gives qwen-vl-utils' 90,316,800). Where the
``1.05 * min_pixels`` floor still breaks that cap (long videos), ``plan_video`` lowers the frame count to the
largest even one that fits, spread over the same range; elsewhere indices and sizes equal qwen-vl-utils'.

A list of frames is used whole, padded to an even count, with one size for all frames (qwen-vl-utils' size of the
first), under the same cap. Decoding uses PyAV, resizing PIL BICUBIC; the library never imports torchvision.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image

from .errors import MediaError, describe
from .image import FACTOR, smart_resize
from .sources import TRUST_LOCAL, MediaAccess
from .video_cache import VideoCache

VIDEO_MAX_TOKENS = 16384  # the paper's cap on tokens per video
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
QWEN_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9  # qwen-vl-utils 0.0.14 default (MODEL_SEQ_LEN=128000): 90316800


def _even(x: float, rounding: Callable[[float], int] = round) -> int:
    """qwen-vl-utils' round/ceil/floor_by_factor with FRAME_FACTOR (Python's round: ties to even, as there)."""
    return rounding(x / FRAME_FACTOR) * FRAME_FACTOR


def _frame_range(total: int, video_fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """calculate_video_frame_range: [start_frame, end_frame] (inclusive) from times in seconds."""
    if not video_fps > 0:
        raise MediaError(f"frame rate must be positive, got {video_fps}")
    if total < 1:
        raise MediaError("the video has no frames")
    duration = total / video_fps
    first = 0 if start is None else math.ceil(max(0.0, min(start, duration)) * video_fps)
    last = total - 1 if end is None else min(math.floor(max(0.0, min(end, duration)) * video_fps), total - 1)
    if (start is not None or end is not None) and first >= last:
        raise MediaError(f"empty time range video_start={start}, video_end={end}: frames {first}..{last} "
                         f"of a {duration:.2f}s video ({total} frames @ {video_fps:g} fps)")
    return first, last


def _check_sampling(fps: float | None, nframes: int | None) -> None:
    if fps is not None and nframes is not None:
        raise MediaError("give either fps or nframes, not both")
    if fps is not None and not fps > 0:
        raise MediaError(f"fps must be positive, got {fps}")


def sample_indices(total_frames: int, video_fps: float, *, fps: float | None = None, nframes: int | None = None,
                   min_frames: int | None = None, max_frames: int | None = None,
                   video_start: float | None = None, video_end: float | None = None) -> list[int]:
    """Source frame indices to sample, exactly as qwen-vl-utils 0.0.14 (decord/torchcodec readers)."""
    _check_sampling(fps, nframes)
    first, last = _frame_range(total_frames, video_fps, video_start, video_end)
    count = last - first + 1
    if nframes is not None:
        n = _even(nframes)
    else:  # smart_nframes; note the default max_frames depends on the range's frame count
        lo = _even(FPS_MIN_FRAMES if min_frames is None else min_frames, math.ceil)
        hi = _even(min(FPS_MAX_FRAMES, count) if max_frames is None else max_frames, math.floor)
        wanted = count / video_fps * (FPS if fps is None else fps)
        n = _even(min(min(max(wanted, lo), hi), count), math.floor)
    if not FRAME_FACTOR <= n <= count:
        raise MediaError(f"cannot sample {n} frames from {count}: a video needs between 2 and {count} frames")
    return torch.linspace(first, last, n).round().long().tolist()


def frame_size(height: int, width: int, nframes: int, *, min_pixels: float | None = None,
               max_pixels: float | None = None, total_pixels: float | None = None,
               resized_height: int | None = None, resized_width: int | None = None,
               max_tokens: int | None = VIDEO_MAX_TOKENS) -> tuple[int, int]:
    """(height, width) each of ``nframes`` frames is resized to: qwen-vl-utils' fetch_video sizing."""
    if (resized_height is None) != (resized_width is None):
        raise MediaError("give both resized_height and resized_width, or neither")
    for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels), ("total_pixels", total_pixels),
                       ("max_tokens", max_tokens), ("nframes", nframes)):
        if value is not None and not value > 0:
            raise MediaError(f"{key} must be positive, got {value}")
    if resized_height is not None:  # fetch_video: smart_resize with the image defaults
        return smart_resize(resized_height, resized_width, qwen_vl_utils=True)
    min_pixels = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    if total_pixels is None:
        total_pixels = QWEN_TOTAL_PIXELS if max_tokens is None else max_tokens * 28 * 28
    limit = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = limit if max_pixels is None else min(max_pixels, limit)  # a user max_pixels can only lower it
    return smart_resize(height, width, FACTOR, min_pixels, max_pixels, qwen_vl_utils=True)


def max_frames_for_cap(height: int, width: int, nframes: int, **sizing: Any) -> int:
    """The largest even frame count <= ``nframes`` whose tokens (with ``frame_size(..., **sizing)``) fit
    ``max_tokens`` (``nframes`` itself when there is no cap); a MediaError when not even 2 frames fit."""
    max_tokens = sizing.get("max_tokens", VIDEO_MAX_TOKENS)
    if max_tokens is None:
        return nframes
    # Fewer frames never shrink a frame, so the product is not monotonic in general: scan down (cheap arithmetic).
    for n in range(nframes - nframes % 2, 0, -2):
        h, w = frame_size(height, width, n, **sizing)
        if n // 2 * (h // 28) * (w // 28) <= max_tokens:
            return n
    raise MediaError(f"even 2 frames exceed max_tokens={max_tokens}")


def plan_video(total_frames: int, video_fps: float, height: int, width: int, *, fps=None, nframes=None,
               min_frames=None, max_frames=None, video_start=None, video_end=None,
               **sizing: Any) -> tuple[list[int], tuple[int, int]]:
    """Indices and frame (height, width) for a video file: ``sample_indices`` + ``frame_size`` + the token cap."""
    times = {"video_start": video_start, "video_end": video_end}
    idx = sample_indices(total_frames, video_fps, fps=fps, nframes=nframes, min_frames=min_frames,
                         max_frames=max_frames, **times)
    cap = max_frames_for_cap(height, width, len(idx), **sizing)
    if cap < len(idx):  # same as lowering max_frames to cap: n = cap, spread over the same range
        idx = sample_indices(total_frames, video_fps, nframes=cap, **times)
    return idx, frame_size(height, width, len(idx), **sizing)


@dataclass
class Video:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB at the model size; T even
    indices: list[int]  # source frame indices sampled (frame list: positions in the list)
    sample_fps: float  # frames per second of the sampled clip
    source_fps: float  # the file's frame rate (frame list: the list's rate)
    total_frames: int  # frames in the source
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the source frames

    @property
    def grid(self) -> tuple[int, int, int]:
        t, h, w, _ = self.frames.shape
        return t // 2, h // 14, w // 14

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w // 4


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA":  # as qwen-vl-utils: transparent pixels become white
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def _resize(frame: np.ndarray | Image.Image, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(frame) if isinstance(frame, np.ndarray) else frame
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _list_frame(i: int, item: Any) -> Image.Image:
    try:
        if isinstance(item, Image.Image):
            return _to_rgb(item)
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4))):
                raise MediaError(f"expected a uint8 HxWx3 array, got {item.dtype} {tuple(item.shape)}")
            return _to_rgb(Image.fromarray(item))
        if isinstance(item, (bytes, bytearray)):
            file = io.BytesIO(item)
        elif isinstance(item, (str, Path)):
            file = str(item).removeprefix("file://")
            if not os.path.isfile(file):
                raise MediaError("file not found")
        else:
            raise MediaError(f"unsupported frame type {type(item).__name__}")
        with Image.open(file) as image:
            return _to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # MediaError included (a ValueError)
        reason = str(e) if isinstance(e, MediaError) else f"not a readable image ({e})"
        raise MediaError(f"frame {i} ({describe(item)}): {reason}") from None


def _load_frame_list(items: Sequence[Any], fps: float | None, sizing: dict[str, Any]) -> Video:
    """Every frame is used, the last repeated to an even count (qwen-vl-utils). qwen-vl-utils sizes each frame by
    its image rules, then the clip by the video rules; we size the first frame so and resize all to that once."""
    if not items:
        raise MediaError("empty frame list")
    images = [_list_frame(i, item) for i, item in enumerate(items)]
    n = len(images) + len(images) % 2
    w0, h0 = images[0].size
    # fetch_image is called with image_patch_size=28 there, so its factor is 56 (a quirk we follow for equal sizes)
    min_px, max_px = sizing.get("min_pixels"), sizing.get("max_pixels")
    h1, w1 = smart_resize(h0, w0, 56, 4 * 56 * 56 if min_px is None else min_px,
                          16384 * 56 * 56 if max_px is None else max_px, qwen_vl_utils=True)
    rate = FPS if fps is None else fps
    cap = max_frames_for_cap(h1, w1, n, **sizing)
    if cap < n:
        idx = torch.linspace(0, len(images) - 1, cap).round().long().tolist()
    else:
        idx = list(range(len(images))) + [len(images) - 1] * (n - len(images))
    size = frame_size(h1, w1, len(idx), **sizing)
    frames = np.stack([_resize(images[i], size) for i in idx])
    return Video(frames, idx, rate * len(idx) / n, rate, len(images), (h0, w0))


def _probe(opener: Callable[[], Any]) -> tuple[int, float, int, int]:
    """(frame count, fps, height, width) of the first video stream, from its header."""
    with opener() as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        height, width = stream.codec_context.height, stream.codec_context.width
        total = stream.frames
        # mp4/mov/avi record the frame count; mkv/webm/ts do not (0): count packets by demuxing, which reads the
        # file without decoding and is exact for video (one packet per frame). A count that is still too high
        # (truncated file, frames the decoder drops) is handled in _load_file when decoding ends early.
        if total <= 0:
            total = sum(1 for packet in container.demux(stream) if packet.size)
    if not rate or height < 1 or width < 1:
        raise MediaError("no frame rate or frame size in the video stream")
    if total < 1:
        raise MediaError("no decodable frames")
    return total, float(rate), height, width


def _decode(opener: Callable[[], Any], indices: list[int], size: tuple[int, int]) -> tuple[list | None, int]:
    """(the frames at ``indices``, resized, or None when the stream ends or fails first; the count decoded). Frames
    are converted and resized on worker threads while decoding goes on (PyAV and PIL release the GIL)."""
    wanted = set(indices)
    pending: dict[int, Future] = {}
    count = 0
    with opener() as container, ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    pending[count] = pool.submit(lambda f: _resize(f.to_ndarray(format="rgb24"), size), frame)
                count += 1
                if count > indices[-1]:
                    return [pending[i].result() for i in indices], count
        except av.FFmpegError:
            # A truncated or damaged stream; with frame threading FFmpeg usually reports it as a clean end
            # instead, so both are treated alike: the caller samples the frames that did decode.
            pass
        for future in pending.values():  # surface errors of the frames that did decode
            future.result()
    return None, count


def _load_file(opener: Callable[[], Any], options: dict[str, Any], sizing: dict[str, Any], label: str) -> Video:
    total, video_fps, height, width = _probe(opener)
    indices, size = plan_video(total, video_fps, height, width, **options, **sizing)
    frames, decoded = _decode(opener, indices, size)
    if frames is None:
        if decoded < 2:
            raise MediaError("no decodable frames" if decoded == 0 else "only 1 decodable frame")
        warnings.warn(f"{label}: only {decoded} of {total} frames decode (truncated or damaged file?); "
                      f"sampling those", stacklevel=3)
        total = decoded
        indices, size = plan_video(total, video_fps, height, width, **options, **sizing)
        frames, _ = _decode(opener, indices, size)
        if frames is None:
            raise MediaError("decoding is not repeatable")
    first, last = _frame_range(total, video_fps, options["video_start"], options["video_end"])
    sample_fps = len(indices) / max(last - first + 1, 1e-6) * video_fps  # qwen-vl-utils: over the range's count
    return Video(np.stack(frames), indices, sample_fps, video_fps, total, (height, width))


def load_video(source: Any, *, name: str = "video", fps: float | None = None, nframes: int | None = None,
               min_frames: int | None = None, max_frames: int | None = None, video_start: float | None = None,
               video_end: float | None = None, min_pixels: float | None = None, max_pixels: float | None = None,
               total_pixels: float | None = None, resized_height: int | None = None,
               resized_width: int | None = None, max_tokens: int | None = VIDEO_MAX_TOKENS,
               access: MediaAccess = TRUST_LOCAL, cache: VideoCache | None = None) -> Video:
    """Load, sample and resize a video: a path (optionally ``file://``), bytes of a video file, an http(s) URL,
    or a list of frames (PIL images, uint8 arrays, image paths or bytes; ``fps`` is the rate they were sampled at,
    default 2). ``access``: which sources are allowed; ``cache``: where the decoded clip is kept (any file: it is
    keyed by content)."""
    options = {"fps": fps, "nframes": nframes, "min_frames": min_frames, "max_frames": max_frames,
               "video_start": video_start, "video_end": video_end}
    sizing = {"min_pixels": min_pixels, "max_pixels": max_pixels, "total_pixels": total_pixels,
              "resized_height": resized_height, "resized_width": resized_width, "max_tokens": max_tokens}
    label = f"{name} ({describe(source)})"
    try:
        _check_sampling(fps, nframes)
        if isinstance(source, (list, tuple)):
            if unused := [k for k, v in options.items() if v is not None and k != "fps"]:
                raise MediaError(f"{', '.join(unused)} cannot be used with a list of frames (every frame is used)")
            return _load_frame_list(source, fps, sizing)
        if not isinstance(source, (str, Path, bytes, bytearray, memoryview)):
            raise MediaError(f"unsupported video source type {type(source).__name__}")
        data = access.read(source, name)
        if not data:  # a Path is never empty here
            raise MediaError("empty data")
        # bytes (fetched from a URL or an object store, a data URL) are cached too: the key is the content
        opener = (lambda: av.open(str(data))) if isinstance(data, Path) else (lambda: av.open(io.BytesIO(data)))
        decode = partial(_load_file, opener, options, sizing, label)
        return decode() if cache is None else cache.load(data, {**options, **sizing}, decode)
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"{label}: not a readable video ({e})") from None
    except MediaError as e:  # messages from access.read name the item already
        raise MediaError(str(e) if str(e).startswith(f"{name} (") else f"{label}: {e}") from None
