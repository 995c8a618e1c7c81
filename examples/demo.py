"""``make demo``: the shipped model answers about the example pictures, scored against their known truths
(``python -m examples.demo``), or a walk-through of the architecture with random weights (``--random``). It reads
this checkout's ``models/`` and ``examples/``, so it lives beside them, outside the library."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qwen2vl.cli import params_table

ROOT = Path(__file__).resolve().parent.parent  # the checkout
SHIPPED_MODEL = ROOT / "models" / "qwen2vl-synth"  # trained from scratch by the synthetic curriculum
EXAMPLES = ROOT / "examples"
EXAMPLE_IMAGE = EXAMPLES / "scene.png"
EXAMPLE_BOXES = {"the red ball": (70, 90, 210, 230), "the blue box": (300, 160, 420, 280)}  # pixels, ground truth

# examples/make_examples.py draws these; true boxes in pixels, [x1, x2) x [y1, y2): 2 px inside 2x2 28-px cells
SHAPES_TRUTH = {
    "the red circle": (30, 30, 82, 82),
    "the blue square": (86, 86, 138, 138),
    "the green triangle": (142, 2, 194, 54),
}
ONE_TRUTH = ("yellow", "square")
TEXT_TRUTH = "KR7"
BALL_TRUTH = "right"
# the colours the example pictures are drawn in (the curriculum's palette), so a box wears its shape's colour
SHAPE_COLOURS = {
    "red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 80, 230),
    "yellow": (245, 225, 30), "purple": (150, 50, 200), "orange": (250, 130, 0),
}  # fmt: skip
RIGHT_IOU = 0.5  # a box is right when it overlaps the true one by at least this much (Acc@0.5, the usual bar)
SCALE = 3  # the boxes picture is shapes.png enlarged this many times, so that 224x168 pixels can be read
LINE = 3  # px; outlines go outside their boxes (the true box a line further out), so they show on the shapes
TRAINED_OUT = "demo_boxes.png"
AGENT_OUT = "demo_agent"  # the agent episode's trajectory: index.html, trajectory.jsonl, the screenshots
AGENT_TASK, AGENT_SEED = "tick_then_press", 10**6  # a two-step task on a screen the model never trained on
RANDOM_OUT = "demo_random_boxes.png"  # its own name, so --random never overwrites `make demo`'s picture

Say = Callable[[str], None]


def run(model: str | os.PathLike = SHIPPED_MODEL, *, random: bool = False, preset: str | None = None,
        dtype: str = "float32", new_tokens: int = 16, out: str | None = None, say: Say = print,
        agent_out: str | None = None) -> None:
    """The trained model in ``model`` answers about the examples; with ``random`` or ``preset`` (or no directory
    at ``model``) the walk-through with random weights runs instead."""
    if random or preset or not Path(model).is_dir():
        if not (random or preset):
            say(f"(no model at {model}: showing the architecture with random weights instead)")
        if (cost := expected_cost(preset or "tiny")) is not None:
            say(cost)  # before anything big is built
        say(params_table())
        random_demo(preset or "tiny", dtype, new_tokens, out or RANDOM_OUT, say)
    else:
        trained_demo(model, dtype, out or TRAINED_OUT, say, agent_out or AGENT_OUT)


def _outline(box, px: int, label: str | None = None):
    """``box`` on the SCALE-times enlarged picture, grown by ``px`` on every side."""
    from qwen2vl.processing.grounding import Box

    return Box(box.x1 * SCALE - px, box.y1 * SCALE - px, box.x2 * SCALE + px, box.y2 * SCALE + px, label)


def trained_demo(
    model_dir: str | os.PathLike, dtype: str = "float32", out: str = TRAINED_OUT, say: Say = print,
    agent_out: str = AGENT_OUT,
) -> list[tuple[str, float]]:
    """The model answers about the example pictures; its boxes are scored and drawn on shapes.png enlarged, to
    ``out``: solid in the colour their label names, beside the true boxes dashed. Returns (asked shape, IoU) each."""
    from qwen2vl import load
    from qwen2vl.processing.grounding import Box, draw_boxes, parse_boxes
    from qwen2vl.processing.image import load_image

    t0 = time.perf_counter()
    assistant = load(model_dir, dtype=dtype)
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    say(f"loaded {model_dir} ({size / 2**20:.1f} MiB of weights, computing in {dtype}) in "
        f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    shapes, one, text, clip = (EXAMPLES / n for n in ("shapes.png", "one.png", "text.png", "ball.mp4"))
    questions = [(shapes, "How many shapes are there?", None),
                 *((shapes, f"Where is {name}?", name) for name in SHAPES_TRUTH),
                 (one, "What colour is the shape?", None), (one, "What shape is it?", None),
                 (text, "What does the text say?", None), (clip, "Which direction does the ball move?", None)]
    picture = load_image(shapes)
    w, h = picture.size
    drawn, colours, scores = [], [], []
    for source, question, asked in questions:
        t = time.perf_counter()
        kind = "video" if source.suffix == ".mp4" else "image"
        content = [{"type": kind, kind: str(source)}, {"type": "text", "text": question}]
        answer = assistant.chat([{"role": "user", "content": content}], max_new_tokens=40)
        ms = (time.perf_counter() - t) * 1000
        say(f"\n{source.name}: {question}\n  -> {answer}   ({ms:.0f} ms)")
        if asked is None:
            continue
        boxes = parse_boxes(answer, w, h)
        if not boxes:
            say(f"     wrong: no box in the answer for {asked}")
        for box in boxes:
            iou = box.iou(Box(*SHAPES_TRUTH[asked]))
            right = iou >= RIGHT_IOU
            verdict = "right" if right else f"wrong (a right box has IoU >= {RIGHT_IOU})"
            other = f"; labelled {box.label!r}" if box.label != asked else ""
            say(f"     IoU with the true box of {asked}: {iou:.2f} -> {verdict}{other}")
            scores.append((asked, iou))
            tag = f"{box.label or 'no label'}\nIoU {iou:.2f} {'right' if right else 'wrong'}"
            drawn.append(_outline(box, LINE, tag))
            named = [SHAPE_COLOURS[word] for word in (box.label or "").lower().split() if word in SHAPE_COLOURS]
            colours.append(named[0] if named else SHAPE_COLOURS[asked.split()[1]])
    big = picture.resize((w * SCALE, h * SCALE), resample=0)  # nearest: the flat shapes stay flat
    truths = [_outline(Box(*xyxy), 3 * LINE) for xyxy in SHAPES_TRUTH.values()]
    truth_colours = [SHAPE_COLOURS[name.split()[1]] for name in SHAPES_TRUTH]
    big = draw_boxes(big, truths, colours=truth_colours, dashed=True, width=LINE)
    draw_boxes(big, drawn, out, colours=colours, width=LINE, font_size=16)
    say(f"\n(the truth: 3 shapes; one.png holds a {' '.join(ONE_TRUTH)}; the text says {TEXT_TRUTH}; the ball "
        f"moves {BALL_TRUTH})")  # fmt: skip
    right = sum(iou >= RIGHT_IOU for _, iou in scores)
    wrong = [f"{asked} (IoU {iou:.2f})" for asked, iou in scores if iou < RIGHT_IOU]
    missing = [name for name in SHAPES_TRUTH if name not in {asked for asked, _ in scores}]
    say(f"boxes: {right} of {len(SHAPES_TRUTH)} right (IoU >= {RIGHT_IOU})"
        + (f"; wrong: {', '.join(wrong)}" if wrong else "") + (f"; no box: {', '.join(missing)}" if missing else ""))
    say(f"the model's {len(drawn)} boxes (solid, labelled with their IoU) and the 3 true boxes (dashed), each in its "
        f"shape's colour, drawn on {shapes.name} {SCALE}x enlarged in {out}")
    act(assistant, agent_out, say)
    return scores


def act(assistant, out: str, say: Say = print) -> None:
    """One episode of the synthetic GUI: the model reads the screenshot, calls a tool, sees the result, again."""
    from qwen2vl.agent import GuiEnv, run as run_episode

    t = time.perf_counter()
    trajectory = run_episode(assistant, GuiEnv(), AGENT_TASK, seed=AGENT_SEED, max_steps=4, out=out)
    say(f"\nagent, in the synthetic GUI: {trajectory.task!r} (the shipped model is not trained to act yet: the "
        "loop, the screen and the page are what this shows)")
    for i, step in enumerate(trajectory.steps, 1):
        call = step.call and f"{step.call['name']}({step.call['arguments']})"
        say(f"  step {i}: {call or 'no call'}: {step.result.split('. ')[0].rstrip('.')}.")
    say(f"  {'succeeded' if trajectory.success else 'failed'} ({trajectory.reason}) in {len(trajectory.steps)} steps, "
        f"{time.perf_counter() - t:.1f} s; the trajectory (screenshots, clicks drawn) is {Path(out) / 'index.html'}")


def expected_cost(preset: str) -> str | None:
    """What the walk-through of a big preset will take (None for tiny): the memory from the parameter count; the
    time as measured (over 7 minutes at 9.3 GB on a 2-core CPU)."""
    if preset == "tiny":
        return None
    import torch

    from qwen2vl import Qwen2VL, qwen2vl_2b

    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2VL(qwen2vl_2b()).parameters())
    gb = n * 4 / 1e9  # built and initialised in float32 whatever --dtype, then cast
    return (f"The {preset} preset has {n / 1e9:.1f}B parameters: expect about {gb:.0f} GB of memory ({gb:.1f} GB "
            f"of float32 weights, plus activations) and several minutes on a CPU (over 7 minutes on 2 cores; this "
            f"machine has {os.cpu_count()}); --preset tiny takes seconds.")


def random_demo(preset: str = "tiny", dtype: str = "float32", new_tokens: int = 16, out: str = RANDOM_OUT,
                say: Say = print) -> None:
    """The example image through the real preprocessing, a random-weight model through save -> strict load ->
    vision -> M-RoPE -> cached decoding, and the grounding format on the image's true boxes, drawn to ``out``."""
    import torch

    from qwen2vl import Qwen2VL, qwen2vl_2b, tiny
    from qwen2vl.processing.grounding import Box, draw_boxes, format_box, parse_boxes
    from qwen2vl.processing.processor import MediaLoader

    torch_dtype = getattr(torch, dtype)
    c = tiny() if preset == "tiny" else qwen2vl_2b()
    say(f"\nDemo on the {preset} architecture with random weights ({torch_dtype}); `make demo` runs the trained "
        "one.")

    # 1. preprocessing of a real image: what it costs in tokens, at the default and at a smaller budget
    loader = MediaLoader()
    part = {"type": "image", "image": str(EXAMPLE_IMAGE)}
    info, patches = loader.load("image", part, "example image", {})
    small, _ = loader.load("image", part, "example image", {"max_pixels": 64 * 28 * 28})
    (h0, w0), (h, w) = info.original_size, info.size
    say(f"image {EXAMPLE_IMAGE.name}: {w0}x{h0} -> model input {w}x{h} (multiples of 28) -> grid {info.grid} "
        f"-> {info.grid[1] * info.grid[2]} patches of 14x14 -> {info.tokens} tokens after the 2x2 merge "
        f"(+2 for <|vision_start|>/<|vision_end|>); with max_pixels=64*28*28: {small.size[1]}x{small.size[0]}, "
        f"{small.tokens} tokens")

    # 2. a random-weight model through the checkpoint path and generation, fed those real patches
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2VL(c).to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    if preset == "tiny":  # exercise the checkpoint path too: hub-layout save, strict meta-device load
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            model = Qwen2VL.from_pretrained(d, dtype=torch_dtype)
    model = model.to(torch_dtype).eval()
    grid = torch.tensor([info.grid])
    text = [9707, 11, 1128, 374, 304, 419, 2168, 30]  # token ids of a question ("Hello, what is in this image?")
    ids = torch.tensor([[c.vision_start_token_id] + [c.image_token_id] * info.tokens + [c.vision_end_token_id] + text])
    pixels = torch.from_numpy(patches).to(torch_dtype)
    pos, delta = model.positions(ids, None, grid, None)
    gh, gw = info.grid[1] // 2, info.grid[2] // 2
    say(f"M-RoPE: the {info.tokens} image tokens span t 1..1, h 1..{gh}, w 1..{gw}; the text after them resumes "
        f"at {int(pos[0, 0, info.tokens + 2])}; next position {ids.shape[1] + int(delta)} (delta {int(delta)})")
    with torch.inference_mode():
        t0 = time.perf_counter()
        feats = model.visual(pixels, grid)
        t1 = time.perf_counter()
        new = model.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=new_tokens)
        t2 = time.perf_counter()
    say(f"vision tower: {tuple(feats.shape)} features in {t1 - t0:.2f} s")
    say(f"generate: {new_tokens} greedy tokens in {t2 - t1:.2f} s (prefill included), random weights so "
        f"random ids: {new[0].tolist()}")

    # 3. grounding: the ground-truth boxes in Qwen2-VL's text format, parsed back and drawn
    answer = " and ".join(format_box(Box(*xyxy), w0, h0, label=label) for label, xyxy in EXAMPLE_BOXES.items())
    boxes = parse_boxes(answer, w0, h0)
    draw_boxes(EXAMPLE_IMAGE, boxes, out)
    say(f"grounding format (0-1000 coordinates): {answer}")
    say(f"parsed back to pixels: {[(b.label, round(b.x1), round(b.y1), round(b.x2), round(b.y2)) for b in boxes]}; "
        f"drawn to {out}")
    say("\nNext: `qwen2vl chat MODEL_DIR --image examples/scene.png \"What is in the picture?\"` with a real "
        "checkpoint (or models/qwen2vl-synth and examples/shapes.png); `qwen2vl tokens --image examples/scene.png` "
        "prices any image or video.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="model directory (default: the shipped one)")
    parser.add_argument("--random", action="store_true", help="instead: an architecture walk-through, random weights")
    parser.add_argument("--preset", choices=["tiny", "2b"], help="architecture of --random (default tiny; implies it)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens --random generates")
    parser.add_argument("--out", help="where to save the grounding picture (default: demo_boxes.png, or "
                        "demo_random_boxes.png with --random)")
    parser.add_argument("--agent-out", help=f"where to write the agent episode's trajectory (default: {AGENT_OUT}/)")
    args = parser.parse_args(argv)
    run(args.model, random=args.random, preset=args.preset, dtype=args.dtype, new_tokens=args.new_tokens, out=args.out,
        agent_out=args.agent_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
