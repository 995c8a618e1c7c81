"""Qwen2-VL grounding: boxes written as text in answers (REFERENCE §7), parsed, written and drawn.

The model writes ``<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``:
top-left and bottom-right corners, integers in [0,1000) relative to the *original* image size, whatever the resize
(pixel ``x = x_norm / 1000 * W``). A label applies to every box after it until word-like text intervenes; a box
may have no label. A ``<|quad_start|>`` span (four points, OCR) is returned as its bounding box.

Text decoded with special tokens stripped (``the red car(120,200),(340,560)``) is parsed as a fallback when no markup
token is present at all: each ``(x,y),(x,y)`` pair is a box labelled ``None``, since where the phrase started is lost
(a stripped quad reads as two boxes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageColor, ImageDraw, ImageFont

from ..atomic import write_file
from .image import load_image

_NUM = r"(\d+(?:\.\d+)?)"
_POINT = rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)"
_POINTS = re.compile(rf"\s*{_POINT}(?:\s*,\s*{_POINT})*\s*")  # a whole span body: points separated by commas
_BODY = r"(?:(?!<\|).)*?"  # a span body never contains another special token, so one broken span can't swallow the next
_MARKUP = re.compile(
    rf"<\|object_ref_start\|>(?P<ref>{_BODY})<\|object_ref_end\|>"
    rf"|<\|box_start\|>(?P<box>{_BODY})<\|box_end\|>"
    rf"|<\|quad_start\|>(?P<quad>{_BODY})<\|quad_end\|>",
    re.DOTALL,
)
_ANY_MARKUP = re.compile(r"<\|(?:object_ref|box|quad)_(?:start|end)\|>")
_BARE_BOX = re.compile(rf"{_POINT}\s*,\s*{_POINT}")  # the stripped-markup form
_SPAN = rf"(?:<\|box_start\|>{_BODY}<\|box_end\|>|<\|quad_start\|>{_BODY}<\|quad_end\|>)"
_SPAN_RUN = re.compile(rf"(?P<lead>[ \t]?){_SPAN}(?:[ \t]*{_SPAN})*(?P<trail>[ \t]?)", re.DOTALL)
_BARE_RUN = re.compile(rf"(?P<lead>[ \t]?){_BARE_BOX.pattern}(?:[ \t]*{_BARE_BOX.pattern})*(?P<trail>[ \t]?)")
_WORDY = re.compile(r"\w")  # text between a label and a box that ends the label's run of boxes
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box: pixels of the original image, or normalised 0-1000 units when parsed without a size."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None

    def to_pixels(self, width: int, height: int) -> Box:
        """Normalised [0,1000) units -> pixels of a ``width`` x ``height`` image."""
        sx, sy = width / 1000, height / 1000
        return Box(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy, self.label)

    def to_normalized(self, width: int, height: int) -> Box:
        """Pixels -> integers in [0,999]; a box edge on the right/bottom border (x = W) clamps to 999."""
        def norm(v: float, size: int) -> int:
            return min(max(round(v / size * 1000), 0), 999)
        return Box(norm(self.x1, width), norm(self.y1, height), norm(self.x2, width), norm(self.y2, height), self.label)

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def iou(self, other: Box) -> float:
        """Intersection over union; 0.0 when both boxes are empty."""
        inter = Box(max(self.x1, other.x1), max(self.y1, other.y1), min(self.x2, other.x2), min(self.y2, other.y2)).area
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def _check_size(width: int | None, height: int | None) -> bool:
    """True when a size is given; both or neither, and positive."""
    if (width is None) != (height is None):
        raise ValueError("give both width and height, or neither")
    if width is not None and (width <= 0 or height <= 0):  # type: ignore[operator]
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return width is not None


def _box(points: list[tuple[float, float]], label: str | None) -> Box:
    """The enclosing box of the points, ordered top-left -> bottom-right (a model that swaps corners still means it)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return Box(min(xs), min(ys), max(xs), max(ys), label)


def _points(body: str) -> list[tuple[float, float]] | None:
    if not _POINTS.fullmatch(body):
        return None
    nums = [int(n) if n.isdigit() else float(n) for n in re.findall(_NUM, body)]
    return list(zip(nums[0::2], nums[1::2]))


def parse_boxes(text: str, width: int | None = None, height: int | None = None) -> list[Box]:
    """The boxes of an answer, in order: pixels when ``width``/``height`` are given, else normalised units as found.
    Malformed spans (wrong number of points, non-numbers, unclosed) are skipped, never raised on."""
    sized = _check_size(width, height)
    boxes: list[Box] = []
    if _ANY_MARKUP.search(text):
        label, pos = None, 0
        for m in _MARKUP.finditer(text):
            if _WORDY.search(text[pos:m.start()]):
                label = None  # "<ref>car</ref><box>..</box> and a tree <box>..</box>": the tree box is not a car
            pos = m.end()
            if m.lastgroup == "ref":
                label = m["ref"].strip() or None
                continue
            points = _points(m[m.lastgroup])
            if points is not None and len(points) == (2 if m.lastgroup == "box" else 4):
                boxes.append(_box(points, label))
    else:
        boxes = [_box(_points(m[0]), None) for m in _BARE_BOX.finditer(text)]
    return [b.to_pixels(width, height) for b in boxes] if sized else boxes  # type: ignore[arg-type]


def format_box(box: Box | tuple, width: int | None = None, height: int | None = None, label: str | None = None) -> str:
    """One box as the model writes it (for training data). With ``width``/``height`` the box is in pixels and is
    normalised; without, it must already be in normalised units [0,999]. ``label`` overrides ``box.label``."""
    if not isinstance(box, Box):
        box = Box(*box)
    label = label if label is not None else box.label
    if label is not None and ("<|" in label or "|>" in label):
        raise ValueError(f"label {label!r} contains special-token markup")
    box = _box([(box.x1, box.y1), (box.x2, box.y2)], label)
    if _check_size(width, height):
        box = box.to_normalized(width, height)  # type: ignore[arg-type]
    coords = [round(v) for v in (box.x1, box.y1, box.x2, box.y2)]
    if not all(0 <= v <= 999 for v in coords):
        raise ValueError(f"normalised box {tuple(coords)} is outside [0,999]; pass width/height for pixel boxes")
    ref = f"<|object_ref_start|>{label}<|object_ref_end|>" if label else ""
    return f"{ref}<|box_start|>({coords[0]},{coords[1]}),({coords[2]},{coords[3]})<|box_end|>"


def strip_grounding(text: str) -> str:
    """The answer without the markup: labels kept, box/quad spans removed (bare ``(x,y),(x,y)`` when unmarked)."""
    def join(m: re.Match) -> str:
        # keep at most one space where a span was, so words neither merge nor double-space, nor "car ." appears
        after = m.string[m.end():m.end() + 1]
        return m["trail"] or (m["lead"] if after.isalnum() else "")

    if _ANY_MARKUP.search(text):
        text = _SPAN_RUN.sub(join, text)
        return _ANY_MARKUP.sub("", text)  # the ref tokens, and any unclosed span's stray token
    return _BARE_RUN.sub(join, text)


Colour = tuple[int, int, int] | str  # an RGB triple, or a name PIL knows ("red", "#e6194b")


def _dashed_rectangle(draw: ImageDraw.ImageDraw, xy: tuple[int, int, int, int], colour: Colour, width: int) -> None:
    """A rectangle outline ``width`` px thick inward, as ``draw.rectangle`` draws it, in dashes of 3 widths on, 2
    off (PIL has no dashed line)."""
    x1, y1, x2, y2 = xy
    dash, period = 3 * width, 5 * width
    for x in range(x1, x2 + 1, period):  # top and bottom edges
        end = min(x + dash - 1, x2)
        draw.rectangle((x, y1, end, min(y1 + width - 1, y2)), fill=colour)
        draw.rectangle((x, max(y2 - width + 1, y1), end, y2), fill=colour)
    for y in range(y1, y2 + 1, period):  # left and right edges
        end = min(y + dash - 1, y2)
        draw.rectangle((x1, y, min(x1 + width - 1, x2), end), fill=colour)
        draw.rectangle((max(x2 - width + 1, x1), y, x2, end), fill=colour)


def draw_boxes(image: Image.Image | str | os.PathLike, boxes: list[Box], out_path: str | os.PathLike | None = None,
               *, width: int = 3, colours: Sequence[Colour | None] | None = None, dashed: bool = False,
               font_size: int | None = None) -> Image.Image:
    """An RGB copy of ``image`` with each box (in pixels) outlined and its label written on a filled tag above it.

    ``colours``: one per box (None: picked, shared by boxes with the same label, each unlabelled box its own).
    ``dashed``: dashed outlines (e.g. the true boxes beside a model's). A label may hold several lines;
    ``font_size`` defaults to a 25th of the image's smaller side. Boxes outside the image are skipped."""
    if colours is not None and len(colours) != len(boxes):
        raise ValueError(f"{len(colours)} colours for {len(boxes)} boxes: give one per box")
    img = load_image(image)  # always a copy, so the caller's image is never drawn on
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size or max(12, min(img.size) // 25))
    picked: dict[object, Colour] = {}
    for i, b in enumerate(boxes):
        b = _box([(b.x1, b.y1), (b.x2, b.y2)], b.label)  # corners in order
        x1, y1 = max(0, round(b.x1)), max(0, round(b.y1))
        x2, y2 = min(img.width - 1, round(b.x2)), min(img.height - 1, round(b.y2))
        if x1 > x2 or y1 > y2:
            continue
        colour = colours[i] if colours is not None else None
        if colour is None:
            key = b.label if b.label is not None else ("unlabelled", i)
            colour = picked.setdefault(key, _PALETTE[len(picked) % len(_PALETTE)])
        if dashed:
            _dashed_rectangle(draw, (x1, y1, x2, y2), colour, width)
        else:
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        if not b.label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), b.label, font=font)
        pad = 2
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        tx = max(0, min(x1, img.width - tw))
        ty = y1 - th if y1 - th >= 0 else y1  # no room above the box: put the tag just inside its top edge
        draw.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=colour)
        rgb = ImageColor.getrgb(colour) if isinstance(colour, str) else colour
        ink = (0, 0, 0) if sum(rgb[:3]) > 380 else (255, 255, 255)  # dark text on light tags, light on dark
        draw.text((tx + pad - left, ty + pad - top), b.label, fill=ink, font=font)
    if out_path is not None:
        write_file(out_path, lambda tmp: img.save(tmp, format="PNG"))  # never a half-written picture
    return img


def draw_answer(image: object, answer: str, out_path: str | os.PathLike, *, name: str = "image") -> list[Box]:
    """The boxes of a model's ``answer`` (0-1000 coordinates) drawn on ``image`` (a path, URL or PIL image, as
    the model saw it) in its own pixels and saved to ``out_path``; returns them."""
    picture = load_image(image, name=name)
    boxes = parse_boxes(answer, picture.width, picture.height)
    draw_boxes(picture, boxes, out_path)
    return boxes
