"""Grounding text (REFERENCE §7): parsing, writing, stripping and drawing boxes; offline and fast."""

import os
import random

import pytest
from PIL import Image

from qwen2vl.processing import grounding
from qwen2vl.processing.errors import MediaError
from qwen2vl.processing.grounding import Box, draw_boxes, format_box, parse_boxes, strip_grounding

REF, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"


def box(x1, y1, x2, y2):
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def coords(b: Box):
    return (b.x1, b.y1, b.x2, b.y2)


# --- parse ---------------------------------------------------------------------------------------------------------

def test_single_labelled_box():
    (b,) = parse_boxes(f"{REF}the red car{REF_END}{box(120, 200, 340, 560)}")
    assert coords(b) == (120, 200, 340, 560) and b.label == "the red car"


def test_several_boxes_with_and_without_labels():
    text = f"A {REF}dog{REF_END}{box(1, 2, 3, 4)} next to {box(10, 20, 30, 40)} and a {REF}cat{REF_END}{box(5, 6, 7, 8)}."
    boxes = parse_boxes(text)
    assert [coords(b) for b in boxes] == [(1, 2, 3, 4), (10, 20, 30, 40), (5, 6, 7, 8)]
    assert [b.label for b in boxes] == ["dog", None, "cat"]  # the bare box after "next to" is not the dog


def test_one_label_with_two_boxes():
    boxes = parse_boxes(f"{REF}cars{REF_END}{box(1, 2, 3, 4)}, {box(11, 12, 13, 14)} are parked")
    assert [b.label for b in boxes] == ["cars", "cars"]
    assert [coords(b) for b in boxes] == [(1, 2, 3, 4), (11, 12, 13, 14)]


def test_spaces_inside_a_box():
    (b,) = parse_boxes(f"{REF} tree {REF_END}<|box_start|>( 12 , 34 ) , ( 56 , 78 )<|box_end|>")
    assert coords(b) == (12, 34, 56, 78) and b.label == "tree"


def test_stripped_markup_fallback():
    boxes = parse_boxes("the red car(120,200),(340,560) and a bike( 1 , 2 ), ( 3 , 4 )")
    assert [coords(b) for b in boxes] == [(120, 200, 340, 560), (1, 2, 3, 4)]
    assert all(b.label is None for b in boxes)
    assert parse_boxes("no boxes (1,2) here, (a,b),(c,d)") == []


def test_malformed_spans_are_ignored():
    text = (f"{box(1, 2, 3, 4)}<|box_start|>(1,2)<|box_end|><|box_start|>(x,2),(3,4)<|box_end|>"
            f"<|box_start|>(1,2),(3,4),(5,6)<|box_end|><|box_start|>(9,9),(9,9)"  # unclosed ...
            f"{box(5, 6, 7, 8)}<|box_end|>")  # ... must not swallow the good box after it
    assert [coords(b) for b in parse_boxes(text)] == [(1, 2, 3, 4), (5, 6, 7, 8)]


def test_swapped_corners_are_ordered():
    (b,) = parse_boxes(box(300, 400, 100, 200))
    assert coords(b) == (100, 200, 300, 400)


def test_quad_becomes_its_bounding_box():
    (b,) = parse_boxes(f"{REF}EXIT{REF_END}<|quad_start|>(10,20),(90,25),(85,70),(12,60)<|quad_end|>")
    assert coords(b) == (10, 20, 90, 70) and b.label == "EXIT"


def test_pixel_conversion():
    (b,) = parse_boxes(box(500, 500, 250, 750), 640, 480)
    assert coords(b) == pytest.approx((160, 240, 320, 360))
    assert coords(Box(500, 500, 500, 500).to_pixels(640, 480)) == pytest.approx((320, 240, 320, 240))
    with pytest.raises(ValueError):
        parse_boxes(box(1, 2, 3, 4), 640, None)


# --- format / round trip ---------------------------------------------------------------------------------------------

def test_format_box():
    assert format_box((120, 200, 340, 560), label="the red car") == f"{REF}the red car{REF_END}{box(120, 200, 340, 560)}"
    assert format_box(Box(1, 2, 3, 4)) == box(1, 2, 3, 4)
    assert format_box(Box(320, 240, 640, 480, "x"), 640, 480) == f"{REF}x{REF_END}{box(500, 500, 999, 999)}"
    with pytest.raises(ValueError):
        format_box((0, 0, 1000, 5))  # not normalised, and no size given to normalise it


def test_round_trip_within_one_unit():
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(1, 5000), rng.randint(1, 5000)
        xs, ys = sorted(rng.uniform(0, w) for _ in range(2)), sorted(rng.uniform(0, h) for _ in range(2))
        original = Box(xs[0], ys[0], xs[1], ys[1], rng.choice([None, "obj"]))
        (back,) = parse_boxes(format_box(original, w, h), w, h)
        assert back.label == original.label
        for a, b, size in zip(coords(original), coords(back), (w, h, w, h)):
            assert abs(a - b) <= size / 1000 + 1e-9


def test_to_normalized_rounds_and_clamps():
    assert coords(Box(-5, 0.4, 640, 479.9).to_normalized(640, 480)) == (0, 1, 999, 999)


def test_strip_grounding():
    text = f"There is {REF}the red car{REF_END}{box(1, 2, 3, 4)} {box(5, 6, 7, 8)} and a tree {box(9, 9, 9, 9)}."
    assert strip_grounding(text) == "There is the red car and a tree."
    assert strip_grounding("the red car(120,200),(340,560) is parked") == "the red car is parked"


# --- iou -------------------------------------------------------------------------------------------------------------

def test_iou():
    a = Box(0, 0, 10, 10)
    assert a.iou(Box(0, 0, 10, 10, "same")) == 1.0
    assert a.iou(Box(20, 20, 30, 30)) == 0.0
    assert a.iou(Box(10, 0, 20, 10)) == 0.0  # touching edges only
    # overlap 5x10 = 50, union 100 + 100 - 50 = 150
    assert a.iou(Box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert Box(0, 0, 4, 4).iou(Box(2, 2, 6, 8)) == pytest.approx(4 / (16 + 24 - 4))


# --- draw ------------------------------------------------------------------------------------------------------------

GREY = (128, 128, 128)


def test_draw_outline_inside_outside():
    src = Image.new("RGB", (200, 150), GREY)
    out = draw_boxes(src, [Box(40, 50, 160, 120, "car")])
    assert out.size == src.size and out.mode == "RGB"
    assert src.getpixel((40, 85)) == GREY  # the caller's image is untouched
    for xy in [(40, 85), (160, 85), (100, 50), (100, 120), (42, 52)]:  # the outline, 3 px thick inward
        assert out.getpixel(xy) != GREY, xy
    for xy in [(100, 85), (60, 70), (150, 110), (10, 10), (190, 140), (100, 135), (20, 85), (180, 40)]:
        assert out.getpixel(xy) == GREY, xy
    assert out.getpixel((41, 48)) != GREY  # the label tag sits just above the box


def test_draw_label_inside_when_box_touches_top():
    out = draw_boxes(Image.new("RGB", (200, 150), GREY), [Box(30, 0, 120, 100, "top")])
    assert out.getpixel((36, 6)) != GREY  # the tag, inside the box under its top edge
    assert out.getpixel((75, 60)) == GREY


def test_draw_colours_per_label_and_box():
    boxes = [Box(10, 10, 50, 50, "a"), Box(60, 10, 100, 50, "a"), Box(110, 10, 150, 50, "b"),
             Box(10, 60, 50, 100), Box(60, 60, 100, 100), Box(500, 500, 600, 600, "off the image")]
    out = draw_boxes(Image.new("RGB", (200, 150), GREY), boxes)
    c = [out.getpixel((x, 30)) for x in (10, 60, 110)] + [out.getpixel((x, 80)) for x in (10, 60)]
    assert c[0] == c[1] and len({c[0], c[2], c[3], c[4]}) == 4


def test_draw_from_path_and_save(tmp_path):
    src = tmp_path / "in.jpg"
    Image.new("RGB", (320, 240), GREY).save(src)
    dest = tmp_path / "out.png"
    out = draw_boxes(str(src), [Box(10, 20, 100, 200, "thing")], dest)
    with Image.open(dest) as saved:
        assert saved.format == "PNG" and saved.size == (320, 240)
        assert saved.convert("RGB").tobytes() == out.tobytes()
    assert sorted(os.listdir(tmp_path)) == ["in.jpg", "out.png"]


def test_unreadable_image_is_a_media_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    for source in (bad, tmp_path / "missing.png", 42):
        with pytest.raises(MediaError):
            draw_boxes(source, [])


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "out.png"
    dest.write_bytes(b"old picture")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(grounding.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        draw_boxes(Image.new("RGB", (50, 40), GREY), [Box(1, 1, 20, 20, "x")], dest)
    assert dest.read_bytes() == b"old picture"
    assert os.listdir(tmp_path) == ["out.png"]  # no temporary file left behind


def test_draw_in_given_colours_and_dashed():
    boxes = [Box(20, 20, 90, 90, "the blue square\nIoU 0.00 wrong"), Box(110, 20, 180, 90)]
    solid = draw_boxes(Image.new("RGB", (200, 150), GREY), boxes, colours=[(40, 80, 230), "red"])
    assert solid.getpixel((20, 60)) == (40, 80, 230) and solid.getpixel((110, 60)) == (255, 0, 0)
    dashed = draw_boxes(Image.new("RGB", (200, 150), GREY), boxes[1:], colours=["red"], dashed=True)
    edge = [dashed.getpixel((110, y)) for y in range(20, 91)]  # the left edge: dashes of red, gaps of grey
    assert edge.count((255, 0, 0)) > 0.4 * len(edge) and edge.count(GREY) > 0.2 * len(edge)
    assert dashed.getpixel((145, 55)) == GREY  # still only an outline
    with pytest.raises(ValueError, match="2 colours for 1 boxes"):
        draw_boxes(Image.new("RGB", (50, 40), GREY), boxes[:1], colours=["red", "blue"])
