"""Images: smart_resize and pixel_values equal to transformers' PIL-backend image processor; sizes equal to
qwen-vl-utils for its per-item options; every kind of source; EXIF and transparency; bad input named."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from qwen2vl.processing.errors import MediaError
from qwen2vl.processing.image import load_image, preprocess_image, smart_resize, target_size

# REFERENCE §4: input W x H -> resized W x H, grid, LLM tokens (default min/max pixels)
TOKEN_TABLE = [
    ((224, 224), (224, 224), (1, 16, 16), 64),
    ((640, 480), (644, 476), (1, 34, 46), 391),
    ((1000, 500), (1008, 504), (1, 36, 72), 648),
    ((1920, 1080), (1932, 1092), (1, 78, 138), 2691),
    ((3840, 2160), (3836, 2156), (1, 154, 274), 10549),
    ((4000, 3000), (4004, 2996), (1, 214, 286), 15301),
    ((8000, 6000), (4116, 3080), (1, 220, 294), 16170),
    ((100, 100), (112, 112), (1, 8, 8), 16),
    ((28, 28), (56, 56), (1, 4, 4), 4),
    ((14, 14), (56, 56), (1, 4, 4), 4),
    ((56, 56), (56, 56), (1, 4, 4), 4),
]


def noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


@pytest.mark.parametrize("size, resized, grid, tokens", TOKEN_TABLE)
def test_token_table(size, resized, grid, tokens):
    w, h = size
    rh, rw = smart_resize(h, w)
    assert (rw, rh) == resized
    assert (1, rh // 14, rw // 14) == grid and rh * rw // 784 == tokens


def test_smart_resize_equals_transformers_on_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(1, 9000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.choice([3136, 4 * 784, 256 * 784]))
        hi = int(rng.choice([12845056, 1280 * 784, 300 * 784]))
        assert smart_resize(h, w, 28, lo, hi) == ref(h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("w, h", [(224, 224), (640, 480), (500, 1000), (37, 1200), (1000, 33), (15, 15), (333, 777)])
def test_pixel_values_equal_transformers_pil_backend(w, h):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    image = noise(w, h, seed=w * h)
    ref = hf(images=[image], return_tensors="np")
    ours = preprocess_image(image)
    assert [list(ours.grid)] == ref["image_grid_thw"].tolist()
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= 1e-6


def test_pixel_values_with_a_smaller_budget_equal_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = noise(1300, 900, seed=3)
    hf = Qwen2VLImageProcessorPil(min_pixels=256 * 784, max_pixels=512 * 784)
    ref = hf(images=[image], return_tensors="np")
    ours = preprocess_image(image, min_pixels=256 * 784, max_pixels=512 * 784)
    assert [list(ours.grid)] == ref["image_grid_thw"].tolist() and ours.tokens <= 512
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= 1e-6


@pytest.mark.parametrize(
    "w, h, item",
    [
        (1920, 1080, {"max_pixels": 256 * 784}),
        (300, 200, {"min_pixels": 512 * 784}),
        (640, 480, {"min_pixels": 100 * 784, "max_pixels": 200 * 784}),
        (640, 480, {"resized_height": 280, "resized_width": 420}),
        (640, 480, {"resized_height": 300, "resized_width": 401}),
        (999, 31, {}),
    ],
)
def test_per_item_options_give_qwen_vl_utils_sizes(w, h, item):
    from qwen_vl_utils import fetch_image

    image = noise(w, h)
    ref = fetch_image({"image": image, **item})
    assert target_size(h, w, **item)[::-1] == ref.size


def test_patch_order_is_2x2_windows():
    """The first 8 patches come from (row, col) (0,0),(0,1),(1,0),(1,1),(0,2),(0,3),(1,2),(1,3) (REFERENCE §4)."""
    h, w = 56, 112
    a = np.zeros((h, w, 3), np.uint8)
    for r in range(h // 14):
        for c in range(w // 14):
            a[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = (r * 10, c * 10, 0)
    x = preprocess_image(Image.fromarray(a), min_pixels=1, max_pixels=10**8)
    mean, std = 0.48145466, 0.26862954
    red = x.pixel_values[:, 0] * std + mean  # first value of each patch: channel 0, t 0, (0, 0)
    green = x.pixel_values[:, 2 * 196] * 0.26130258 + 0.4578275
    order = [(round(r * 255 / 10), round(g * 255 / 10)) for r, g in zip(red[:8], green[:8])]
    assert order == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    # both temporal copies are the same frame
    p = x.pixel_values.reshape(-1, 3, 2, 14, 14)
    assert np.array_equal(p[:, :, 0], p[:, :, 1])


def png_bytes(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_every_kind_of_source_gives_the_same_image(tmp_path):
    image = noise(64, 48)
    data = png_bytes(image)
    (tmp_path / "a.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    sources = [image, data, str(tmp_path / "a.png"), tmp_path / "a.png", f"file://{tmp_path / 'a.png'}", url]
    for s in sources:
        assert np.array_equal(np.asarray(load_image(s)), np.asarray(image)), s


def test_exif_orientation_is_applied():
    image = noise(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = load_image(png_bytes(image, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (30, 60)


def test_transparency_is_composited_on_white():
    a = np.zeros((20, 20, 4), np.uint8)
    a[..., 0] = 200
    a[:10, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    loaded = np.asarray(load_image(png_bytes(Image.fromarray(a, "RGBA"))))
    assert (loaded[15, 5] == 255).all()
    assert tuple(loaded[5, 5]) == (200, 0, 0)
    grey = load_image(noise(10, 10, mode="L"))
    assert grey.mode == "RGB"


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: b"definitely not an image", "not a readable image"),
        (lambda p: png_bytes(noise(64, 64))[:200], "corrupt or truncated"),
        (lambda p: str(p / "missing.png"), "no such file"),
        (lambda p: (p / "notes.txt").write_text("hello") and str(p / "notes.txt"), "not a readable image"),
        (lambda p: "data:image/png;base64,@@@not-base64", "invalid base64"),
        (lambda p: "data:image/png,rawdata", "must be base64"),
        (lambda p: str(p), "not a regular file"),
        (lambda p: 12345, "expected a path, URL"),
    ],
)
def test_bad_images_are_named_with_the_reason(tmp_path, make, reason):
    with pytest.raises(MediaError) as e:
        load_image(make(tmp_path), name="image 2")
    assert "image 2" in str(e.value) and reason in str(e.value)


def test_zero_size_and_extreme_aspect_ratio_are_refused():
    with pytest.raises(MediaError, match="empty"):
        load_image(Image.new("RGB", (0, 10)), name="image 1")
    with pytest.raises(MediaError, match="aspect ratio 250:1"):
        preprocess_image(Image.new("RGB", (5000, 20)))
