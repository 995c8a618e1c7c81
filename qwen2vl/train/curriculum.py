"""From scratch through the paper's three stages on the synthetic curriculum, with the project's own pieces only:
``synth`` data -> a small tokenizer and random model (``scratch``) -> stage 1 (ViT + merger on captions) ->
stage 2 (everything: first the reading conversations alone, then captions + all instructions) -> stage 3 (ViT
frozen, instructions, one box question per conversation) -> ``eval`` on the held-out split. Every stage is an
ordinary ``train`` run whose checkpoint is exported for the next; the last one is also exported to OUT/model with
its weights in ``ship_dtype``, and that is the model evaluated (in float32).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..processing.chat import DEFAULT_SYSTEM
from .export import export
from .loop import TrainConfig
from .scratch import init_model_dir


@dataclass
class Curriculum:
    out: str
    seed: int = 0
    train_examples: int = 30000
    # 200 held-out questions per task: at 50 a single answer moved a score by 2 points, and the shipped model that
    # scored shape 94%, counting 70% and direction 94% on 50 scored 91.5%, 60.5% and 89.5% on 200. The train split
    # is drawn first, so this number changes no training file.
    test_examples: int = 1200
    mix: dict | None = None  # the train split's task weights; None: synth.TRAIN_MIX
    # synth.SHAPE_GRID: shapes fill blocks of the 28-px cells one merged token covers (14: on the 14-px patch grid,
    # as the data of the models before the cells one; 1: placed to the pixel)
    grid: int = 28
    frame: bool = False  # a grey line along the edges of every shapes picture (synth.FRAME: tried, not better)
    select: int = 0  # synth's selection questions per counting and grounding picture
    caption_order: str = "reading"  # one of synth.CAPTION_ORDERS: top to bottom ("reading") or shuffled
    lone_boxes: bool = True  # synth's boxes (questions, captions) in one-shape pictures
    vocab_size: int = 1024  # an upper bound: the synthetic corpus runs out of merges at about 420
    # small_config keywords (width, layers, ...). The LLM's rotary frequencies: M-RoPE turns the fastest of a head's
    # 32 with the temporal position, the next with the height and the slowest with the width, in the numbers of
    # ``mrope_section``. At Qwen2-VL's base of 1e6 and its 1:1.5:1.5 split (8, 12, 12) a column turns the fastest
    # width frequency by 2e-4 rad: to the LLM every column of a 4-8 token wide picture is the same place, and no run
    # at 1e6 learned where a shape is across. At base 50 (the models before this one) a column turns it by 0.09 rad
    # and a row the fastest height one by 0.38, but only 3 of the 32 turn by less than 0.25 rad across a picture,
    # the quiet ones that let a query match what an image token holds wherever it sits. Base 1000 split (2, 6, 24):
    # 0.18 rad per column, 0.65 per row, and 15 quiet frequencies; the same seed-0 run then scored grounding 22%
    # (was 15.5%), counting 100% (99.5%) and everything else 100% as before; within one other seed's reach, and the
    # boxes still follow the left-most and top-most shape rather than the named one (README).
    # Four KV heads, not small_config's two: with two, each pair of query heads shared one key and one value
    # projection, and boxes followed the left-most and top-most shape (grounding 22%); with four the same seed-0
    # run found 60% of the held-out boxes (46.5% of 600 fresh ones; seed 1: 38%; README).
    model: dict = field(default_factory=lambda: {"rope_theta": 1000.0, "mrope_section": (2, 6, 24), "kv_heads": 4})
    batch_tokens: int = 2048
    # About 43 min on 2 cores in all (42.8 with 4 KV heads; 39 with 2, 46.6 in a slow period), in bf16 autocast,
    # each stage in a new process (in one process each stage ran slower than the last). Stage 1 is short: against
    # a random, frozen LLM it teaches the ViT little. Stage 2 gets most of the time because it is the last in which
    # the ViT learns. On the patch grid, fp32 paid for 2050 and 900 steps in about the same time (shape 91.5%,
    # counting 60.5%, direction 89.5%, grounding 7%; bf16: 97, 67.5, 94, 12; in cells: 100, 99.5, 100, 15.5); with
    # stage 3 at 600 steps instead of 900 the clips' directions were 82% right, not 94%.
    steps: tuple[int, int, int] = (100, 2700, 1200)
    # Stage 2's mix at 1e-3 (after the focus at 3e-4): at 3e-4 the same run told the clips' directions 24% right.
    lr: tuple[float, float, float] = (3e-4, 1e-3, 5e-4)
    # Stage 2 opens with this many steps on the reading (OCR) conversations alone, at ``focus_lr``. Reading 2-4
    # glyphs in order is the one skill that never took off inside the six-task mix (a 45-min run still answered
    # the same two characters to every strip), while alone it is learnt in minutes: a 400-step OCR-only trial
    # read 100% of held-out strips at lr 3e-4, 0% at 6e-4 (its loss spiking) and at 1e-3 (a plateau). Once the
    # ViT has glyph features, the mixed stage 2 keeps them.
    focus_steps: int = 400
    focus_lr: float = 3e-4
    # Before the reading focus, this many steps on the shapes conversations alone (the shape, counting and grounding
    # pictures, each with all its questions), at ``see_lr``. Off by default: on seed 2 (shape worst) shape went
    # 36% -> 80%, counting 72 -> 60; on seed 0 (the shipped one) shape 91.5 -> 86.5, counting 60.5 -> 68.5 (README).
    # Placed after the reading focus instead, it undid an unfinished reading (OCR 0%).
    see_steps: int = 0
    see_lr: float = 1e-3
    see_tasks: tuple[str, ...] = ("shape", "counting", "grounding")
    # Stage 3 on ``one_box_each``'s conversations: a picture's "Where is" questions one per conversation, so that
    # no box can be told by leaving out the boxes already given (a second box of a two-shape picture needs no name).
    # From the shipped recipe's seed-0 stage-2 model it found 58.3% of 600 fresh boxes, not 46.5%, its rows the
    # named shape's 88 times in 150, not 71 (README).
    split_boxes: bool = True
    # From scratch, stage 1 (against a random, frozen LLM) leaves the ViT far from trained, so stage 2 trains it at
    # the full learning rate rather than the preset's tenth.
    vision_lr_scale: float = 1.0
    warmup_steps: int = 30
    loss_weighting: str = "token"  # TrainConfig.loss_weighting of every stage
    # TrainConfig.dtype of every stage. bf16 autocast (weights and AdamW stay fp32) trains 1.2-1.4x faster on this
    # AVX-512 CPU (bench/curriculum_speed.py), and the steps it buys are what improved the shipped model.
    dtype: str = "bfloat16"
    ship_dtype: str = "bfloat16"  # the final model (OUT/model) stores its weights so: half the bytes to ship
    media: dict = field(default_factory=lambda: {"max_pixels": 256 * 28 * 28})


TEMPLATE_TEXTS = (f"system\n{DEFAULT_SYSTEM}", "\n", "user\n", "assistant\n")  # ChatML between its specials
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def _texts(paths: list[Path]):
    """What the tokenizer is trained on: every text of the corpus (captions, questions, answers) and the chat
    template's own words once per record (else every sample spends ~40 tokens spelling out the system prompt).
    Special-token markup is left out (those are added whole), and so are the OCR strings: random letters would
    only teach it merges like "QLP", and one character per token is what reading them in order wants."""
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            yield from TEMPLATE_TEXTS
            for m in record["messages"]:
                content = m["content"]
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                texts = [p["text"] for p in parts if p.get("type") == "text"]
                for text in texts:
                    if record.get("task") == "ocr" and not text.endswith("?"):  # an OCR answer or caption
                        text = text.rsplit(" ", 1)[0] if " " in text else ""
                    yield _SPECIAL.sub("\n", text)


def stage2_data(data: Path) -> Path:
    """Stage 2's mix, written to ``data``/stage2.jsonl: both kinds of data, the captions then the conversations."""
    dest = data / "stage2.jsonl"
    dest.write_text((data / "pretrain.jsonl").read_text() + (data / "train.jsonl").read_text())
    return dest


def _only(source: Path, tasks: tuple[str, ...], dest: Path) -> Path:
    """The records of ``source`` whose task is one of ``tasks``, written to ``dest``."""
    dest.write_text("".join(line + "\n" for line in source.read_text().splitlines()
                            if json.loads(line)["task"] in tasks))  # fmt: skip
    return dest


def _text(content) -> str:
    return content if isinstance(content, str) else next(p["text"] for p in content if p.get("type") == "text")


def one_box_each(source: Path, dest: Path) -> Path:
    """The conversations of ``source`` written to ``dest`` with each picture's "Where is" questions in conversations
    of their own: the first stays where it was among the picture's other questions (so a counting picture still
    opens with "How many", as its held-out question does), each further one gets the picture again, alone.
    Records with at most one such question are copied as they are. In a conversation that asks where two or three shapes
    are, the later boxes can be told without reading the name (the one shape not boxed yet), while the held-out
    question is always the first; split, every box has to be found by its name."""
    from .synth import QUESTIONS  # (synth imports av: not at the CLI's start)

    where_is = QUESTIONS["grounding"].split("{}")[0]  # "Where is "
    lines = []
    for line in source.read_text().splitlines():
        record = json.loads(line)
        m = record["messages"]
        turns = [(m[i]["content"], m[i + 1]["content"]) for i in range(0, len(m), 2)]
        where = [t for t in turns if _text(t[0]).startswith(where_is)]
        if len(where) < 2:
            lines.append(line)
            continue
        media = [p for p in m[0]["content"] if p.get("type") != "text"]
        first = [t for t in turns if not any(t is w for w in where[1:])]
        for group in [first, *([w] for w in where[1:])]:
            messages = []
            for k, (question, answer) in enumerate(group):
                text = _text(question)
                messages += [{"role": "user", "content": [*media, {"type": "text", "text": text}] if k == 0 else text},
                             {"role": "assistant", "content": answer}]  # fmt: skip
            lines.append(json.dumps({"task": record["task"], "messages": messages}))
    dest.write_text("".join(line + "\n" for line in lines))
    return dest


def train_in_a_new_process(cfg: TrainConfig) -> None:
    """``train(cfg)`` in a new Python process (which imports this same package), its progress and any error on
    this one's stderr. Why: in one long process every stage ran slower than the last (stage 3 of a full run took
    0.62 s/step; its first 120 steps, the same batches, 0.44 s/step in a new process), and the full run took 46.4
    min instead of 39.3."""
    code = ("import json, sys; from qwen2vl.train.loop import TrainConfig, train; "
            "train(TrainConfig(**json.loads(sys.argv[1])))")
    here = str(Path(__file__).resolve().parents[2])  # the directory that holds the qwen2vl package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    status = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg))], env=env).returncode
    if status:
        raise RuntimeError(f"training into {cfg.out} failed (exit status {status}); its error is above")


def run(c: Curriculum) -> dict:
    from ..eval.run import evaluate, markdown, write_report
    from .synth import synthesize

    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if not (data / "test.jsonl").exists():
        log(f"synthesizing {c.train_examples} training and {c.test_examples} held-out examples")
        synthesize(data, c.seed, c.train_examples, c.test_examples, mix=c.mix, grid=c.grid, frame=c.frame,
                   select=c.select, caption_order=c.caption_order, lone_boxes=c.lone_boxes)
    stage2 = stage2_data(data)
    model = out / "init"
    if not model.exists():
        log("training the tokenizer and initialising the model")
        init_model_dir(model, _texts([data / "pretrain.jsonl", data / "train.jsonl"]), vocab_size=c.vocab_size,
                       seed=c.seed, **c.model)  # fmt: skip
    focus = _only(data / "train.jsonl", ("ocr",), data / "focus.jsonl")  # the reading conversations
    see = _only(data / "train.jsonl", c.see_tasks, data / "see.jsonl") if c.see_steps else None
    stage3 = one_box_each(data / "train.jsonl", data / "stage3.jsonl") if c.split_boxes else data / "train.jsonl"
    # (name, stage preset, data, steps, lr): stage 2's focuses are stage-2 runs of their own
    runs = [("stage1", 1, data / "pretrain.jsonl", c.steps[0], c.lr[0]),
            ("stage2-see", 2, see, c.see_steps, c.see_lr),
            ("stage2-focus", 2, focus, c.focus_steps, c.focus_lr),
            ("stage2", 2, stage2, c.steps[1], c.lr[1]),
            ("stage3", 3, stage3, c.steps[2], c.lr[2])]  # fmt: skip
    timings = {}
    for name, stage, source, steps, lr in runs:
        done = out / f"{name}-model"
        if done.exists():
            model = done
            continue
        if name in ("stage2-see", "stage2-focus") and steps == 0:  # no such focus
            continue
        log(f"{name.replace('stage', 'stage ').replace('-', ', ')}: {steps} steps")
        t = time.perf_counter()
        cfg = TrainConfig(
            stage=stage, model=str(model), data=str(source), out=str(out / name), max_steps=steps,
            batch_tokens=c.batch_tokens, lr=lr, vision_lr_scale=c.vision_lr_scale, warmup_steps=c.warmup_steps,
            save_every=max(50, steps // 4), seed=c.seed, media=c.media, resume=(out / name / "latest").exists(),
            loss_weighting=c.loss_weighting, dtype=c.dtype, video_cache=str(out / "cache" / "videos"),
        )  # fmt: skip
        train_in_a_new_process(cfg)
        timings[name] = round(time.perf_counter() - t, 1)
        model = export(out / name, done, base=out / "init")
    final = out / "model"
    if not final.exists():
        export(out / "stage3", final, base=out / "init", dtype=c.ship_dtype)
    timings["total"] = round(time.perf_counter() - t0, 1)  # synth, tokenizer, the three stages, exports
    log(f"trained in {timings['total'] / 60:.1f} min; evaluating {final} on the held-out split")
    from .. import load

    report = evaluate(load(final, dtype=torch.float32), data / "test.jsonl", max_new_tokens=32)
    report["train_seconds"] = timings
    write_report(report, out / "eval.json")
    print(markdown(report))
    log(f"done: {final}")
    return report
