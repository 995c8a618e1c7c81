"""Re-create the synthetic examples (shapes.png, one.png, text.png, ball.mp4) that `make demo` asks the shipped
model about, from the truths the demo checks its answers against (examples/demo.py).
They are drawn by the curriculum's own code (recipes/synth/data.py), so they look like its held-out split, but no
split contains them. Run: python examples/make_examples.py"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/ and recipes/

from examples.demo import ONE_TRUTH, SHAPES_TRUTH, TEXT_TRUTH  # noqa: E402
from recipes.synth.data import VIDEO_FRAMES, Shape, ball_frame, canvas, text_strip, write_mp4  # noqa: E402

HERE = Path(__file__).resolve().parent
# drawn from the boxes the demo scores against: "the red circle" (30, 30, 82, 82) is a circle filling that square
SHAPES = [Shape(*label.split()[1:], x1, y1, x2 - x1) for label, (x1, y1, x2, y2) in SHAPES_TRUTH.items()]
ONE = Shape(*ONE_TRUTH, 30, 30, 80)  # one large shape filling 3x3 cells, as the colour and shape questions come
BALL = ("orange", 11, 60)  # colour, radius, row of a ball crossing from x = 22 to x = 90: it moves right


def main() -> None:
    canvas(SHAPES, 224, 168).save(HERE / "shapes.png")
    canvas([ONE], 168, 140).save(HERE / "one.png")
    text_strip(TEXT_TRUTH, 168, 84, 1, 1).save(HERE / "text.png")  # a strip as the curriculum draws them
    colour, r, y = BALL
    write_mp4(HERE / "ball.mp4", [ball_frame(colour, r, 22 + round(68 * i / (VIDEO_FRAMES - 1)), y)
                                  for i in range(VIDEO_FRAMES)])  # fmt: skip


if __name__ == "__main__":
    main()
