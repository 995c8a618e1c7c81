"""The synthetic curriculum's data (recipes/synth/data.py): deterministic, every answer follows from the pixels,
and every record loads.

The answers are checked against the pictures themselves (connected regions of non-background pixels, their colours,
bounding boxes and a crude shape classifier), not against the generator's own bookkeeping."""

import hashlib
import json
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen2vl.processing.grounding import Box, parse_boxes
from qwen2vl.processing.video import load_video
from qwen2vl.records import read_jsonl
from qwen2vl.train.data import IGNORE, encode, to_messages
from recipes.synth.__main__ import main
from recipes.synth.data import ALPHABET, BACKGROUND, COLOURS, NUMBER_WORDS, SHAPES, TASKS, TRAIN_MIX, synthesize

TRAIN, TEST = 60, 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    counts = synthesize(out, seed=0, train=TRAIN, test=TEST)
    return out, counts


def records(out: Path, name: str) -> list[dict]:
    return [r for _, r in read_jsonl(out / name)]


def media(record: dict) -> dict:
    return record["messages"][0]["content"][0]


def question(record: dict) -> str:
    return record["messages"][0]["content"][1]["text"]


def answer(record: dict) -> str:
    return record["answer"] if "answer" in record else record["messages"][1]["content"]


def turns(record: dict) -> list[tuple[str, str]]:
    """Every (question, answer) of a record: one for a test record, all of a train conversation."""
    if "answer" in record:
        return [(question(record), record["answer"])]
    m = record["messages"]
    assert [x["role"] for x in m] == ["user", "assistant"] * (len(m) // 2)
    return [(question(record), m[1]["content"])] + [(m[i]["content"], m[i + 1]["content"]) for i in range(2, len(m), 2)]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a boolean mask, as (N, 2) arrays of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    regions = []
    for y0, x0 in np.argwhere(mask):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        regions.append(np.array(pixels))
    return regions


def shapes_in(path: Path) -> list[tuple[str, str, Box]]:
    """(colour, kind, box in pixel edges) of every blob in a shapes picture; asserts the picture is clean."""
    a = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = a.shape
    found = []
    for region in components((a != BACKGROUND).any(-1)):
        ys, xs = region[:, 0], region[:, 1]
        assert min(ys.min(), xs.min()) > 0 and ys.max() < h - 1 and xs.max() < w - 1, "a shape touches the border"
        colours = {tuple(c) for c in a[ys, xs]}
        assert len(colours) == 1, "a shape is not one flat colour"
        colour = colours.pop()
        name = next(n for n, c in COLOURS.items() if c == colour)
        crop = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), bool)
        crop[ys - ys.min(), xs - xs.min()] = True
        assert abs(crop.shape[0] - crop.shape[1]) <= 1, "every shape fills a square box"
        fill, bottom = crop.mean(), crop[-1].mean()
        kind = "square" if fill > 0.95 else "triangle" if bottom > 0.8 else "circle" if fill > 0.68 else "cross"
        found.append((name, kind, Box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)))
    return found


def test_counts_layout_and_paths(data):
    out, counts = data
    train, test, pretrain = records(out, "train.jsonl"), records(out, "test.jsonl"), records(out, "pretrain.jsonl")
    assert sum(counts["train"].values()) == len(train) == len(pretrain) == TRAIN
    assert sum(counts["test"].values()) == len(test) == TEST
    for split, recs in (("train", train), ("test", test)):
        assert {r["task"] for r in recs} == set(TASKS)
        assert {t: sum(r["task"] == t for r in recs) for t in TASKS} == counts[split]
    assert set(counts["test"].values()) == {TEST // 6}  # the test split is balanced
    for task, weight in TRAIN_MIX.items():  # the train split follows the mix
        assert abs(counts["train"][task] - TRAIN * weight / sum(TRAIN_MIX.values())) < 1
    for r in test:
        assert set(r) == {"task", "metric", "messages", "answer", "image_size"} and len(r["messages"]) == 1
        assert r["metric"] == ("box" if r["task"] == "grounding" else "exact")
    for r, caption in zip(train, pretrain):  # one caption per train picture, in the same order
        assert media(caption) == media(r)
    for r in train + test:
        part = media(r)
        path = out / part[part["type"]]
        assert path.is_file() and path.name.startswith("train-" if "answer" not in r else "test-")
        assert (part["type"] == "video") == (r["task"] == "direction")
    for r in test:
        part = media(r)
        if part["type"] == "image":
            assert list(Image.open(out / part["image"]).size) == r["image_size"]


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path):
    out, _ = data
    synthesize(tmp_path / "again", seed=0, train=TRAIN, test=TEST)
    synthesize(tmp_path / "other", seed=1, train=TRAIN, test=TEST)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for f in files:  # jsonl, PNG and mp4 alike
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    for name in ("pretrain.jsonl", "train.jsonl", "test.jsonl"):
        assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes()


def test_seed_0_writes_what_it_wrote_for_the_shipped_model(data):
    """The records of seed 0 are those the code that trained models/qwen2vl-synth wrote (digests taken from it,
    before the retired options left), so the recipe's defaults still reproduce the shipped model's data."""
    out, _ = data
    digests = {
        "pretrain.jsonl": "81450f22a78649d6",
        "train.jsonl": "754f9dc4ae61ba8f",
        "test.jsonl": "e51fcb6e4b6048c8",
    }
    for name, digest in digests.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest()[:16] == digest, name


def test_a_bigger_held_out_split_leaves_training_untouched(data, tmp_path):
    """The train split is drawn first, so the held-out split's size changes none of its files: a model trained on
    a curriculum can be scored again on a bigger held-out split of the same seed."""
    out, _ = data
    synthesize(tmp_path / "big", seed=0, train=TRAIN, test=2 * TEST)
    trained = sorted(p.relative_to(out) for p in out.rglob("train-*"))
    assert len(trained) == TRAIN
    for f in [Path("pretrain.jsonl"), Path("train.jsonl"), *trained]:
        assert (out / f).read_bytes() == (tmp_path / "big" / f).read_bytes(), f
    assert len(records(tmp_path / "big", "test.jsonl")) == 2 * len(records(out, "test.jsonl"))


def test_splits_share_no_picture(data):
    out, _ = data

    def digests(name: str) -> set[str]:
        found = set()
        for r in records(out, name):
            part = media(r)
            if part["type"] == "image":
                found.add(hashlib.sha1(np.asarray(Image.open(out / part["image"])).tobytes()).hexdigest())
            else:
                frames = load_video(out / part["video"], min_pixels=part["min_pixels"]).frames
                found.add(hashlib.sha1(frames).hexdigest())
        return found

    assert not digests("train.jsonl") & digests("test.jsonl")


def check_shapes_answer(q: str, ans: str, found: list, path: Path) -> None:
    """One question about a shapes picture, answered from the blobs found in its pixels."""
    if q == "What colour is the shape?":
        assert len(found) == 1 and found[0][0] == ans
    elif q == "What shape is it?":
        assert len(found) == 1 and found[0][1] == ans and ans in SHAPES
    elif q == "How many shapes are there?":
        assert ans == str(len(found)) and 1 <= len(found) <= 6
    else:
        name = re.fullmatch(r"Where is the (\w+ \w+)\?", q)[1]
        target = [b for c, k, b in found if f"{c} {k}" == name]
        assert len(target) == 1, "the question names exactly one shape"
        w, h = Image.open(path).size
        boxes = parse_boxes(ans, w, h)
        assert len(boxes) == 1 and boxes[0].label == f"the {name}"
        assert ans.startswith(f"<|object_ref_start|>the {name}<|object_ref_end|><|box_start|>(")
        assert boxes[0].iou(target[0]) > 0.9


def test_answers_follow_from_the_pixels(data):
    """Every question of every record (all the turns of a train conversation), and every caption."""
    out, _ = data
    captions = {media(c)["image"]: question(c) for c in records(out, "pretrain.jsonl") if "image" in media(c)}
    seen, asked = set(), set()
    for r in records(out, "train.jsonl") + records(out, "test.jsonl"):
        task, path = r["task"], out / media(r).get("image", "")
        if task == "direction":
            continue
        seen.add(task)
        if task == "ocr":
            assert turns(r) == [("What does the text say?", answer(r))]
            ans = answer(r)
            assert re.fullmatch(f"[{ALPHABET}]{{2,4}}", ans)
            a = np.asarray(Image.open(path).convert("L"))
            assert (a < 64).sum() > 50 and (a > 192).mean() > 0.5  # dark text on a light page
            # one character per 28-px cell: ink in exactly len(answer) cells, side by side in one row, and no cell's
            # ink touches the cell's edge (so a glyph never spills into the neighbouring token)
            ink = a < 128
            cells = ink.reshape(a.shape[0] // 28, 28, a.shape[1] // 28, 28).transpose(0, 2, 1, 3)
            inked = np.argwhere(cells.any(axis=(2, 3)))
            assert len(inked) == len(ans) and len(set(inked[:, 0])) == 1
            assert list(inked[:, 1]) == list(range(inked[0, 1], inked[0, 1] + len(ans)))
            assert not ink[:, ::28].any() and not ink[::28, :].any()
            assert captions.get(media(r)["image"], f"The text says {ans}.") == f"The text says {ans}."
            continue
        found = shapes_in(path)
        first = {"colour": "What colour", "shape": "What shape", "counting": "How many", "grounding": "Where is"}
        assert question(r).startswith(first[task])  # the task's own question comes first
        if task in ("colour", "shape"):
            assert len(found) == 1
        if task == "grounding":
            assert 2 <= len(found) <= 3 and len({(c, k) for c, k, _ in found}) == len(found)
        for q, ans in turns(r):
            check_shapes_answer(q, ans, found, path)
            asked.add(q.split()[0] + " " + q.split()[1])
        if "answer" not in r:  # a train conversation asks all the generator can ask of the picture
            names = [f"{c} {k}" for c, k, _ in found]
            unique = sum(names.count(x) == 1 for x in names)
            expected = {"colour": 4, "shape": 4, "grounding": len(found) + 1, "counting": 1 + min(2, unique)}[task]
            assert len(turns(r)) == expected
        caption = captions.get(media(r)["image"])
        if caption is not None:  # the caption counts the shapes and boxes each one
            n = len(found)
            assert caption.startswith(f"{NUMBER_WORDS[n - 1].capitalize()} shape{'s' if n > 1 else ''}: ")
            w, h = Image.open(path).size
            boxes = parse_boxes(caption, w, h)
            assert len(boxes) == n
            for c, k, b in found:
                assert any(x.label.split(" ", 1)[1] == f"{c} {k}" and x.iou(b) > 0.9 for x in boxes), (c, k)
    assert seen == set(TASKS) - {"direction"}
    assert asked == {"What colour", "What shape", "How many", "Where is"}


def test_shapes_fill_blocks_of_cells(data):
    """Every shape fills a square block of the 28-px cells one merged image token covers,
    drawn 2 px inside it, and no two shapes share a cell (test_answers_follow_from_the_pixels: the answers)."""
    out, _ = data
    pictures = 0
    for r in records(out, "train.jsonl") + records(out, "test.jsonl"):
        if r["task"] in ("ocr", "direction"):
            continue
        found = shapes_in(out / media(r)["image"])
        blocks = set()
        for _, _, b in found:
            x1, y1, x2, y2 = (round(v) for v in (b.x1, b.y1, b.x2, b.y2))
            assert (x1 - 2) % 28 == 0 and (y1 - 2) % 28 == 0, b  # 2 px inside the block's first cell
            assert (x2 + 2) % 28 in (0, 27) and (y2 + 2) % 28 in (0, 27), b  # PIL may leave the last pixel out
            cells = {(cx, cy) for cx in range((x1 - 2) // 28, (x2 + 1) // 28 + 1)
                     for cy in range((y1 - 2) // 28, (y2 + 1) // 28 + 1)}
            assert not cells & blocks, "two shapes share a cell"
            blocks |= cells
        pictures += 1
    assert pictures > 15


def test_videos_show_the_stated_motion(data):
    out, _ = data
    clips = [r for r in records(out, "train.jsonl") + records(out, "test.jsonl") if r["task"] == "direction"]
    assert clips
    for r in clips:
        assert question(r) == "Which direction does the ball move?"
        part = media(r)
        assert len(load_video(out / part["video"]).indices) >= 4  # the loader's defaults work too
        video = load_video(out / part["video"], min_pixels=part["min_pixels"])  # what the model sees
        assert video.indices == [0, 2, 5, 7] and video.frames.shape[1:3] == (112, 112)
        centres = []
        for frame in video.frames:
            ys, xs = np.nonzero(np.abs(frame.astype(int) - BACKGROUND).sum(-1) > 150)
            centres.append((xs.mean(), ys.mean()))
        c = np.array(centres)
        axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[answer(r)]
        steps = np.diff(c[:, axis]) * sign
        assert (steps > 5).all(), (answer(r), c)
        assert np.abs(c[:, 1 - axis] - c[0, 1 - axis]).max() < 1.5  # a straight line along the axis
        if "answer" not in r:  # a train conversation also asks the ball's colour
            (q, colour), = turns(r)[1:]
            assert q == "What colour is the ball?"
            ys, xs = np.nonzero(np.abs(video.frames[0].astype(int) - BACKGROUND).sum(-1) > 150)
            assert np.abs(video.frames[0][ys, xs].astype(int) - COLOURS[colour]).sum(-1).mean() < 10


def test_records_load_with_the_training_loader(data, processor):
    out, _ = data
    for name, kind in (("train.jsonl", "chat"), ("pretrain.jsonl", "pretrain")):
        for n, record in read_jsonl(out / name):
            assert to_messages(record, f"{name}:{n}", root=out)[1] == kind
    done = set()
    for r in records(out, "train.jsonl"):  # one per task through the whole encoder: ids, labels, patches
        if r["task"] in done:
            continue
        done.add(r["task"])
        sample = encode(*to_messages(r, r["task"], root=out), processor)
        supervised = [i for i, label in zip(sample.input_ids.tolist(), sample.labels.tolist()) if label != IGNORE]
        replies = "".join(a + "<|im_end|>" for _, a in turns(r))  # every answer of the conversation
        assert processor.tokenizer.decode(supervised, skip_special_tokens=False) == replies
        if r["task"] == "direction":
            assert sample.video_grid_thw.tolist() == [[2, 8, 8]]  # 4 frames of 112x112: 32 tokens
    assert done == set(TASKS)


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an empty directory"):
        synthesize(tmp_path / "full", train=6, test=6)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x.txt"]
    (tmp_path / "empty").mkdir()
    counts = synthesize(tmp_path / "empty", train=0, test=0)
    assert counts == {"train": dict.fromkeys(TASKS, 0), "test": dict.fromkeys(TASKS, 0)}
    assert (tmp_path / "empty" / "train.jsonl").read_text() == ""


def test_one_box_each_splits_the_where_questions(data, tmp_path):
    """Stage 3's --split-boxes data: every question and answer of the source once, each picture's "Where is"
    questions one per conversation (the first keeps the others), every conversation opening with its picture."""
    from recipes.synth.curriculum import one_box_each

    out, _ = data
    source = (out / "train.jsonl").read_text().splitlines()
    split = one_box_each(out / "train.jsonl", tmp_path / "stage3.jsonl").read_text().splitlines()

    def pairs(line: str) -> list[tuple[str, str, str]]:
        record = json.loads(line)
        m = record["messages"]
        assert isinstance(m[0]["content"], list) and media(record)["type"] in ("image", "video")
        texts = [q["content"] if i else question(record) for i, q in enumerate(m[::2])]
        return [(json.dumps(media(record)), t, a["content"]) for t, a in zip(texts, m[1::2])]

    def boxes_asked(line: str) -> int:
        return sum(t.startswith("Where is") for _, t, _ in pairs(line))

    assert sorted(p for line in split for p in pairs(line)) == sorted(p for line in source for p in pairs(line))
    assert max(boxes_asked(line) for line in split) == 1
    several = [line for line in source if boxes_asked(line) > 1]
    assert several and len(split) == len(source) + sum(boxes_asked(line) - 1 for line in several)
    assert set(source) - set(several) <= set(split)  # the others are copied byte for byte
    first = json.loads(several[0])
    parts = [json.loads(line) for line in split if media(json.loads(line)) == media(first)]
    assert len(parts) == boxes_asked(several[0]) and {r["task"] for r in parts} == {first["task"]}
    assert sum(len(r["messages"]) for r in parts) == len(first["messages"])
    for line in several:  # each picture's first conversation opens with the question the picture opened with
        opened = [json.loads(x) for x in split if media(json.loads(x)) == media(json.loads(line))][0]
        assert question(opened) == question(json.loads(line))


def test_data_verb_mix_weighs_the_train_split(tmp_path, capsys):
    assert main(["data", "--out", str(tmp_path / "a"), "--train", "9", "--test", "6", "--mix", "ocr=2, colour=1"]) == 0
    tasks = [json.loads(line)["task"] for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert sorted(tasks) == ["colour"] * 3 + ["ocr"] * 6
    assert "train: colour 3," in capsys.readouterr().out
    for bad, named in (("ocr", "'ocr'"), ("ocr=x", "'ocr=x'"), ("ocr=1,bogus=2", "bogus")):
        assert main(["data", "--out", str(tmp_path / "b"), "--train", "2", "--test", "0", "--mix", bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith("python -m recipes.synth: error:") and named in err and "Traceback" not in err


def test_data_verb_test_mix_weighs_the_held_out_split(tmp_path, capsys):
    """--test-mix grounding=1 --train 0: a held-out split of grounding pictures alone, to score the boxes on
    fresh pictures; the default split stays even over the six tasks."""
    args = ["data", "--out", str(tmp_path / "g"), "--seed", "1000", "--train", "0", "--test", "8"]
    assert main([*args, "--test-mix", "grounding=1"]) == 0
    test = [json.loads(line) for line in (tmp_path / "g" / "test.jsonl").read_text().splitlines()]
    assert [(r["task"], r["metric"]) for r in test] == [("grounding", "box")] * 8
    assert "test: colour 0, shape 0, counting 0, grounding 8, ocr 0, direction 0" in capsys.readouterr().out
    assert (tmp_path / "g" / "train.jsonl").read_text() == ""
    args = ["data", "--out", str(tmp_path / "h"), "--train", "0", "--test", "6", "--test-mix", "grounding=1,ocr=2"]
    assert main(args) == 0
    tasks = [json.loads(line)["task"] for line in (tmp_path / "h" / "test.jsonl").read_text().splitlines()]
    assert sorted(tasks) == ["grounding"] * 2 + ["ocr"] * 4
    capsys.readouterr()
    bad_mixes = (("grounding", "--test-mix wants"), ("grounding=1,boxes=1", "test_mix"), ("grounding=0", "test_mix"))
    for bad, named in bad_mixes:
        assert main(["data", "--out", str(tmp_path / "b"), "--train", "0", "--test", "2", "--test-mix", bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith("python -m recipes.synth: error:") and named in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()  # refused before anything was written
