"""The processor end to end: equal to transformers' Qwen2VLProcessor (PIL image backend, the genuine tokenizer)
for the same conversations; left padding; placeholder counts; per-call and per-item options; errors named."""

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.processing.errors import MediaError


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def text(t):
    return {"type": "text", "text": t}


def image(x, **kw):
    return {"type": "image", "image": x, **kw}


def assert_same(ours, ref, keys=None):
    keys = keys or [k for k in ours]
    assert set(ours) <= set(ref)
    for k in keys:
        a, b = ours[k], ref[k]
        assert a.shape == b.shape, k
        if a.dtype.is_floating_point:
            assert (a - b).abs().max() <= 1e-6, k
        else:
            assert torch.equal(a, b.to(a.dtype)), k


def test_one_conversation_equals_transformers(processor, hf_processor):
    conversation = [
        {"role": "user", "content": [image(noise(640, 480)), text("Describe this image. 你好 12345")]},
        {"role": "assistant", "content": "It is noise."},
        {"role": "user", "content": [text("And these?"), image(noise(300, 100, 1)), image(noise(57, 911, 2))]},
    ]
    ref = hf_processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    ours = processor(conversation)
    assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    assert_same(ours, ref)
    assert [m.tokens for m in ours.media] == [391, 44, 66]  # 644x476, 308x112, 56x924


def test_a_batch_is_left_padded_and_equals_transformers(processor, hf_processor):
    batch = [
        [{"role": "user", "content": [image(noise(224, 224)), text("What is it?")]}],
        [{"role": "user", "content": "Plain text, a longer question than the other one, no image at all."}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [image(noise(100, 400, 3)), image(noise(90, 90, 4)), text("Same?")]}],
    ]  # fmt: skip
    ref = hf_processor.apply_chat_template(
        batch, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt", padding=True
    )
    ours = processor(batch)
    assert_same(ours, ref)
    assert ours["attention_mask"][:, -1].all()  # left padded
    lengths = ours["attention_mask"].sum(-1)
    assert lengths.max() == ours["input_ids"].shape[1] and lengths.min() < lengths.max()
    assert [(m.conversation, m.index) for m in ours.media] == [(0, 0), (2, 1), (2, 2)]


def test_224_image_is_66_tokens_with_vision_start_and_end(processor):
    ids = processor([{"role": "user", "content": [image(noise(224, 224))]}])["input_ids"][0].tolist()
    start, end = ids.index(151652), ids.index(151653)
    assert end - start + 1 == 66 and ids.count(151655) == 64


def test_text_only_has_no_media_keys(processor):
    out = processor([{"role": "user", "content": "hi"}])
    assert set(out) == {"input_ids", "attention_mask"} and out.media == []


def test_per_call_and_per_item_budgets(processor):
    big = noise(1920, 1080)
    conversation = [{"role": "user", "content": [image(big), image(big, max_pixels=64 * 784), text("?")]}]
    out = processor(conversation, max_pixels=256 * 784)
    assert [m.tokens for m in out.media] == [252, 60]  # call-level 256-token budget; the item's own 64 wins
    assert out.media[0].size == (336, 588) and out.media[0].original_size == (1080, 1920)
    assert out["input_ids"][0].tolist().count(151655) == 252 + 60
    with pytest.raises(TypeError, match="unknown media options"):
        processor(conversation, max_pixel=5)


def test_image_sources_in_messages(processor, tmp_path):
    noise(64, 64).save(tmp_path / "a.png")
    for part in [{"type": "image", "image": str(tmp_path / "a.png")}, {"type": "image", "url": str(tmp_path / "a.png")},
                 {"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'a.png'}"}},
                 {"image": tmp_path / "a.png"}]:  # fmt: skip
        out = processor([{"role": "user", "content": [part]}])
        assert out["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_errors_name_the_item(processor, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    conversation = [{"role": "user", "content": [image(noise(50, 50)), image(str(tmp_path / "bad.png"))]}]
    with pytest.raises(MediaError, match=r"image 2 \('.*bad.png'\): corrupt or truncated"):
        processor(conversation)
    with pytest.raises(MediaError, match="image 1.*aspect ratio"):
        processor([{"role": "user", "content": [image(Image.new("RGB", (3000, 10)))]}])
    with pytest.raises(MediaError, match="1 image placeholder"):
        processor([{"role": "user", "content": [text("a literal <|image_pad|> token")]}], max_pixels=None)


def write_video(path, n=30, fps=10, w=96, h=64):
    """A small video whose frames change colour over time."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0] = (i * 8) % 256
            a[: h // 2, : w // 2, 1] = 255 - (i * 8) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24").reformat(format="yuv444p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_video_conversation_equals_transformers_on_the_same_frames(processor, hf_processor, tmp_path):
    """Frames are chosen and resized by our video loader (qwen-vl-utils' rules, tested in test_video.py); given
    those frames, transformers' processor must produce the same ids, grid and pixel values."""
    from qwen2vl.processing.video import load_video

    path = write_video(tmp_path / "clip.mp4")
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": noise(200, 150)}, {"type": "video", "video": str(path)},
        {"type": "text", "text": "What changes?"}]}]  # fmt: skip
    ours = processor(conversation)
    video = load_video(str(path))
    assert ours.media[1].frame_indices == video.indices == [0, 6, 12, 17, 23, 29]  # 3 s at 2 fps: linspace(0, 29, 6)
    ref = hf_processor(
        text=[processor.render(conversation)], images=[noise(200, 150)], videos=[video.frames],
        do_sample_frames=False, return_tensors="pt",
    )  # fmt: skip
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert ours["video_grid_thw"].tolist() == [[3, *(s // 14 for s in video.frames.shape[1:3])]]
    # transformers' video path normalises in one fused torch op: equal up to float rounding
    assert (ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max() < 1e-5
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-6


def test_video_options_per_item_and_per_call(processor, tmp_path):
    path = str(write_video(tmp_path / "clip.mp4"))
    one = lambda **kw: [{"role": "user", "content": [{"type": "video", "video": path, **kw}]}]  # noqa: E731
    assert processor(one())["video_grid_thw"][0, 0] == 3
    assert processor(one(), fps=4)["video_grid_thw"][0, 0] == 6
    assert processor(one(fps=1), fps=4)["video_grid_thw"][0, 0] == 2  # the item wins
    assert processor(one(nframes=8))["video_grid_thw"][0, 0] == 4
    default, bigger = processor(one()).media[0], processor(one(), min_pixels=256 * 784).media[0]
    assert default.tokens == 3 * 140 and bigger.tokens >= 3 * 256  # a 96x64 clip is upscaled to the frame floor


def test_a_bad_video_is_named(processor, tmp_path):
    (tmp_path / "fake.mp4").write_text("this is not a video")
    conversation = [{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "fake.mp4")}]}]
    with pytest.raises(MediaError, match=r"video 1 \('.*fake.mp4'\): not a readable video"):
        processor(conversation)


def test_images_from_urls_with_a_fetch_policy(processor_dir, tmp_path):
    """An http URL served on loopback: refused by the default policy, fetched with one that allows it; a
    failing URL is named."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    from helpers import loopback_server
    from qwen2vl.processing.fetch import FetchPolicy
    from qwen2vl.processing.processor import Processor
    from qwen2vl.processing.sources import MediaAccess

    noise(100, 80).save(tmp_path / "cat.png")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    one = lambda url: [{"role": "user", "content": [image(url), text("?")]}]  # noqa: E731
    with loopback_server(handler) as base:
        default = Processor.from_pretrained(processor_dir)
        with pytest.raises(MediaError, match=r"image 1 \('http://127.0.0.1:\d+/cat.png'\): .*non-public address"):
            default(one(base + "/cat.png"))
        trusting = Processor.from_pretrained(processor_dir, access=MediaAccess(fetch=FetchPolicy(allow_private=True)))
        assert trusting(one(base + "/cat.png"))["image_grid_thw"].tolist() == [[1, 6, 8]]
        with pytest.raises(MediaError, match=r"image 1 \('http://127.0.0.1:\d+/dog.png'\): HTTP 404"):
            trusting(one(base + "/dog.png"))
