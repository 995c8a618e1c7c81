"""The benchmark scorers on hand-made cases, and the eval runner end to end on the tiny checkpoint."""

import json

import pytest

from qwen2vl.cli import main
from qwen2vl.eval.metrics import anls, box, box_iou, choice, choice_letter, exact, relaxed, vqa


def test_exact():
    assert exact("Red.", "red") == 1 and exact("  the Red ", ["blue", "red"]) == 1
    assert exact("dark red", "red") == 0


def test_vqa_accuracy():
    humans = ["2"] * 3 + ["two"] * 4 + ["3"] * 3
    assert vqa("two", humans) == 1.0  # 4 of 10: every leave-one-out subset still has >= 3
    assert vqa("2", humans) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)  # dropping one "2" leaves 2: 2/3
    assert vqa("5", humans) == 0.0
    assert vqa("yes", ["yes"]) == 1.0


def test_anls():
    assert anls("hello world", "hello world") == 1.0
    assert anls("hallo world", "hello world") == pytest.approx(1 - 1 / 11)
    assert anls("completely different", "hello") == 0.0  # distance over 0.5 counts as 0
    assert anls("Hello  World", ["x", "hello world"]) == 1.0


def test_relaxed_accuracy():
    assert relaxed("The value is 104", "100") == 1.0  # within 5%
    assert relaxed("106", "100") == 0.0
    assert relaxed("about 12.5%", "0.125") == 1.0
    assert relaxed("1,000", "1000") == 1.0
    assert relaxed("Brazil", "brazil") == 1.0 and relaxed("Chile", "Brazil") == 0.0
    assert relaxed("0", "0") == 1.0


def test_box_acc_at_05():
    ref = "<|box_start|>(100,100),(300,300)<|box_end|>"
    assert box("<|object_ref_start|>it<|object_ref_end|><|box_start|>(110,100),(300,310)<|box_end|>", ref) == 1.0
    assert box("<|box_start|>(200,200),(400,400)<|box_end|>", ref) == 0.0  # IoU 1/7
    assert box("(100,100),(300,300)", [100, 100, 300, 300]) == 1.0  # markup stripped by decoding
    assert box("no box here", ref) == 0.0
    # the IoU behind it: 190x200 of 200x200 and 190x210
    assert box_iou("<|box_start|>(110,100),(300,310)<|box_end|>", ref) == pytest.approx(38000 / 41900)
    assert box_iou("<|box_start|>(200,200),(400,400)<|box_end|>", ref) == pytest.approx(1 / 7)
    assert box_iou("no box here", ref) == 0.0 and box_iou("(0,0),(9,9)", "no box") == 0.0


def test_multiple_choice_letter():
    assert [choice_letter(p) for p in ("B", "(C) a cat", "D. dog", "The answer is A", "I think (E).", "no")] == [
        "B", "C", "D", "A", "E", None,
    ]  # fmt: skip
    assert choice("The answer is B.", "B") == 1.0 and choice("C", "(B)") == 0.0


def test_eval_runner(small_checkpoint, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    q = lambda text, image=False: [{"role": "user", "content": ([{"type": "image", "image": "red.png"}] if image else [])  # noqa: E731
                                     + [{"type": "text", "text": text}]}]  # fmt: skip
    records = [
        {"task": "colour", "metric": "exact", "messages": q("What colour?", True), "answer": "red"},
        {"task": "colour", "metric": "exact", "messages": q("Colour again?", True), "answer": "red"},
        {"task": "grounding", "metric": "box", "messages": q("Where?", True), "answer": "(0,0),(999,999)"},
        {"task": "mc", "messages": q("A or B?"), "answers": ["A"]},
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report.json"
    assert main(["eval", str(small_checkpoint), "--data", str(tmp_path / "test.jsonl"), "--metric", "choice",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| task | metric | n | score |" in printed and "| colour | exact | 2 |" in printed and "| mc | choice | 1 |" in printed
    report = json.loads(out.read_text())
    assert report["n"] == 4 and set(report["tasks"]) == {"colour", "grounding", "mc"}
    assert all(0 <= r["score"] <= 1 and isinstance(r["prediction"], str) for r in report["records"])
    grounding = [r for r in report["records"] if r["metric"] == "box"]
    assert len(grounding) == 1 and "iou" not in report["records"][0]
    assert report["tasks"]["grounding"]["mean_iou"] == grounding[0]["iou"] == round(
        box_iou(grounding[0]["prediction"], "(0,0),(999,999)"), 4)  # fmt: skip
    assert "mean_iou" not in report["tasks"]["colour"]
    assert main(["eval", str(small_checkpoint), "--data", str(tmp_path / "test.jsonl"), "--metric", "bleu"]) == 1
    assert "unknown metric 'bleu'" in capsys.readouterr().err
