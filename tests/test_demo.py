"""`make demo` (examples/demo.py): the boxes picture and lines say what the model really did, and the random
walk-through keeps its own file and warns before a big preset. The trained demo runs on scripted answers here (no
model); the shipped model's own run is tests/test_shipped.py's."""

import numpy as np
import pytest
from PIL import Image

import qwen2vl
from examples import demo
from examples.demo import main
from qwen2vl.processing.grounding import Box, format_box

W, H = 224, 168  # examples/shapes.png
S = demo.SCALE
BACKGROUND = (30, 30, 30)
# red right, blue over the empty background above the square, green right
PREDICTED = {"the red circle": (30, 30, 82, 82), "the blue square": (86, 2, 138, 54),
             "the green triangle": (142, 2, 194, 54)}  # fmt: skip


class Scripted:
    """An assistant that answers the demo's questions from a table."""

    def chat(self, messages, **kw):
        question = messages[0]["content"][-1]["text"]
        for name, box in PREDICTED.items():
            if question == f"Where is {name}?":
                return format_box(Box(*box), W, H, label=name)
        return "3"


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    monkeypatch.setattr(qwen2vl, "load", lambda *a, **k: Scripted())
    (tmp_path / "model").mkdir()
    return tmp_path / "model"


def test_the_demo_says_which_boxes_are_wrong(scripted, tmp_path, capsys):
    assert main(["--model", str(scripted), "--out", str(tmp_path / "boxes.png")]) == 0
    out = capsys.readouterr().out
    assert "IoU with the true box of the red circle: 1.00 -> right" in out
    assert "IoU with the true box of the blue square: 0.00 -> wrong" in out
    assert "IoU with the true box of the green triangle: 1.00 -> right" in out
    assert "boxes: 2 of 3 right (IoU >= 0.5); wrong: the blue square (IoU 0.00)" in out


def test_each_box_wears_its_shapes_colour_beside_the_dashed_true_box(scripted, tmp_path):
    out = tmp_path / "boxes.png"
    assert main(["--model", str(scripted), "--out", str(out)]) == 0
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (H * S, W * S, 3)
    for name, (x1, y1, x2, y2) in PREDICTED.items():  # the model's box, solid: its left edge all in its colour
        colour = demo.SHAPE_COLOURS[name.split()[1]]
        edge = picture[(y1 + 20) * S:(y2 - 5) * S, x1 * S - 2]  # just outside the box, below the label tag
        assert (edge == colour).all(), name
    # the blue square's true box (86, 86)-(138, 138), where the model drew none: dashed in blue, gaps of background,
    # a line further out than the model's boxes, so that it shows on the blue square's own edge
    x1, y1, x2, y2 = (v * S for v in demo.SHAPES_TRUTH["the blue square"])
    top = [tuple(p) for p in picture[y1 - 8, x1:x2]]
    blue = demo.SHAPE_COLOURS["blue"]
    assert top.count(blue) > 0.4 * len(top) and top.count(BACKGROUND) > 0.2 * len(top)


def test_a_missing_box_is_wrong(monkeypatch, scripted, tmp_path, capsys):
    monkeypatch.setattr(Scripted, "chat", lambda self, messages, **kw: "I cannot see it")
    assert main(["--model", str(scripted), "--out", str(tmp_path / "b.png")]) == 0
    out = capsys.readouterr().out
    assert "wrong: no box in the answer for the blue square" in out and "boxes: 0 of 3 right" in out


def test_the_random_demo_keeps_its_own_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_boxes.png").write_bytes(b"make demo's picture")
    assert main(["--random", "--new-tokens", "1"]) == 0
    assert (tmp_path / "demo_boxes.png").read_bytes() == b"make demo's picture"
    assert Image.open(tmp_path / "demo_random_boxes.png").size == (640, 400)
    assert "drawn to demo_random_boxes.png" in capsys.readouterr().out


def test_the_2b_preset_says_what_it_will_cost_first(monkeypatch, capsys):
    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    # stop where the walk-through starts its real work (the image first, then the 2b model)
    monkeypatch.setattr("qwen2vl.processing.processor.MediaLoader.load", stop)
    with pytest.raises(Stop):
        main(["--random", "--preset", "2b"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "2.2B parameters" in first and "about 9 GB of memory" in first and "several minutes" in first


def test_the_examples_are_redrawn_from_the_demos_truths(tmp_path, monkeypatch):
    """examples/make_examples.py draws the pictures the demo scores from examples/demo.py's truths, byte for byte
    (the clip's encoding is not byte-stable, so its frames are counted instead)."""
    import av

    from examples import make_examples

    monkeypatch.setattr(make_examples, "HERE", tmp_path)
    make_examples.main()
    for name in ("shapes.png", "one.png", "text.png"):
        assert (tmp_path / name).read_bytes() == (demo.EXAMPLES / name).read_bytes(), name
    with av.open(str(tmp_path / "ball.mp4")) as clip:
        assert sum(1 for _ in clip.decode(video=0)) == 8
