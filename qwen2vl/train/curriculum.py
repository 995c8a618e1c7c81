"""From scratch through the paper's three stages on the synthetic curriculum, with the project's own pieces only:
``synth`` data -> a small tokenizer and random model (``scratch``) -> stage 1 (ViT + merger on captions) ->
stage 2 (everything, captions + instructions) -> stage 3 (ViT frozen, instructions) -> ``eval`` on the held-out
split. Every stage is an ordinary ``train`` run whose checkpoint is exported for the next.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .export import export
from .loop import TrainConfig, train
from .scratch import init_model_dir


@dataclass
class Curriculum:
    out: str
    seed: int = 0
    train_examples: int = 4000
    test_examples: int = 300
    vocab_size: int = 1024
    model: dict = field(default_factory=dict)  # small_config keywords (width, layers, ...)
    batch_tokens: int = 2048
    steps: tuple[int, int, int] = (300, 600, 600)
    lr: tuple[float, float, float] = (2e-3, 1e-3, 5e-4)
    warmup_steps: int = 30
    media: dict = field(default_factory=lambda: {"max_pixels": 256 * 28 * 28})


def _texts(paths: list[Path]):
    """Every text of the corpus (captions, questions, answers): what the tokenizer is trained on."""
    for path in paths:
        for line in path.read_text().splitlines():
            for m in json.loads(line)["messages"]:
                content = m["content"]
                if isinstance(content, str):
                    yield content
                else:
                    yield from (p["text"] for p in content if p.get("type") == "text")


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
            warmup_steps=c.warmup_steps, save_every=max(50, c.steps[stage - 1] // 4), seed=c.seed, media=c.media,
            resume=(out / f"stage{stage}" / "latest").exists(),
        )  # fmt: skip
        train(cfg)
        timings[f"stage{stage}"] = round(time.perf_counter() - t, 1)
        model = export(out / f"stage{stage}", done, base=out / "init")
    log("evaluating on the held-out split")
    from .. import load

    report = evaluate(load(model), data / "test.jsonl", max_new_tokens=32)
    report["train_seconds"] = timings
    write_report(report, out / "eval.json")
    print(markdown(report))
    log(f"done: {model}")
    return report
