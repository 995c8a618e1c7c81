"""From scratch through the paper's three stages on the synthetic curriculum, with the library's public API only:
``data`` -> a small tokenizer and random model (``scratch``) -> stage 1 (ViT + merger on captions) -> stage 2
(everything: first the reading conversations alone, then captions + all instructions) -> stage 3 (ViT frozen,
instructions, one box question per conversation) -> ``qwen2vl.eval`` on the held-out split. Every stage is an
ordinary ``qwen2vl.train`` run whose checkpoint is exported for the next; the last one is also exported to
OUT/model with its weights in ``ship_dtype``, and that is the model evaluated (in float32).

The defaults are the recipe that trained ``models/qwen2vl-synth``; LOG.md says why each one is what it is.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import qwen2vl
from qwen2vl.eval.run import evaluate, markdown, write_report
from qwen2vl.processing.chat import DEFAULT_SYSTEM
from qwen2vl.train.export import export
from qwen2vl.train.loop import TrainConfig

from . import agent
from .data import QUESTIONS, VIDEO_MIN_PIXELS, synthesize
from .scratch import init_model_dir


@dataclass
class Curriculum:
    out: str
    seed: int = 0
    train_examples: int = 30000
    # 200 held-out questions per task (at 50 one answer moved a score by 2 points). The train split is drawn
    # first, so this number changes no training file.
    test_examples: int = 1200
    mix: dict | None = None  # the train split's task weights; None: data.TRAIN_MIX
    vocab_size: int = 1024  # an upper bound: the synthetic corpus runs out of merges at about 420
    # small_config keywords (width, layers, ...). Qwen2-VL's rotary base of 1e6 turns a column of a small picture
    # by 2e-4 rad, so the LLM cannot tell columns apart; base 1000 with the split (2, 6, 24) turns it by 0.18 rad
    # and keeps 15 slow frequencies that match content wherever it sits. Four KV heads, one per query head: with
    # two, boxes followed the left-most, top-most shape rather than the named one.
    model: dict = field(default_factory=lambda: {"rope_theta": 1000.0, "mrope_section": (2, 6, 24), "kv_heads": 4})
    batch_tokens: int = 2048
    # Stage 2 gets most of the time: it is the last in which the ViT learns.
    steps: tuple[int, int, int] = (100, 2700, 1200)
    lr: tuple[float, float, float] = (3e-4, 1e-3, 5e-4)
    # Stage 2 opens with this many steps on the reading (OCR) conversations alone, at ``focus_lr``: reading 2-4
    # glyphs in order never takes off inside the six-task mix, while alone it is learnt in minutes, and the mixed
    # stage 2 then keeps it. 0: no focus.
    focus_steps: int = 400
    focus_lr: float = 3e-4
    # From scratch, stage 1 (against a random, frozen LLM) leaves the ViT far from trained, so stage 2 trains it at
    # the full learning rate rather than the preset's tenth.
    vision_lr_scale: float = 1.0
    warmup_steps: int = 30
    # TrainConfig.dtype of every stage: bf16 autocast (weights and AdamW stay fp32) bought the steps above on a CPU
    # with bf16 instructions; "float32" where bf16 is emulated.
    dtype: str = "bfloat16"
    ship_dtype: str = "bfloat16"  # the final model (OUT/model) stores its weights so: half the bytes to ship
    media: dict = field(default_factory=lambda: {"max_pixels": 256 * 28 * 28})
    # The agent stage (agent.py): after stage 3, everything trains on oracle episodes in the synthetic GUI (a
    # 448-px screenshot is 256 tokens, the tools' system prompt ~850) with some stage-3 conversations mixed in, so
    # that the model keeps answering them. 0 steps (the default, and the shipped model's recipe): no agent stage.
    # Off by default because it does not work yet: six trials of 450-550 steps (LOG.md, 2026-12-08) fit the
    # episodes' format but not the task's choice of action; held out, at best 40% of one-step tasks succeed.
    agent_episodes: int = 4000
    agent_chat: int = 3000  # stage-3 conversations in the mix
    agent_steps: int = 0
    agent_lr: float = 1e-3
    agent_batch_tokens: int = 4096  # an episode is 1,300-2,000 tokens: two or three to a row
    agent_test_episodes: int = 200


TEMPLATE_TEXTS = (f"system\n{DEFAULT_SYSTEM}", "\n", "user\n", "assistant\n")  # ChatML between its specials
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
# The clips' loader settings, written into the model directory so that the exported model sizes a clip as it
# was trained (the shipped model carries the same file).
VIDEO_SETTINGS = {"min_pixels": VIDEO_MIN_PIXELS, "max_pixels": 768 * 28 * 28}


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
    lines = [line + "\n" for line in source.read_text().splitlines() if json.loads(line)["task"] in tasks]
    dest.write_text("".join(lines))
    return dest


def _text(content) -> str:
    return content if isinstance(content, str) else next(p["text"] for p in content if p.get("type") == "text")


def one_box_each(source: Path, dest: Path) -> Path:
    """The conversations of ``source`` written to ``dest`` with each picture's "Where is" questions in conversations
    of their own: the first stays where it was among the picture's other questions (so a counting picture still
    opens with "How many", as its held-out question does), each further one gets the picture again, alone.
    Records with at most one such question are copied as they are. Why: in a conversation that asks where two or
    three shapes are, the later boxes can be told without reading the name (the one shape not boxed yet), while
    the held-out question is always the first; split, every box has to be found by its name."""
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
                content = [*media, {"type": "text", "text": text}] if k == 0 else text
                messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
            lines.append(json.dumps({"task": record["task"], "messages": messages}))
    dest.write_text("".join(line + "\n" for line in lines))
    return dest


def agent_mix(c: Curriculum, data: Path) -> Path:
    """The agent stage's data, ``data``/agent_mix.jsonl: the GUI episodes and ``c.agent_chat`` stage-3
    conversations, shuffled."""
    dest = data / "agent_mix.jsonl"
    if not dest.exists():
        episodes = agent.episodes(data, c.agent_episodes, seed=c.seed).read_text().splitlines()
        chat = (data / "stage3.jsonl").read_text().splitlines()
        lines = episodes + random.Random(c.seed).sample(chat, min(c.agent_chat, len(chat)))
        random.Random(c.seed).shuffle(lines)
        dest.write_text("".join(line + "\n" for line in lines))
    return dest


def stage_config(c: Curriculum, name: str, stage: int, model: Path, data: Path, steps: int, lr: float) -> TrainConfig:
    """The ``qwen2vl.train`` settings of one stage (stage 2's reading focus is a stage-2 run of its own)."""
    out = Path(c.out)
    return TrainConfig(
        stage=stage,
        model=str(model),
        data=str(data),
        out=str(out / name),
        max_steps=steps,
        batch_tokens=c.agent_batch_tokens if name == "agent" else c.batch_tokens,
        lr=lr,
        vision_lr_scale=c.vision_lr_scale,
        warmup_steps=c.warmup_steps,
        save_every=max(50, steps // 4),
        seed=c.seed,
        media=c.media,
        resume=(out / name / "latest").exists(),
        dtype=c.dtype,
        video_cache=str(out / "cache" / "videos"),
    )


def train_in_a_new_process(cfg: TrainConfig) -> None:
    """``train(cfg)`` in a new Python process, its progress and any error on this one's stderr. Why: in one long
    process every stage ran slower than the last (LOG.md)."""
    code = (
        "import json, sys; from qwen2vl.train.loop import TrainConfig, train; "
        "train(TrainConfig(**json.loads(sys.argv[1])))"
    )
    here = str(Path(qwen2vl.__file__).resolve().parents[1])  # the directory that holds the qwen2vl package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    status = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg))], env=env).returncode
    if status:
        raise RuntimeError(f"training into {cfg.out} failed (exit status {status}); its error is above")


def run(c: Curriculum) -> dict:
    """Data, tokenizer and model, the stages, the export and the evaluation, each skipped where its output is
    there already (so a stopped run picks up where it stopped); returns the evaluation report."""
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    if not (data / "test.jsonl").exists():
        log(f"synthesizing {c.train_examples} training and {c.test_examples} held-out examples")
        synthesize(data, c.seed, c.train_examples, c.test_examples, mix=c.mix)
    stage2 = stage2_data(data)
    model = out / "init"
    if not model.exists():
        log("training the tokenizer and initialising the model")
        corpus = _texts([data / "pretrain.jsonl", data / "train.jsonl"])
        init_model_dir(model, corpus, vocab_size=c.vocab_size, seed=c.seed, video=VIDEO_SETTINGS, **c.model)
    focus = _only(data / "train.jsonl", ("ocr",), data / "focus.jsonl")  # the reading conversations
    stage3 = one_box_each(data / "train.jsonl", data / "stage3.jsonl")
    runs = [
        ("stage1", 1, data / "pretrain.jsonl", c.steps[0], c.lr[0]),
        ("stage2-focus", 2, focus, c.focus_steps, c.focus_lr),
        ("stage2", 2, stage2, c.steps[1], c.lr[1]),
        ("stage3", 3, stage3, c.steps[2], c.lr[2]),
    ]
    timings = {}
    for name, stage, source, steps, lr in runs:
        done = out / f"{name}-model"
        if done.exists():
            model = done
            continue
        if name == "stage2-focus" and steps == 0:
            continue
        log(f"{name.replace('stage', 'stage ').replace('-', ', ')}: {steps} steps")
        t = time.perf_counter()
        train_in_a_new_process(stage_config(c, name, stage, model, source, steps, lr))
        timings[name] = round(time.perf_counter() - t, 1)
        model = export(out / name, done, base=out / "init")
    final = out / "model"
    if not final.exists():
        # stage 3 in the shipping dtype: the model before the agent stage (the shipped model of stop 34)
        three = out / "stage3-ship" if c.agent_steps else final
        if not three.exists():
            export(out / "stage3", three, base=out / "init", dtype=c.ship_dtype)
        if c.agent_steps:
            log(f"agent: {c.agent_steps} steps on GUI episodes")
            t = time.perf_counter()
            mix = agent_mix(c, data)
            train_in_a_new_process(stage_config(c, "agent", 2, three, mix, c.agent_steps, c.agent_lr))
            timings["agent"] = round(time.perf_counter() - t, 1)
            export(out / "agent", final, base=out / "init", dtype=c.ship_dtype)
    timings["total"] = round(time.perf_counter() - t0, 1)  # data, tokenizer, the stages, exports
    log(f"trained in {timings['total'] / 60:.1f} min; evaluating {final} on the held-out split")
    assistant = qwen2vl.load(final, dtype=torch.float32)
    report = evaluate(assistant, data / "test.jsonl", max_new_tokens=32)
    if c.agent_steps:
        report["agent"] = agent.success_rates(assistant, c.agent_test_episodes)
    report["train_seconds"] = timings
    write_report(report, out / "eval.json")
    print(markdown(report))
    if "agent" in report:
        a = report["agent"]
        print(f"\nGUI agent, {a['episodes']} held-out episodes: one-step {100 * a['one_step']:.1f}%, multi-step "
              f"{100 * a['multi_step']:.1f}% (" + ", ".join(f"{t} {100 * v:.0f}%" for t, v in a["templates"].items())
              + ")")
    log(f"done: {final}")
    return report
