"""From scratch through the paper's three stages on the synthetic curriculum, with the project's own pieces only:
``synth`` data -> a small tokenizer and random model (``scratch``) -> stage 1 (ViT + merger on captions) ->
stage 2 (everything, captions + instructions) -> stage 3 (ViT frozen, instructions) -> ``eval`` on the held-out
split. Every stage is an ordinary ``train`` run whose checkpoint is exported for the next; the last one is also
exported to OUT/model with its weights in ``ship_dtype``, and that is the model evaluated (in float32).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..processing.chat import DEFAULT_SYSTEM
from .export import export
from .loop import TrainConfig, train
from .scratch import init_model_dir


@dataclass
class Curriculum:
    out: str
    seed: int = 0
    train_examples: int = 20000
    test_examples: int = 300
    vocab_size: int = 1024  # an upper bound: the synthetic corpus runs out of merges at about 420
    model: dict = field(default_factory=dict)  # small_config keywords (width, layers, ...)
    batch_tokens: int = 2048
    # 43-45 min on 2 cores in all. Stage 1 is short: against a random, frozen LLM it teaches the ViT little. Stage
    # 3 is long because the merger and the LLM keep learning there (a trial run's held-out scores after stage 2 ->
    # after stage 3: counting 72% -> 84%, shape 64% -> 72%, direction 86% -> 100%).
    steps: tuple[int, int, int] = (100, 2600, 1500)
    lr: tuple[float, float, float] = (2e-3, 1e-3, 5e-4)
    # From scratch, stage 1 (against a random, frozen LLM) leaves the ViT far from trained, so stage 2 trains it at
    # the full learning rate rather than the preset's tenth.
    vision_lr_scale: float = 1.0
    warmup_steps: int = 30
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
        synthesize(data, c.seed, c.train_examples, c.test_examples)
    stage2 = data / "stage2.jsonl"  # stage 2 sees both kinds of data
    stage2.write_text((data / "pretrain.jsonl").read_text() + (data / "train.jsonl").read_text())
    model = out / "init"
    if not model.exists():
        log("training the tokenizer and initialising the model")
        init_model_dir(model, _texts([data / "pretrain.jsonl", data / "train.jsonl"]), vocab_size=c.vocab_size,
                       seed=c.seed, **c.model)  # fmt: skip
    sources = {1: data / "pretrain.jsonl", 2: stage2, 3: data / "train.jsonl"}
    timings = {}
    for stage in (1, 2, 3):
        done = out / f"stage{stage}-model"
        if done.exists():
            model = done
            continue
        log(f"stage {stage}: {c.steps[stage - 1]} steps")
        t = time.perf_counter()
        cfg = TrainConfig(
            stage=stage, model=str(model), data=str(sources[stage]), out=str(out / f"stage{stage}"),
            max_steps=c.steps[stage - 1], batch_tokens=c.batch_tokens, lr=c.lr[stage - 1],
            vision_lr_scale=c.vision_lr_scale,
            warmup_steps=c.warmup_steps, save_every=max(50, c.steps[stage - 1] // 4), seed=c.seed, media=c.media,
            resume=(out / f"stage{stage}" / "latest").exists(),
        )  # fmt: skip
        train(cfg)
        timings[f"stage{stage}"] = round(time.perf_counter() - t, 1)
        model = export(out / f"stage{stage}", done, base=out / "init")
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
