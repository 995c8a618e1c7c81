"""A deterministic synthetic curriculum for training a tiny Qwen2-VL from scratch on a laptop-class CPU.

Six tasks, each probing one ability of the architecture, on pictures simple enough that a model of a few million
parameters can learn them in minutes:

  colour     one shape                      "What colour is the shape?"             -> "red"
  shape      one shape                      "What shape is it?"                     -> "circle"
  counting   1-6 shapes, never touching     "How many shapes are there?"            -> "4"
  grounding  2-3 shapes, distinct kinds     "Where is the red circle?"              -> <|object_ref_start|>... box
  ocr        2-4 characters, one per cell   "What does the text say?"               -> "KQ7"
  direction  an 8-frame clip of one ball    "Which direction does the ball move?"   -> "left"

In the train split a picture comes with every question that can be asked of it (the task's first, then the
others shuffled: the one shape's colour, kind, count and box; where the shapes are that have a name of their own;
a ball's colour), so the picture and the chat template are paid for once per several answers. Captions (stages
1-2) count the shapes and give each one's box in the grounding format, as the paper's grounding pretraining does.

Why it is shaped this way: every answer must follow from the pixels without doubt, or the model learns noise.
So shapes are flat, aliased (every pixel is exactly its colour or the background's), drawn from a palette of six
colours far apart in RGB on one near-black background, and never overlap or touch the border. Each shape fills a
square block of the 28-px cells that one merged image token covers (patch 14 x merge 2), as each glyph of the
text strips fills one cell: no token's pixels hold parts of two shapes or two characters (LOG.md: what the patch
grid and free placement gave). Text is black on white from an alphabet without look-alikes (no I, O, 0, 1); each
task has one fixed question and answer template. Image sides vary (multiples of 28 in [min_side, max_side])
because dynamic resolution is what is being exercised, but stay small so that an image costs 16-64 tokens. Each
video part carries ``min_pixels`` so that the loader keeps clips at their 112x112 size (32 tokens) instead of
upscaling them to its video minimum of 128 tokens/frame.

Files written into ``out`` (paths in the records are relative to it, as the training loader expects):
  images/{split}-{index:06d}.png, videos/{split}-{index:06d}.mp4 (H.264, lossless, 8 frames at 4 fps)
  pretrain.jsonl  one caption per train image/video (stages 1-2)
  train.jsonl     one ChatML conversation per train image/video (stage 3)
  test.jsonl      held-out questions with reference answers: {"task", "metric", "messages", "answer", "image_size"}

Determinism: every example draws from its own ``numpy.random.default_rng([seed, split, index, attempt])``, so the
same seed gives byte-identical files and the test split (another seed stream) never shares a scene with train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qwen2vl.processing.grounding import Box, format_box

TASKS = ("colour", "shape", "counting", "grounding", "ocr", "direction")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "counting": "How many shapes are there?",
    "grounding": "Where is the {}?",
    "ocr": "What does the text say?",
    "direction": "Which direction does the ball move?",
}
BALL_COLOUR = "What colour is the ball?"
# The train split's share of each task. OCR and the videos get more: they were the slowest to learn, and a strip
# of text or a clip costs only 8-32 tokens.
TRAIN_MIX = {"colour": 1.0, "shape": 1.0, "counting": 1.0, "grounding": 1.0, "ocr": 2.0, "direction": 1.5}
# Pairwise RGB distances are all > 95, and every colour stands out from the near-black background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 200),
    "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")  # each fills its square bounding box edge to edge
BACKGROUND = (30, 30, 30)
TEXT_BACKGROUND, TEXT_INK = (255, 255, 255), (0, 0, 0)
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I/O/0/1: nothing two readers could read differently
GLYPH_SIZE = 28  # px: the widest glyphs (M, W) are 27 px wide and all are at most 21 px high, so each fits a cell
DIRECTIONS = ("left", "right", "up", "down")
DIRECTION_CAPTION = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
VIDEO_SIDE, VIDEO_FRAMES, VIDEO_FPS = 112, 8, 4.0  # 2 s; the loader's 2 fps sampling keeps frames 0, 2, 5, 7
VIDEO_MIN_PIXELS = 4 * 28 * 28  # per-part loader option: keeps a 112x112 clip at 112x112
MARGIN = 4  # pixels between a ball and the clip's border
# A shape is drawn CELL_INSET px inside its block of cells, so shapes in neighbouring cells stay 2 x CELL_INSET
# px apart and none touches the border.
CELL, CELL_INSET = 28, 2
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
_SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    x: int  # top-left pixel
    y: int
    size: int  # side of the square bounding box, in pixels

    @property
    def box(self) -> Box:
        """The bounding box in pixel-edge coordinates: the drawn pixels span [x, x + size)."""
        return Box(self.x, self.y, self.x + self.size, self.y + self.size)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Example:
    task: str
    key: tuple  # everything that determines the media: equal keys mean equal pictures
    question: str
    answer: str
    caption: str
    image: Image.Image | None = None
    frames: list[np.ndarray] | None = None
    more: list[tuple[str, str]] = field(default_factory=list)  # other (question, answer) pairs about the picture


# -- drawing -----------------------------------------------------------------------------------------------


def _draw(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    fill, x, y, n = COLOURS[s.colour], s.x, s.y, s.size
    x2, y2 = x + n - 1, y + n - 1  # PIL's coordinates are inclusive
    if s.kind == "square":
        draw.rectangle((x, y, x2, y2), fill=fill)
    elif s.kind == "circle":
        draw.ellipse((x, y, x2, y2), fill=fill)
    elif s.kind == "triangle":  # apex up, base on the bottom edge
        draw.polygon([(x + n // 2, y), (x, y2), (x2, y2)], fill=fill)
    else:  # cross: a plus sign with arms a third of the side thick
        t = max(3, round(n / 3))
        o = (n - t) // 2
        draw.rectangle((x + o, y, x + o + t - 1, y2), fill=fill)
        draw.rectangle((x, y + o, x2, y + o + t - 1), fill=fill)


def canvas(shapes: list[Shape], w: int, h: int) -> Image.Image:
    """The shapes on a ``w`` x ``h`` picture of the background colour."""
    image = Image.new("RGB", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        _draw(draw, s)
    return image


def _side(rng: np.random.Generator, lo: int, hi: int) -> int:
    """A side length, uniform over the multiples of 28 in [lo, hi] (patch 14 x merge 2: no resize needed)."""
    return int(rng.integers(-(-lo // 28), hi // 28 + 1)) * 28


def _place(rng: np.random.Generator, w: int, h: int, n: int, lo: float, hi: float) -> list[tuple[int, int, int]]:
    """n non-overlapping squares (x, y, size): blocks of whole cells, neighbouring blocks allowed, each returned as
    the square drawn CELL_INSET px inside its block. Sizes are fractions of the shorter side; when a layout does
    not fit (many shapes, small canvas), retry with smaller shapes."""
    short = min(w, h)
    for _ in range(100):
        placed: list[tuple[int, int, int]] = []
        for _ in range(n):
            a, b = -(-max(10, int(lo * short)) // CELL), max(10, int(hi * short)) // CELL
            size = int(rng.integers(a, max(a, b) + 1)) * CELL
            if size > short:
                break
            for _ in range(50):
                x = int(rng.integers(0, (w - size) // CELL + 1)) * CELL
                y = int(rng.integers(0, (h - size) // CELL + 1)) * CELL
                apart = (x + size <= px or px + ps <= x or y + size <= py or py + ps <= y for px, py, ps in placed)
                if all(apart):
                    placed.append((x, y, size))
                    break
            else:
                break
        if len(placed) == n:
            return [(x + CELL_INSET, y + CELL_INSET, size - 2 * CELL_INSET) for x, y, size in placed]
        lo, hi = lo * 0.9, hi * 0.9
    raise RuntimeError(f"cannot place {n} shapes on {w}x{h}")  # unreachable for n <= 6 and sides >= 56


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _describe(shapes: list[Shape], w: int, h: int) -> str:
    """'Two shapes: <ref>a red circle</ref><box>(..),(..)</box> and <ref>a blue square</ref><box>..</box>.', each
    shape with its box in the grounding format, top to bottom, then left to right: a caption that teaches counting,
    colours, kinds and where things are at once (the paper's grounding pretraining data looks so)."""
    n = len(shapes)
    phrases = [format_box(s.box, w, h, label=_article(s.name)) for s in sorted(shapes, key=lambda s: (s.y, s.x))]
    listed = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{NUMBER_WORDS[n - 1].capitalize()} shape{'s' if n > 1 else ''}: {listed}."


def _where(target: Shape, w: int, h: int) -> tuple[str, str]:
    return QUESTIONS["grounding"].format(target.name), format_box(target.box, w, h, label=f"the {target.name}")


# -- one example per task ----------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _keep_stream(rng: np.random.Generator, shapes: list[Shape]) -> None:
    """The retired selection questions (LOG.md) drew a permutation of their options here. It is drawn still, so
    that every seed writes the files it wrote then: seed 0's are the shipped model's training data."""
    colours, kinds = [s.colour for s in shapes], [s.kind for s in shapes]
    options = sum(kinds.count(k) == 1 for k in kinds) + sum(colours.count(c) == 1 for c in colours)
    rng.permutation(options + len(set(colours)) + len(set(kinds)))


def _shapes_example(task: str, rng: np.random.Generator, min_side: int, max_side: int) -> Example:
    w, h = _side(rng, min_side, max_side), _side(rng, min_side, max_side)
    if task in ("colour", "shape"):  # one large shape: these tasks are about recognition, not search
        layout = _place(rng, w, h, 1, 0.3, 0.6)
        shapes = [Shape(_pick(rng, list(COLOURS)), _pick(rng, SHAPES), *layout[0])]
    elif task == "counting":
        n = int(rng.integers(1, 7))
        layout = _place(rng, w, h, n, 0.15, 0.3)
        shapes = [Shape(_pick(rng, list(COLOURS)), _pick(rng, SHAPES), *p) for p in layout]
    else:  # grounding: distinct (colour, kind) pairs, so that "the red circle" names exactly one shape
        n = int(rng.integers(2, 4))
        pairs = [(c, k) for c in COLOURS for k in SHAPES]
        chosen = [pairs[i] for i in rng.choice(len(pairs), n, replace=False)]
        shapes = [Shape(c, k, *p) for (c, k), p in zip(chosen, _place(rng, w, h, n, 0.25, 0.45))]
    key = (task, w, h, tuple(shapes))
    image, caption = canvas(shapes, w, h), _describe(shapes, w, h)
    count = (QUESTIONS["counting"], str(len(shapes)))
    unique = [s for s in shapes if sum(t.name == s.name for t in shapes) == 1]  # "the red circle" names one
    if task in ("colour", "shape"):  # every question about the one shape
        colour, kind = (QUESTIONS["colour"], shapes[0].colour), (QUESTIONS["shape"], shapes[0].kind)
        first, rest = (colour, kind) if task == "colour" else (kind, colour)
        return Example(task, key, *first, caption, image, more=[rest, count, _where(shapes[0], w, h)])
    if task == "counting":  # and where up to two of the shapes that have a name of their own are
        picked = [unique[i] for i in rng.permutation(len(unique))[:2]]
        _keep_stream(rng, shapes)
        return Example(task, key, *count, caption, image, more=[_where(s, w, h) for s in picked])
    target = shapes[int(rng.integers(n))]
    _keep_stream(rng, shapes)
    more = [*(_where(s, w, h) for s in shapes if s is not target), count]
    return Example(task, key + (target.name,), *_where(target, w, h), caption, image, more=more)


def text_strip(text: str, w: int, h: int, row: int, col: int) -> Image.Image:
    """A white ``w`` x ``h`` strip with ``text`` written one character per 28-px cell (the pixels one merged image
    token covers), starting at cell (row, col), each glyph centred in its cell in a GLYPH_SIZE font: laid out like a
    monospaced terminal, so that a character is always one token's worth of pixels, at one of a few offsets."""
    if not (0 <= row < h // 28 and 0 <= col and col + len(text) <= w // 28):
        raise ValueError(f"{text!r} at cell ({row}, {col}) does not fit a {w}x{h} strip of 28-px cells")
    image = Image.new("RGB", (w, h), TEXT_BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: two colours only, like the shapes
    font = ImageFont.load_default(size=GLYPH_SIZE)
    for i, ch in enumerate(text):
        left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
        cx, cy = (col + i) * 28 + 14, row * 28 + 14
        draw.text((cx - (left + right) // 2, cy - (top + bottom) // 2), ch, fill=TEXT_INK, font=font)
    return image


def _ocr_example(rng: np.random.Generator, min_side: int, max_side: int) -> Example:
    """2-4 characters on a white strip 56 or 84 px high (2-3 rows of cells), from a random cell on: 8-24 tokens,
    so that many are seen per minute of training."""
    w, h = _side(rng, min_side, max_side), _side(rng, 56, 84)
    text = "".join(_pick(rng, ALPHABET) for _ in range(int(rng.integers(2, 5))))
    row, col = int(rng.integers(h // 28)), int(rng.integers(w // 28 - len(text) + 1))
    image = text_strip(text, w, h, row, col)
    return Example("ocr", ("ocr", w, h, text, row, col), QUESTIONS["ocr"], text, f"The text says {text}.", image)


def ball_frame(colour: str, r: int, cx: int, cy: int) -> np.ndarray:
    """One clip frame: a ball of radius ``r`` centred at (cx, cy) on the background, uint8 [H, W, 3]."""
    image = Image.new("RGB", (VIDEO_SIDE, VIDEO_SIDE), BACKGROUND)
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    return np.asarray(image)


def _video_example(rng: np.random.Generator) -> Example:
    """One ball crossing much of the frame in a straight line at constant speed."""
    colour, direction = _pick(rng, list(COLOURS)), _pick(rng, DIRECTIONS)
    r = int(rng.integers(9, 15))
    lo, hi = MARGIN + r, VIDEO_SIDE - 1 - MARGIN - r  # the ball's centre stays in [lo, hi]
    travel = int(rng.integers(48, hi - lo + 1))  # >= 48 px: >= 13 px between consecutive sampled frames
    start = int(rng.integers(lo, hi - travel + 1))
    across = int(rng.integers(lo, hi + 1))
    path = [start + round(travel * i / (VIDEO_FRAMES - 1)) for i in range(VIDEO_FRAMES)]
    if direction in ("left", "up"):
        path.reverse()
    frames = [ball_frame(colour, r, *((p, across) if direction in ("left", "right") else (across, p))) for p in path]
    caption = f"{_article(colour).capitalize()} ball moves {DIRECTION_CAPTION[direction]}."
    key = ("direction", colour, direction, r, start, travel, across)
    more = [(BALL_COLOUR, colour)]
    return Example("direction", key, QUESTIONS["direction"], direction, caption, frames=frames, more=more)


def _example(task: str, rng: np.random.Generator, min_side: int, max_side: int) -> Example:
    if task == "ocr":
        return _ocr_example(rng, min_side, max_side)
    if task == "direction":
        return _video_example(rng)
    return _shapes_example(task, rng, min_side, max_side)


# -- writing -----------------------------------------------------------------------------------------------


def write_mp4(path: Path, frames: list[np.ndarray]) -> None:
    """Lossless H.264 (qp 0, 4:4:4), so decoded frames keep the flat colours; one thread for identical bytes."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=int(VIDEO_FPS), options={"qp": "0", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv444p"
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24").reformat(format="yuv444p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _task_list(n: int, mix: dict[str, float] | None) -> list[str]:
    """n task names in proportion to ``mix`` (largest remainders); without one, all six tasks equally (the test
    split, so that each metric is measured on as many examples)."""
    weights = np.array([1.0 if mix is None else float(mix.get(t, 0.0)) for t in TASKS])
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [t for t, k in zip(TASKS, counts) for _ in range(k)]


def _split(
    out: Path, split: str, n: int, seed: int, mix: dict[str, float] | None, sides: tuple[int, int], taken: set[tuple]
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Generate one split; returns (question records, caption records, counts per task). Scenes whose key is in
    ``taken`` (the other split's) are redrawn, so that the splits never share a picture."""
    sid = _SPLITS[split]
    tasks = _task_list(n, mix)
    order = np.random.default_rng([seed, sid]).permutation(len(tasks))  # mix tasks, in case nothing shuffles
    records, captions = [], []
    counts = {t: 0 for t in TASKS}
    for index, i in enumerate(order):
        task = tasks[int(i)]
        for attempt in range(1000):
            rng = np.random.default_rng([seed, sid, index, attempt])
            ex = _example(task, rng, *sides)
            if ex.key not in taken:
                break
        taken.add(ex.key)
        counts[task] += 1
        if ex.frames is not None:
            rel = f"videos/{split}-{index:06d}.mp4"
            write_mp4(out / rel, ex.frames)
            part = {"type": "video", "video": rel, "min_pixels": VIDEO_MIN_PIXELS}
            size = [VIDEO_SIDE, VIDEO_SIDE]
        else:
            rel = f"images/{split}-{index:06d}.png"
            ex.image.save(out / rel, format="PNG", optimize=False)
            part = {"type": "image", "image": rel}
            size = list(ex.image.size)
        user = {"role": "user", "content": [part, {"type": "text", "text": ex.question}]}
        if split == "train":  # the task's question first, then every other one about the picture, shuffled
            messages = [user, {"role": "assistant", "content": ex.answer}]
            for j in rng.permutation(len(ex.more)):
                q, a = ex.more[int(j)]
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            records.append({"task": task, "messages": messages})
            caption = {"role": "user", "content": [part, {"type": "text", "text": ex.caption}]}
            captions.append({"type": "pretrain", "task": task, "messages": [caption]})
        else:
            metric = "box" if task == "grounding" else "exact"
            record = {"task": task, "metric": metric, "messages": [user], "answer": ex.answer, "image_size": size}
            records.append(record)
    return records, captions, counts


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def synthesize(
    out: str | Path,
    seed: int = 0,
    train: int = 4000,
    test: int = 1200,
    *,
    mix: dict[str, float] | None = None,
    test_mix: dict[str, float] | None = None,
    min_side: int = 112,
    max_side: int = 224,
) -> dict:
    """Write the curriculum into ``out`` (created; a ValueError if it exists and is not empty) and return the
    number of examples per split and task: ``{"train": {"colour": n, ...}, "test": {...}}``.

    ``mix`` weighs the tasks in the train split (default ``TRAIN_MIX``); the test split is spread evenly over
    all six tasks (by default 200 each: at 50 one answer moved a score by 2 points), or weighed by ``test_mix``:
    ``train=0, test_mix={"grounding": 1}`` with a seed no model trained on gives fresh pictures to score one skill
    on (a seed's held-out and train pictures come from its own random streams; seed 0's are the curriculum's).
    Image sides are multiples of 28 drawn uniformly from [min_side, max_side]."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory")
    if train < 0 or test < 0 or seed < 0:
        raise ValueError("train, test and seed must be non-negative")
    mix = dict(TRAIN_MIX if mix is None else mix)
    for name, weights in (("mix", mix), ("test_mix", test_mix)):
        if weights is None:
            continue
        if set(weights) - set(TASKS) or any(not (v >= 0) for v in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"{name} weighs tasks of {TASKS} with non-negative numbers, not all zero; got {weights}")
    if not 56 <= min_side <= max_side or -(-min_side // 28) * 28 > max_side:
        raise ValueError(f"need 56 <= min_side <= max_side with a multiple of 28 between, got {min_side}, {max_side}")
    for sub in ("images", "videos"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    taken: set[tuple] = set()
    sides = (min_side, max_side)
    train_records, captions, train_counts = _split(out, "train", train, seed, mix, sides, taken)
    test_records, _, test_counts = _split(out, "test", test, seed, test_mix, sides, taken)
    _write_jsonl(out / "pretrain.jsonl", captions)
    _write_jsonl(out / "train.jsonl", train_records)
    _write_jsonl(out / "test.jsonl", test_records)
    return {"train": train_counts, "test": test_counts}
