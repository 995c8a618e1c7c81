"""The decoded-video cache (qwen2vl.processing.video_cache): keyed by content, bounded by LRU eviction, safe when
several processes share a directory, and wired into the MediaLoader, training's and the server's flags."""

from __future__ import annotations

import base64
import multiprocessing
import os
import random
import shutil
import time

import av
import numpy as np
import pytest

import qwen2vl.processing.video as video_mod
from qwen2vl.processing.video import load_video
from qwen2vl.processing.video_cache import STALE_TEMP_SECONDS, VideoCache, parse_size
from test_video import no_decoding, same_video

SMALL = {"nframes": 4, "min_pixels": 28 * 28, "max_pixels": 56 * 56}  # 56x56 frames: entries of ~38 kB


def make_clip(path, n=8, fps=8, seed=0, w=64, h=48):
    """n lossless frames of noise drawn from ``seed``: clips of other seeds differ in content, not in size."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        s.options = {"preset": "ultrafast", "qp": "0"}
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame.reformat(format="yuv444p")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return [make_clip(d / f"clip{i}.mp4", seed=i) for i in range(4)]


def names(cache: VideoCache) -> set[str]:
    return {path.name for _, _, path in cache.entries()}


def stored_bytes(cache: VideoCache) -> int:
    return sum(size for _, size, _ in cache.entries())


# ---------------------------------------------------------------- the key


def test_a_hit_is_the_decode_without_decoding_and_the_key_is_the_content(clips, tmp_path, monkeypatch):
    cache = VideoCache(tmp_path / "cache")
    fresh = load_video(clips[0], **SMALL)
    same_video(load_video(clips[0], cache=cache, **SMALL), fresh)
    assert len(cache.entries()) == 1
    copy = shutil.copy(clips[0], tmp_path / "renamed.mkv.bin")
    with monkeypatch.context() as m:
        m.setattr(video_mod, "_load_file", no_decoding)
        same_video(load_video(clips[0], cache=cache, **SMALL), fresh)
        same_video(load_video(str(copy), cache=cache, **SMALL), fresh)  # another name, the same bytes
        same_video(load_video(clips[0].read_bytes(), cache=cache, **SMALL), fresh)  # bytes meet the file's entry
        for options in ({**SMALL, "nframes": 6}, {**SMALL, "max_pixels": 28 * 28 * 2}, {**SMALL, "max_tokens": 100}):
            with pytest.raises(AssertionError, match="decoded although"):  # other settings: never that entry
                load_video(clips[0], cache=cache, **options)
        with pytest.raises(AssertionError, match="decoded although"):
            load_video(clips[1], cache=cache, **SMALL)
    make_clip(copy, seed=9)  # the same name, other content
    changed = load_video(copy, cache=cache, **SMALL)
    assert not np.array_equal(changed.frames, fresh.frames)
    same_video(changed, load_video(copy, **SMALL))
    assert len(cache.entries()) == 2


def test_bytes_alone_are_cached(clips, tmp_path, monkeypatch):
    cache = VideoCache(tmp_path / "cache")
    data = clips[2].read_bytes()
    first = load_video(data, cache=cache, **SMALL)
    monkeypatch.setattr(video_mod, "_load_file", no_decoding)
    same_video(load_video(data, cache=cache, **SMALL), first)
    same_video(load_video(clips[2], cache=cache, **SMALL), first)


def test_an_entry_of_another_key_is_not_taken(clips, tmp_path):
    cache = VideoCache(tmp_path / "cache")
    load_video(clips[0], cache=cache, **SMALL)
    ((_, _, entry),) = cache.entries()
    other = cache.path(cache.key(clips[1], {**video_mod_defaults(), **SMALL}))
    other.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(entry, other)  # a file under the wrong name: its stored key says whose it is
    same_video(load_video(clips[1], cache=cache, **SMALL), load_video(clips[1], **SMALL))


def video_mod_defaults() -> dict:
    """The settings load_video puts in a key when only SMALL is given."""
    return {"fps": None, "nframes": None, "min_frames": None, "max_frames": None, "video_start": None,
            "video_end": None, "min_pixels": None, "max_pixels": None, "total_pixels": None, "resized_height": None,
            "resized_width": None, "max_tokens": video_mod.VIDEO_MAX_TOKENS}  # fmt: skip


# ---------------------------------------------------------------- the bound


def test_lru_eviction_keeps_the_most_recently_used(clips, tmp_path):
    probe = VideoCache(tmp_path / "probe")
    load_video(clips[0], cache=probe, **SMALL)
    entry = stored_bytes(probe)  # every clip's entry has this size (same frame count and size)
    cache = VideoCache(tmp_path / "cache", max_bytes=int(entry * 2.5))
    keys = [cache.path(cache.key(c, {**video_mod_defaults(), **SMALL})).name for c in clips]

    def load(i):
        time.sleep(0.02)  # distinct mtimes even where the file system's clock is coarse
        return load_video(clips[i], cache=cache, **SMALL)

    load(0), load(1)
    assert names(cache) == {keys[0], keys[1]}
    load(0)  # a hit: clip 0 is now the most recently used
    load(2)
    assert names(cache) == {keys[0], keys[2]}  # clip 1, the least recently used, went
    same_video(load(3), load_video(clips[3], **SMALL))
    assert names(cache) == {keys[2], keys[3]} and stored_bytes(cache) <= cache.max_bytes


def test_a_clip_bigger_than_the_bound_is_returned_not_kept(clips, tmp_path):
    for max_bytes in (0, 1000):
        cache = VideoCache(tmp_path / f"cache{max_bytes}", max_bytes=max_bytes)
        same_video(load_video(clips[0], cache=cache, **SMALL), load_video(clips[0], **SMALL))
        assert cache.entries() == []


def test_eviction_ignores_writes_in_progress_and_removes_stale_temporaries(clips, tmp_path):
    cache = VideoCache(tmp_path / "cache", max_bytes=10**6)
    load_video(clips[0], cache=cache, **SMALL)
    ((_, size, entry),) = cache.entries()
    fresh = entry.parent / f".{entry.name}.abc123.tmp"  # how atomic.write_file names its temporaries
    stale = entry.parent / f".{entry.name}.def456.tmp"
    for tmp in (fresh, stale):
        tmp.write_bytes(bytes(2 * 10**6))  # over the bound: counted, they would evict the entry
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    cache.evict()
    assert entry.exists() and fresh.exists() and not stale.exists()
    assert stored_bytes(cache) == size


def test_eviction_tolerates_entries_vanishing_under_it(clips, tmp_path, monkeypatch):
    cache = VideoCache(tmp_path / "cache")
    for c in clips[:3]:
        load_video(c, cache=cache, **SMALL)
    listing = cache.entries()
    for _, _, path in listing[:2]:
        path.unlink()  # another process evicted them after our listing
    cache.max_bytes = 1
    monkeypatch.setattr(cache, "entries", lambda: listing)
    cache.evict()
    assert not any(path.exists() for _, _, path in listing)
    monkeypatch.undo()
    assert cache.entries() == []


def test_an_entry_evicted_before_it_is_opened_is_a_miss(clips, tmp_path, monkeypatch):
    from qwen2vl.processing import video_cache

    cache = VideoCache(tmp_path / "cache")
    first = load_video(clips[0], cache=cache, **SMALL)
    read = video_cache._read

    def evicted_first(entry, key):
        entry.unlink()  # another process's eviction, between our key and our open
        return read(entry, key)

    monkeypatch.setattr(video_cache, "_read", evicted_first)
    same_video(load_video(clips[0], cache=cache, **SMALL), first)  # decoded again, and kept again
    assert len(cache.entries()) == 1


def test_a_cache_that_cannot_be_written_still_loads(clips, tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cache = VideoCache(blocker / "cache", max_bytes=10**6)
    same_video(load_video(clips[0], cache=cache, **SMALL), load_video(clips[0], **SMALL))
    assert "could not keep a clip" in caplog.text


# ---------------------------------------------------------------- many processes, one directory


def hammer(directory: str, max_bytes: int, paths: list[str], references: list[np.ndarray], seed: int) -> int:
    """Load the clips many times in random order (some as bytes) through one shared directory; every clip must
    equal its reference. Returns how many loads were hits."""
    decodes = 0
    decode = video_mod._load_file

    def counting(*args, **kwargs):
        nonlocal decodes
        decodes += 1
        return decode(*args, **kwargs)

    video_mod._load_file = counting
    try:
        cache = VideoCache(directory, max_bytes)
        rng = random.Random(seed)
        loads = 40
        for _ in range(loads):
            i = rng.randrange(len(paths))
            source = paths[i] if rng.random() < 0.7 else open(paths[i], "rb").read()
            frames = load_video(source, cache=cache, **SMALL).frames
            if not np.array_equal(frames, references[i]):
                raise AssertionError(f"process {seed}: clip {i} read back different frames")
    finally:  # a pool process may run another task
        video_mod._load_file = decode
    return loads - decodes


def test_processes_sharing_a_bounded_directory(clips, tmp_path):
    references = [load_video(c, **SMALL).frames for c in clips]
    probe = VideoCache(tmp_path / "probe")
    load_video(clips[0], cache=probe, **SMALL)
    max_bytes = int(stored_bytes(probe) * 2.5)  # 2 of the 4 clips fit: constant eviction
    directory = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("forkserver")  # a clean parent (no torch threads); imports paid once
    ctx.set_forkserver_preload(["qwen2vl.processing.video"])
    with ctx.Pool(4) as pool:
        hits = pool.starmap(hammer, [(directory, max_bytes, [str(c) for c in clips], references, seed)
                                     for seed in range(4)])  # fmt: skip
    assert sum(hits) > 0  # the cache was used, not only written
    cache = VideoCache(directory, max_bytes)
    assert 0 < stored_bytes(cache) <= max_bytes
    assert not [p for p in (tmp_path / "shared").rglob("*.tmp")]


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("1024", 1024), ("100B", 100), ("1K", 1024), ("1kb", 1024), ("1KiB", 1024), ("512M", 512 * 2**20),
    ("2G", 2 * 2**30), ("10g", 10 * 2**30), ("1.5G", 3 * 2**29), (" 3 T ", 3 * 2**40), (".5K", 512), (7, 7),
])  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "1X", "-1", "1.5", "1KiBB", "1 000", "ten", "1e9", "0.3K"])
def test_parse_size_names_a_bad_value(text):
    with pytest.raises(ValueError, match=f"not a size: {text!r}"):
        parse_size(text)


# ---------------------------------------------------------------- the loader, training's and the server's flags


def test_media_loader_builds_one_cache_and_follows_its_fields(clips, tmp_path, monkeypatch):
    from qwen2vl.processing.processor import MediaLoader

    part = {"type": "video", "video": str(clips[0]), **SMALL}
    loader = MediaLoader(video_cache=str(tmp_path / "a"), video_cache_size=10**6)
    assert loader.cache() is loader.cache() and loader.cache().max_bytes == 10**6
    first = loader.video(part)
    with monkeypatch.context() as m:
        m.setattr(video_mod, "_load_file", no_decoding)
        same_video(loader.video(part), first)
    loader.video_cache = str(tmp_path / "b")  # as training sets it on the processor's loader
    assert loader.cache().directory == tmp_path / "b"
    loader.video(part)
    assert len(VideoCache(tmp_path / "b").entries()) == 1
    assert MediaLoader().cache() is None


def test_cli_flags(tmp_path, monkeypatch, capsys):
    import qwen2vl.serve.app as app
    from qwen2vl.cli import main

    for verb in ("serve", "train"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--video-cache DIR" in out and "--video-cache-size SIZE" in out
    seen = []
    monkeypatch.setattr(app, "serve", lambda model, host, port, dtype, device, config, quantize=None:
                        seen.append(config))  # fmt: skip
    cache = str(tmp_path / "cache")
    assert main(["serve", str(tmp_path), "--video-cache", cache, "--video-cache-size", "3G"]) == 0
    assert main(["serve", str(tmp_path), "--video-cache", cache]) == 0
    assert main(["serve", str(tmp_path)]) == 0
    assert [(c.video_cache, c.video_cache_size) for c in seen] == [
        (cache, 3 * 2**30), (cache, 10 * 2**30), (None, 10 * 2**30)]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--video-cache-size", "3X"])
    assert e.value.code == 2 and "not a size: '3X'" in capsys.readouterr().err


def test_the_server_reads_a_posted_video_back(small_checkpoint, tmp_path, monkeypatch):
    import qwen2vl
    from test_processor import write_video
    from test_serve import KEY, Live

    from qwen2vl.serve.app import ServerConfig

    clip = write_video(tmp_path / "clip.mp4").read_bytes()
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(clip).decode()}}
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    cache = VideoCache(tmp_path / "cache")
    config = ServerConfig(api_key=KEY, max_model_len=1024, video_cache=str(cache.directory), video_cache_size=2**26)
    server = Live(qwen2vl.load(small_checkpoint), config)
    try:
        first = server.post(body)
        assert first.status_code == 200, first.text
        assert len(cache.entries()) == 1
        monkeypatch.setattr(video_mod, "_load_file", no_decoding)
        second = server.post(body)
        assert second.status_code == 200, second.text
        assert second.json()["usage"]["media"] == first.json()["usage"]["media"]
    finally:
        server.close()
