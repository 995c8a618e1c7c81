"""Video loading and sampling (qwen2vl.processing.video) against qwen-vl-utils 0.0.14, on small generated videos."""

from __future__ import annotations

import itertools

import av
import numpy as np
import pytest
import torch
from PIL import Image

import qwen2vl.processing.video as video_mod
from qwen2vl.processing import MediaError
from qwen2vl.processing.video_cache import VideoCache
from qwen2vl.processing.video import (
    VIDEO_MAX_TOKENS,
    Video,
    frame_size,
    load_video,
    max_frames_for_cap,
    plan_video,
    sample_indices,
)

import qwen_vl_utils.vision_process as vp  # noqa: E402  (the reference; needs torchvision, tests only)

CAP_PIXELS = VIDEO_MAX_TOKENS * 28 * 28
QWEN_DEFAULT_TOTAL = 128000 * 28 * 28 * 0.9


# ---------------------------------------------------------------- references built from qwen-vl-utils' own functions


def ref_indices(total, video_fps, **ele):
    """What qwen-vl-utils' decord/torchcodec readers sample."""
    ele = {k: v for k, v in ele.items() if v is not None}
    start, end, count = vp.calculate_video_frame_range(ele, total, video_fps)
    n = vp.smart_nframes(ele, total_frames=count, video_fps=video_fps)
    return torch.linspace(start, end, n).round().long().tolist()


def ref_size(h, w, n, total_pixels, min_pixels=None, max_pixels=None, resized_height=None, resized_width=None):
    """fetch_video's size computation, line by line, with its smart_resize."""
    factor = 28
    min_px = vp.VIDEO_MIN_TOKEN_NUM * factor * factor if min_pixels is None else min_pixels
    max_px = max(min(vp.VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / n * vp.FRAME_FACTOR), int(min_px * 1.05))
    max_px = min(max_px if max_pixels is None else max_pixels, max_px)
    if resized_height is not None and resized_width is not None:
        return vp.smart_resize(resized_height, resized_width, factor=factor)
    return vp.smart_resize(h, w, factor=factor, min_pixels=min_px, max_pixels=max_px)


def tokens(n, size):
    return n // 2 * (size[0] // 28) * (size[1] // 28)


def level(k):
    """Grey level that encodes frame k (adjacent frames differ by 5)."""
    return 16 + (k * 5) % 220


def make_video(path, n, fps, w=64, h=48, codec="libx264", options=None):
    """n frames: grey level(k) with a white top-left quarter; lossless x264 (or mpeg4 at high quality)."""
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast", "qp": "0"} if codec == "libx264" else {"qscale": "1"}
        for k in range(n):
            a = np.full((h, w, 3), level(k), np.uint8)
            a[: h // 2, : w // 2] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def check_content(v: Video, tol=3):
    _, h, w, _ = v.frames.shape
    for frame, k in zip(v.frames, v.indices):
        assert abs(int(frame[3 * h // 4, 3 * w // 4, 0]) - level(k)) <= tol  # the sampled frame, not a neighbour
        assert frame[h // 4, w // 4].min() >= 250  # white quarter stays top-left: no flip or transpose


# ---------------------------------------------------------------- sampling


LENGTHS = [(90, 30), (20, 10), (7, 7), (61, 24), (300, 30), (7200, 30), (1000, 29.97), (3, 30), (1, 30)]
VARIANTS = [
    {}, {"fps": 1.0}, {"fps": 0.5}, {"fps": 4.0}, {"fps": 60.0}, {"nframes": 4}, {"nframes": 5}, {"nframes": 7},
    {"nframes": 1000}, {"min_frames": 8}, {"min_frames": 5, "fps": 0.1}, {"max_frames": 10}, {"max_frames": 3},
    {"video_start": 1.0}, {"video_end": 2.0}, {"video_start": 0.5, "video_end": 1.5},
    {"video_start": 1.0, "video_end": 1.02}, {"video_start": 3.0, "video_end": 1.0}, {"video_start": 1e6},
    {"video_start": 0.2, "video_end": 100.0, "fps": 3.0, "max_frames": 12},
]


@pytest.mark.parametrize("total,video_fps", LENGTHS)
def test_sample_indices_match_qwen_vl_utils(total, video_fps):
    agree = 0
    for ele in VARIANTS:
        try:
            expected = ref_indices(total, video_fps, **ele)
        except (ValueError, AssertionError):
            with pytest.raises(MediaError):
                sample_indices(total, video_fps, **ele)
            continue
        got = sample_indices(total, video_fps, **ele)
        assert got == expected, ele
        assert len(got) % 2 == 0 and got == sorted(got)
        agree += 1
    assert agree >= (3 if total > 3 else 0)


def test_sample_indices_examples():
    assert sample_indices(90, 30) == [0, 18, 36, 53, 71, 89]  # REFERENCE §5
    assert len(sample_indices(300, 30)) == 20
    assert len(sample_indices(7200, 30)) == 480
    assert sample_indices(20, 10) == [0, 6, 13, 19]
    assert sample_indices(90, 30, video_start=1.0, video_end=2.0) == ref_indices(90, 30, video_start=1.0, video_end=2.0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"fps": 2.0, "nframes": 4}, "either fps or nframes"),
    ({"fps": -1.0}, "fps must be positive"),
    ({"video_start": 2.0, "video_end": 1.0}, "empty time range"),
    ({"nframes": 1000}, "cannot sample 1000 frames from 90"),
])
def test_sample_indices_errors(kwargs, needle):
    with pytest.raises(MediaError, match=needle):
        sample_indices(90, 30, **kwargs)
    with pytest.raises(MediaError, match="between 2 and 1"):
        sample_indices(1, 30)


# ---------------------------------------------------------------- sizes


DIMS = [(720, 1280), (1280, 720), (48, 64), (1080, 1920), (2160, 3840), (100, 3000), (28, 28), (10, 10), (333, 517)]
NFRAMES = [2, 4, 6, 20, 100, 200, 242, 244, 300, 480, 768]
SIZE_OPTIONS = [
    {}, {"min_pixels": 50000}, {"max_pixels": 200000}, {"max_pixels": 50000}, {"min_pixels": 300 * 784},
    {"resized_height": 300, "resized_width": 500}, {"total_pixels": 20_000_000},
]


def test_frame_size_matches_qwen_vl_utils():
    for (h, w), n, opts, total in itertools.product(DIMS, NFRAMES, SIZE_OPTIONS, [CAP_PIXELS, QWEN_DEFAULT_TOTAL]):
        opts = {"total_pixels": total, **opts}
        try:
            expected = ref_size(h, w, n, **opts)
        except (ValueError, AssertionError):
            with pytest.raises(MediaError):
                frame_size(h, w, n, **opts)
            continue
        assert frame_size(h, w, n, **opts) == expected, (h, w, n, opts)


def test_frame_size_defaults():
    # default total_pixels is the 16384-token cap; max_tokens=None gives qwen-vl-utils 0.0.14's default
    assert frame_size(720, 1280, 20) == ref_size(720, 1280, 20, CAP_PIXELS)
    assert frame_size(720, 1280, 200) == ref_size(720, 1280, 200, CAP_PIXELS) != (560, 1008)
    assert frame_size(720, 1280, 200, max_tokens=None) == (560, 1008)
    assert frame_size(720, 1280, 20, max_tokens=1000) == ref_size(720, 1280, 20, 1000 * 784)


@pytest.mark.parametrize("n,size", [(20, (560, 1008)), (200, (560, 1008)), (768, (336, 644))])
def test_reference_table(n, size):
    """REFERENCE §5, 0.0.14 column (1280x720, default total_pixels 90316800)."""
    assert frame_size(720, 1280, n, total_pixels=90316800) == size
    assert ref_size(720, 1280, n, 90316800) == size


def test_frame_size_errors():
    with pytest.raises(MediaError, match="aspect ratio"):
        frame_size(10, 3000, 4)
    with pytest.raises(MediaError, match="both resized_height and resized_width"):
        frame_size(720, 1280, 4, resized_height=100)
    with pytest.raises(MediaError, match="min_pixels must be positive"):
        frame_size(720, 1280, 4, min_pixels=-1)


# ---------------------------------------------------------------- the token cap


def test_long_video_within_cap():
    n_qwen = len(ref_indices(7200, 30))
    q = ref_size(720, 1280, n_qwen, CAP_PIXELS)
    assert n_qwen == 480 and tokens(n_qwen, q) == 28800  # the 1.05*min_pixels floor breaks the cap
    idx, size = plan_video(7200, 30, 720, 1280)
    assert tokens(len(idx), size) <= VIDEO_MAX_TOKENS
    assert (len(idx), size) == (272, (224, 420))  # largest even count that fits: 136 * 8 * 15 = 16320
    assert idx == ref_indices(7200, 30, nframes=272)  # uniformly over the whole video
    assert max_frames_for_cap(720, 1280, 480) == 272
    # no cap: pure qwen-vl-utils 0.0.14
    idx, size = plan_video(7200, 30, 720, 1280, max_tokens=None)
    assert len(idx) == 480 and size == ref_size(720, 1280, 480, QWEN_DEFAULT_TOTAL)


def test_cap_only_changes_what_exceeds_it():
    kept = lowered = 0
    for total, fps, (h, w), opts in itertools.product(
            [8, 60, 300, 480, 600, 1000, 2000, 3000, 7200, 20000], [30, 24],
            [(720, 1280), (48, 64), (1920, 1080), (360, 640)],
            [{}, {"fps": 4.0}, {"min_pixels": 400 * 784}, {"nframes": 8}]):
        sampling = {k: v for k, v in opts.items() if k != "min_pixels"}
        sizing = {k: v for k, v in opts.items() if k == "min_pixels"}
        try:
            q_idx = ref_indices(total, fps, **sampling)
        except ValueError:
            continue
        q_size = ref_size(h, w, len(q_idx), CAP_PIXELS, **sizing)
        idx, size = plan_video(total, fps, h, w, **opts)
        assert tokens(len(idx), size) <= VIDEO_MAX_TOKENS
        if tokens(len(q_idx), q_size) <= VIDEO_MAX_TOKENS:
            assert (idx, size) == (q_idx, q_size)
            kept += 1
        else:
            assert len(idx) % 2 == 0 and 2 <= len(idx) < len(q_idx)
            times = {k: v for k, v in sampling.items() if k not in ("fps", "nframes")}
            assert idx == ref_indices(total, fps, nframes=len(idx), **times)
            assert size == frame_size(h, w, len(idx), **sizing)
            lowered += 1
    assert kept > 50 and lowered > 10


def test_cap_impossible():
    with pytest.raises(MediaError, match="even 2 frames exceed"):
        plan_video(90, 30, 720, 1280, max_tokens=50)


# ---------------------------------------------------------------- decoding files


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "90@30": make_video(d / "a.mp4", 90, 30),
        "20@10": make_video(d / "b.avi", 20, 10, codec="mpeg4"),
        "7@7": make_video(d / "c.mp4", 7, 7),
        "61@24": make_video(d / "d.mkv", 61, 24),  # matroska stores no frame count: counted by demuxing
        "300@30": make_video(d / "e.mp4", 300, 30, w=32, h=32),
        "faststart": make_video(d / "f.mp4", 90, 30, options={"movflags": "faststart"}),
    }


def test_decoded_video(videos):
    v = load_video(videos["90@30"])
    assert v.indices == ref_indices(90, 30) == [0, 18, 36, 53, 71, 89]
    h, w = frame_size(48, 64, 6)
    assert v.frames.shape == (6, h, w, 3) and v.frames.dtype == np.uint8
    assert (v.source_fps, v.total_frames, v.sample_fps) == (30.0, 90, pytest.approx(2.0))
    assert v.grid == (3, h // 14, w // 14) and v.tokens == 3 * (h // 28) * (w // 28)
    check_content(v)


@pytest.mark.parametrize("key,total,fps,opts", [
    ("20@10", 20, 10, {}), ("7@7", 7, 7, {}), ("61@24", 61, 24, {}), ("300@30", 300, 30, {}),
    ("300@30", 300, 30, {"fps": 1.0}), ("300@30", 300, 30, {"nframes": 9}), ("61@24", 61, 24, {"max_frames": 6}),
    ("90@30", 90, 30, {"video_start": 1.0, "video_end": 2.0}), ("300@30", 300, 30, {"video_start": 4.5}),
    ("7@7", 7, 7, {"min_frames": 6}),
])
def test_files_match_qwen_vl_utils(videos, key, total, fps, opts):
    v = load_video(videos[key], **opts)
    assert v.indices == ref_indices(total, fps, **opts)
    assert v.total_frames == total and v.source_fps == pytest.approx(fps)
    count = vp.calculate_video_frame_range(opts, total, fps)[2]
    assert v.sample_fps == pytest.approx(len(v.indices) / count * fps)
    src_h, src_w = (32, 32) if key == "300@30" else (48, 64)
    assert v.frames.shape == (len(v.indices), *frame_size(src_h, src_w, len(v.indices)), 3)
    check_content(v, tol=6 if key == "20@10" else 3)  # mpeg4 is lossy


@pytest.mark.parametrize("key,opts", [
    ("90@30", {}), ("20@10", {}), ("300@30", {"fps": 1.0}), ("300@30", {"nframes": 10}), ("61@24", {"max_frames": 6}),
    ("90@30", {"video_start": 0.5, "video_end": 2.5}), ("90@30", {"min_pixels": 160 * 784}),
    ("90@30", {"max_pixels": 150000, "total_pixels": 40 * 784}),
])  # fmt: skip
def test_end_to_end_equal_to_qwen_vl_utils_fetch_video(videos, key, opts):
    """qwen-vl-utils' own reader (decord): the same frame indices and frame size, and close pixels (it resizes
    with torchvision's antialiased bicubic in float, we with PIL's bicubic in uint8)."""
    ele = {"video": str(videos[key]), "total_pixels": CAP_PIXELS, **opts}
    ref, meta = vp.fetch_video(ele, return_video_metadata=True)
    v = load_video(videos[key], **{k: x for k, x in ele.items() if k != "video"})
    assert v.indices == list(meta["frames_indices"])
    assert v.frames.shape == (ref.shape[0], ref.shape[2], ref.shape[3], 3)
    diff = np.abs(v.frames.astype(np.float32) - ref.permute(0, 2, 3, 1).numpy())
    assert diff.mean() < 3


def test_sources_and_options(videos):
    path = videos["90@30"]
    ref = load_video(path)
    for source in (str(path), f"file://{path}", path.read_bytes(), bytearray(path.read_bytes())):
        v = load_video(source)
        assert v.indices == ref.indices and np.array_equal(v.frames, ref.frames)
    v = load_video(path, resized_height=100, resized_width=150)
    assert v.frames.shape[1:3] == vp.smart_resize(100, 150, factor=28) == (112, 140)
    v = load_video(path, max_pixels=30000, min_pixels=10000)
    assert v.frames.shape[1:3] == ref_size(48, 64, 6, CAP_PIXELS, min_pixels=10000, max_pixels=30000)
    check_content(v)


def test_short_header_count_falls_back_to_decoded_frames(videos, monkeypatch):
    probe = video_mod._probe

    def probe_says_7_more(opener):  # as a header whose frame count is too high
        total, fps, h, w = probe(opener)
        return total + 7, fps, h, w

    monkeypatch.setattr(video_mod, "_probe", probe_says_7_more)
    with pytest.warns(UserWarning, match=r"^video \(.*a.mp4'\): only 90 of 97 frames decode"):
        v = load_video(videos["90@30"])
    assert v.total_frames == 90 and v.indices == ref_indices(90, 30)
    check_content(v)


def test_truncated_file_with_header_first_loads_the_frames_that_decode(videos, tmp_path):
    data = videos["faststart"].read_bytes()  # moov before mdat: the header survives the cut
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="frames decode"):
        v = load_video(tmp_path / "half.mp4")
    assert 2 <= v.total_frames < 90 and v.indices == ref_indices(v.total_frames, 30)
    check_content(v)


# ---------------------------------------------------------------- frame lists


def test_frame_list_of_pil_images_matches_qwen_vl_utils_shape():
    images = [Image.new("RGB", (64, 48), (level(k),) * 3) for k in range(3)]
    v = load_video(images)
    assert v.indices == [0, 1, 2, 2]  # padded to even by repeating the last frame
    assert (v.total_frames, v.sample_fps, v.source_fps) == (3, 2.0, 2.0)
    expected = vp.fetch_video({"video": images})
    assert v.frames.shape == (4, *expected.shape[2:], 3) == (4, 280, 392, 3)
    assert [int(f[100, 100, 0]) for f in v.frames] == [level(k) for k in (0, 1, 2, 2)]
    for size in [(1280, 720), (333, 517), (20, 700)]:
        frames = [Image.new("RGB", size)] * 5
        assert load_video(frames).frames.shape == (6, *vp.fetch_video({"video": frames}).shape[2:], 3)


def test_frame_list_of_arrays_paths_and_rgba(tmp_path):
    arrays = [np.full((48, 64, 3), level(k), np.uint8) for k in range(4)]
    v = load_video(arrays, fps=4.0)
    assert v.indices == [0, 1, 2, 3] and v.sample_fps == 4.0 and v.frames.shape[0] == 4
    paths = []
    for k, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{k}.png")
        paths.append(tmp_path / f"{k}.png")
    assert np.array_equal(load_video(paths).frames, v.frames)
    assert np.array_equal(load_video([f"file://{p}" for p in paths]).frames, v.frames)
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))  # transparent becomes white, as qwen-vl-utils
    assert load_video([rgba, rgba]).frames.min() == 255
    mixed = load_video([Image.new("RGB", (64, 48)), Image.new("RGB", (640, 480))])  # all take the first's size
    assert mixed.frames.shape == (2, 280, 392, 3)


def test_frame_list_over_cap_is_subsampled():
    frames = [np.zeros((720, 1280, 3), np.uint8)] * 7  # small list, tiny cap
    v = load_video(frames, max_tokens=400)
    assert v.tokens <= 400 and len(v.indices) % 2 == 0 and len(v.indices) < 8
    assert v.indices == torch.linspace(0, 6, len(v.indices)).round().long().tolist()
    assert v.sample_fps == pytest.approx(2.0 * len(v.indices) / 8)


# ---------------------------------------------------------------- errors name the item and the reason


def test_errors(tmp_path, videos):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    data = videos["90@30"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # moov atom at the end: cannot open
    fast = videos["faststart"].read_bytes()
    (tmp_path / "cut_fast.mp4").write_bytes(fast[: fast.index(b"mdat") + 20])  # header, but no frame data
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    one = make_video(tmp_path / "one.mp4", 1, 30)
    cases = [
        (str(tmp_path / "missing.mp4"), {}, "'.*missing.mp4'\\): no such file"),
        (tmp_path, {}, "not a regular file"),
        (str(text), {}, "notes.mp4'\\): not a readable video"),
        (str(tmp_path / "cut.mp4"), {}, "cut.mp4'\\): not a readable video"),
        (str(tmp_path / "cut_fast.mp4"), {}, "cut_fast.mp4'\\): no decodable frames"),
        (b"\x00garbage\xff" * 100, {}, "<900 bytes>\\): not a readable video"),
        (b"", {}, "empty data"),
        (str(audio), {}, "tone.wav'\\): no video stream"),
        (str(one), {}, "one.mp4'\\): cannot sample 0 frames from 1"),
        ([], {}, "<list of 0 frames>\\): empty frame list"),
        ([Image.new("RGB", (8, 8)), tmp_path / "nope.png"], {}, "frame 1 \\('.*nope.png'\\): file not found"),
        ([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3), np.float32)], {}, "frame 1 .*uint8"),
        ([Image.new("RGB", (8, 8)), str(text)], {}, "frame 1 .*not a readable image"),
        ([Image.new("RGB", (8, 8))], {"nframes": 2}, "nframes cannot be used with a list"),
        (str(videos["90@30"]), {"fps": 2.0, "nframes": 4}, "either fps or nframes"),
        (str(videos["90@30"]), {"fps": -1.0}, "fps must be positive"),
        (str(videos["90@30"]), {"video_start": 2.5, "video_end": 1.0}, "empty time range"),
        (12345, {}, "unsupported video source type int"),
    ]
    for source, opts, pattern in cases:
        with pytest.raises(MediaError, match=f"^video 3 \\(.*{pattern}") as info:
            load_video(source, name="video 3", **opts)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the decoded-video cache


def same_video(a: Video, b: Video) -> None:
    assert np.array_equal(a.frames, b.frames) and a.frames.dtype == b.frames.dtype
    assert (a.indices, a.sample_fps, a.source_fps, a.total_frames, a.original_size) == (
        b.indices, b.sample_fps, b.source_fps, b.total_frames, b.original_size)  # fmt: skip


def no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the clip is cached")


def test_cache_reads_a_clip_back_instead_of_decoding(videos, tmp_path, monkeypatch):
    cache = VideoCache(tmp_path / "cache")
    first = load_video(videos["90@30"], cache=cache, nframes=4)
    assert len(list((tmp_path / "cache").rglob("*.clip"))) == 1
    monkeypatch.setattr(video_mod, "_load_file", no_decoding)
    same_video(load_video(str(videos["90@30"]), cache=cache, nframes=4), first)  # str or Path: one entry
    same_video(load_video(f"file://{videos['90@30']}", cache=cache, nframes=4), first)
    # other options, another file, or no cache: never the cached clip
    for source, options in [(videos["90@30"], {"nframes": 6}), (videos["90@30"], {"nframes": 4, "max_pixels": 2000}),
                            (videos["7@7"], {"nframes": 4})]:  # fmt: skip
        with pytest.raises(AssertionError, match="decoded although"):
            load_video(source, cache=cache, **options)
    with pytest.raises(AssertionError, match="decoded although"):
        load_video(videos["90@30"], nframes=4)


def test_cache_is_never_stale(tmp_path):
    path = make_video(tmp_path / "clip.mp4", 20, 10)
    cache = VideoCache(tmp_path / "cache")
    before = load_video(path, cache=cache)
    make_video(path, 40, 10)  # the same name, other content
    after = load_video(path, cache=cache)
    assert (before.total_frames, after.total_frames) == (20, 40)
    same_video(after, load_video(path))
    check_content(after)


def test_unreadable_cache_entry_is_decoded_again(videos, tmp_path):
    cache = VideoCache(tmp_path / "cache")
    good = load_video(videos["20@10"], cache=cache)
    (entry,) = (tmp_path / "cache").rglob("*.clip")
    data = entry.read_bytes()
    for broken in (data[: len(data) // 2], data[:-200] + bytes(200), b"not a cache entry"):
        entry.write_bytes(broken)
        same_video(load_video(videos["20@10"], cache=cache), good)
        assert entry.read_bytes() == data  # written again, whole
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]


def test_cache_does_not_widen_access(videos, tmp_path):
    from qwen2vl.processing.sources import MediaAccess

    cache = VideoCache(tmp_path / "cache")
    load_video(videos["7@7"], cache=cache)
    with pytest.raises(MediaError, match="local files are not allowed|not allowed"):
        load_video(videos["7@7"], cache=cache, access=MediaAccess(local=False))


def test_media_loader_uses_its_cache_directory(videos, tmp_path, monkeypatch):
    from qwen2vl.processing.processor import MediaLoader

    loader = MediaLoader(video_cache=str(tmp_path / "cache"))
    first = loader.video({"type": "video", "video": str(videos["61@24"])}, nframes=4)
    monkeypatch.setattr(video_mod, "_load_file", no_decoding)
    same_video(loader.video({"type": "video", "video": str(videos["61@24"])}, nframes=4), first)
