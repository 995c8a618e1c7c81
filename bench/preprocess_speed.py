"""Preprocessing speed: qwen2vl next to qwen-vl-utils + transformers' processor, in the same run.

Two inputs, both generated here (no download):
  image  a 1920x1080 JPEG on disk (smooth gradients plus noise, quality 90) -> 1932x1092, 2691 tokens.
         ours: ``MediaLoader.load`` (open, EXIF, RGB, PIL bicubic resize, normalise, patchify).
         reference: qwen-vl-utils ``fetch_image`` (open + resize) then transformers' image processor as
         ``AutoProcessor`` picks it (the torchvision backend when torchvision is installed), and also
         transformers' PIL backend alone (the one whose output we equal).
  video  a 60 s 1280x720 30 fps H.264 file (1800 frames) -> 120 frames at 2 fps.
         ours: ``MediaLoader.load`` (PyAV decode of the sampled frames, PIL resize, normalise, patchify).
         reference: qwen-vl-utils ``fetch_video`` (decord reader, torchvision resize) then transformers'
         ``Qwen2VLVideoProcessor`` with ``do_sample_frames=False``.
         Both get ``total_pixels = 16384 * 28 * 28`` (the paper's token cap, our default) so that they pick the
         same frames and the same frame size; the token counts are printed to show it.

  clips  100 clips as the synthetic curriculum writes them (112x112, 8 frames at 4 fps, lossless H.264).
         ours: ``MediaLoader.load(..., levels=True)`` as the training loader calls it, without and with the
         decoded-video cache (filled by the warm-up pass). reference: ``fetch_video`` + ``Qwen2VLVideoProcessor``.

Times are the median of --repeats runs after one warm-up; ratio = reference / ours (> 1: we are faster).
Threads: torch.set_num_threads(2) (this machine's cores) for both.

    .venv/bin/python bench/preprocess_speed.py [--repeats 5] [--only image|video|clips]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from timing import timed  # bench/timing.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: recipes/ draws the clips

CAP_PIXELS = 16384 * 28 * 28


def make_image(path: Path, w: int = 1920, h: int = 1080) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1) + rng.normal(0, 12, (h, w, 3))
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def make_video(path: Path, seconds: int = 60, fps: int = 30, w: int = 1280, h: int = 720) -> Path:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for i in range(seconds * fps):
            frame = np.roll(base, 4 * i, axis=1)  # a moving texture: every frame differs
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def bench_image(path: Path, repeats: int) -> list[tuple[str, float, float, str]]:
    from qwen_vl_utils import fetch_image
    from transformers import AutoImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qwen2vl.processing.processor import MediaLoader

    loader = MediaLoader()
    auto = AutoImageProcessor.from_pretrained(_preprocessor_dir())
    pil = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)

    ours_t, (info, _) = timed(lambda: loader.load("image", {"image": str(path)}, "image", {}), repeats)

    def reference(processor):
        return lambda: processor(images=[fetch_image({"image": str(path)})], return_tensors="pt")

    auto_t, ref = timed(reference(auto), repeats)

    def pil_alone():
        from PIL import Image

        with Image.open(path) as im:
            return pil(images=[im.convert("RGB")], return_tensors="pt")

    pil_t, _ = timed(pil_alone, repeats)
    grid = tuple(ref["image_grid_thw"][0].tolist())
    assert grid == info.grid, (grid, info.grid)
    note = f"grid {info.grid}, {info.tokens} tokens"
    return [
        (f"image 1920x1080 vs qwen-vl-utils + {type(auto).__name__}", ours_t, auto_t, note),
        ("image 1920x1080 vs transformers PIL backend alone", ours_t, pil_t, note),
    ]


def bench_video(path: Path, repeats: int) -> list[tuple[str, float, float, str]]:
    from qwen_vl_utils import fetch_video
    from transformers import Qwen2VLVideoProcessor

    from qwen2vl.processing.processor import MediaLoader

    loader = MediaLoader()
    video_processor = Qwen2VLVideoProcessor.from_pretrained(_preprocessor_dir())
    ele = {"video": str(path), "total_pixels": CAP_PIXELS}

    ours_t, (info, _) = timed(lambda: loader.load("video", ele, "video", {}), repeats)

    def reference():
        frames = fetch_video(dict(ele))
        return video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")

    ref_t, ref = timed(reference, repeats)
    ref_grid = tuple(ref["video_grid_thw"][0].tolist())
    note = f"ours grid {info.grid} {info.tokens} tok, reference grid {ref_grid}"
    return [("video 60 s 1280x720 30 fps (2 fps -> 120 frames)", ours_t, ref_t, note)]


def make_clips(d: Path, n: int = 100) -> list[Path]:
    """The synthetic curriculum's clips: 112x112, 8 frames at 4 fps, a ball crossing (lossless H.264)."""
    from recipes.synth.data import COLOURS, VIDEO_FRAMES, ball_frame
    from recipes.synth.data import write_mp4 as _write_mp4

    colours = list(COLOURS)
    paths = []
    for i in range(n):
        path = d / f"clip{i:03d}.mp4"
        _write_mp4(path, [ball_frame(colours[i % 6], 10 + i % 5, 20 + 10 * k, 30 + i % 50)
                          for k in range(VIDEO_FRAMES)])  # fmt: skip
        paths.append(path)
    return paths


def bench_clips(paths: list[Path], cache_dir: Path, repeats: int) -> list[tuple[str, float, float, str]]:
    """What the curriculum's training loader does with each clip (decode, sample 2 fps, patchify to uint8 levels),
    without and with the decoded-video cache (whose first, warm-up pass fills it), against the reference."""
    from qwen_vl_utils import fetch_video
    from transformers import Qwen2VLVideoProcessor

    from qwen2vl.processing.processor import MediaLoader
    from recipes.synth.data import VIDEO_MIN_PIXELS

    video_processor = Qwen2VLVideoProcessor.from_pretrained(_preprocessor_dir())
    parts = [{"video": str(p), "min_pixels": VIDEO_MIN_PIXELS} for p in paths]

    def ours(loader):
        return lambda: [loader.load("video", part, "video", {}, levels=True) for part in parts]

    plain_t, loaded = timed(ours(MediaLoader()), repeats)
    cached_t, _ = timed(ours(MediaLoader(video_cache=str(cache_dir))), repeats)

    def reference():
        out = []
        for part in parts:
            frames = fetch_video(dict(part))
            out.append(video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt"))
        return out

    ref_t, ref = timed(reference, repeats)
    grids = {tuple(r["video_grid_thw"][0].tolist()) for r in ref}
    note = f"ours grid {loaded[0][0].grid}, reference {sorted(grids)}"
    name = f"{len(paths)} curriculum clips 112x112, 8 frames"
    return [(f"{name}, no cache", plain_t, ref_t, note),
            (f"{name}, decoded-video cache", cached_t, ref_t, note)]  # fmt: skip


_PRE_DIR = None


def _preprocessor_dir() -> str:
    """A directory holding the Qwen2-VL preprocessor_config.json (the same for 2B/7B/72B)."""
    global _PRE_DIR
    if _PRE_DIR is None:
        import json

        from qwen2vl.processing.processor import preprocessor_config

        _PRE_DIR = tempfile.mkdtemp()
        Path(_PRE_DIR, "preprocessor_config.json").write_text(json.dumps(preprocessor_config()))
    return _PRE_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["image", "video", "clips"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        if args.only in (None, "image"):
            rows += bench_image(make_image(Path(d) / "image.jpg"), args.repeats)
        if args.only in (None, "video"):
            t = time.perf_counter()
            video = make_video(Path(d) / "video.mp4")
            print(f"(generated the test video in {time.perf_counter() - t:.1f} s)")
            rows += bench_video(video, max(1, args.repeats // 2))
        if args.only in (None, "clips"):
            rows += bench_clips(make_clips(Path(d)), Path(d) / "cache", args.repeats)
    print(f"\n{'input':<58} {'ours':>9} {'reference':>10} {'ratio':>6}  notes")
    for name, ours, ref, note in rows:
        print(f"{name:<58} {ours * 1000:>7.0f}ms {ref * 1000:>8.0f}ms {ref / ours:>6.2f}  {note}")


if __name__ == "__main__":
    main()
