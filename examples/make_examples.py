"""Re-create the synthetic examples (shapes.png, one.png, text.png, ball.mp4) that `make demo` asks the shipped model about.
They are drawn by the curriculum's own code (qwen2vl.train.synth), so they look like its held-out split, but no
split contains them. Run: python examples/make_examples.py"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qwen2vl.train.synth import (BACKGROUND, COLOURS, TEXT_BACKGROUND, TEXT_INK, VIDEO_FRAMES, VIDEO_SIDE, Shape,
                                 _canvas, _write_mp4)  # fmt: skip

HERE = Path(__file__).resolve().parent
SHAPES = [Shape("red", "circle", 22, 30, 54), Shape("blue", "square", 100, 96, 50),
          Shape("green", "triangle", 158, 22, 52)]  # fmt: skip
ONE = Shape("yellow", "square", 40, 30, 70)  # one large shape, as the colour and shape questions come
TEXT = "KR7"
BALL = ("orange", 11, 60)  # colour, radius, row of a ball crossing from x = 22 to x = 90: it moves right


def main() -> None:
    _canvas(SHAPES, 224, 168).save(HERE / "shapes.png")
    _canvas([ONE], 168, 140).save(HERE / "one.png")
    w, h = 168, 84  # a strip as the curriculum draws them: 56 or 84 px high, a 28-40 px font
    image = Image.new("RGB", (w, h), TEXT_BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"
    font = ImageFont.load_default(size=36)
    left, top, right, bottom = draw.textbbox((0, 0), TEXT, font=font)
    draw.text(((w - (right - left)) // 2 - left, (h - (bottom - top)) // 2 - top), TEXT, fill=TEXT_INK, font=font)
    image.save(HERE / "text.png")
    colour, r, y = BALL
    frames = []
    for i in range(VIDEO_FRAMES):
        x = 22 + round(68 * i / (VIDEO_FRAMES - 1))
        frame = Image.new("RGB", (VIDEO_SIDE, VIDEO_SIDE), BACKGROUND)
        ImageDraw.Draw(frame).ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        frames.append(np.asarray(frame))
    _write_mp4(HERE / "ball.mp4", frames)


if __name__ == "__main__":
    main()
