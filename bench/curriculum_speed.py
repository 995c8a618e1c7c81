"""Training throughput on the synthetic curriculum's rows, where `python -m recipes.synth run` spends its time.

The model is the curriculum's (``recipes.synth.scratch.small_config`` with ``Curriculum.model``: ViT 4x128, LLM
4x256 with 4 heads and 4 KV heads, rope_theta 1000, its ~430-token vocabulary; bench/README.md's figures were
measured with the earlier 2 KV heads and rope_theta 50), random weights from ``init_model_dir`` on a small synthesis
(``--examples`` of the stage-2 mix: captions and conversations, images 112-224 px, 8-frame clips). Each step is
one packed row of <= 2048 tokens (some 20 samples and as many pictures), forward + backward + AdamW, 2 threads.

  ours          the trainer's step: ``packing.pack`` + ``loss_sum`` (per-sample attention in the ViT and the LLM)
  transformers  5.24's Qwen2VLForConditionalGeneration (sdpa), the same weights, on the same samples: each row's
                samples padded to its longest (it has no packed rows for Qwen2-VL), ``labels=...``

each in fp32 and under bf16 autocast (weights and AdamW in fp32: ``qwen2vl train --dtype bfloat16``). Throughput =
real tokens / time over ``--rows`` rows after one warm-up row, the implementations taking turns row by row so that
this machine's drift (up to ~15%) falls on all of them alike. Ratios: ours / transformers, same dtype.

    .venv/bin/python bench/curriculum_speed.py [--rows 12] [--examples 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for recipes/

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.processing.processor import Processor  # noqa: E402
from qwen2vl.train.data import IGNORE  # noqa: E402
from qwen2vl.train.loop import TrainConfig, epoch_rows, prepare_samples  # noqa: E402
from qwen2vl.train.packing import loss_sum, pack  # noqa: E402
from recipes.synth.curriculum import Curriculum, _texts, stage2_data  # noqa: E402
from recipes.synth.data import synthesize  # noqa: E402
from recipes.synth.scratch import init_model_dir  # noqa: E402


def padded_batch(samples, config):
    """transformers' inputs for these samples: right padded to the longest, with the mm token types it wants."""
    L = max(len(s) for s in samples)
    ids = torch.full((len(samples), L), config.pad_token_id)
    labels = torch.full((len(samples), L), IGNORE)
    mask = torch.zeros((len(samples), L), dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s)], labels[b, : len(s)], mask[b, : len(s)] = s.input_ids, s.labels, 1
    media = {}
    for key, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [(s.patches(key), getattr(s, grid)) for s in samples if getattr(s, key) is not None]
        if parts:
            media[key], media[grid] = torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
    types = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
    return dict(input_ids=ids, attention_mask=mask, labels=labels, mm_token_type_ids=types, **media)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--examples", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import transformers

    c = Curriculum(out="")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        synthesize(d / "data", 0, args.examples, 6)
        stage2 = stage2_data(d / "data")
        init_model_dir(d / "init", _texts([stage2]), seed=0, **c.model)
        cfg = TrainConfig(stage=2, model=str(d / "init"), data=str(stage2), out=str(d / "out"), media=c.media)
        samples = prepare_samples(cfg, Processor.from_pretrained(cfg.model), lambda msg: None)
        ours = Qwen2VL.from_pretrained(d / "init", dtype=torch.float32).train()
        ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
            d / "init", dtype=torch.float32, attn_implementation="sdpa").train()  # fmt: skip
    config = ours.config
    rows = [[samples[i] for i in r] for r in epoch_rows(samples, 0, cfg)][: args.rows + 1]
    if len(rows) <= args.rows:
        raise SystemExit(f"--examples {args.examples} make only {len(rows)} rows; ask for more")
    optimizers = {id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for m in (ours, ref)}  # fmt: skip

    def step_ours(row, bf16):
        packed = pack(row, config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = loss_sum(ours, packed)
        (loss / n).backward()
        optimizers[id(ours)].step()
        ours.zero_grad(set_to_none=True)

    def step_ref(row, bf16):
        batch = padded_batch(row, config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = ref(**batch).loss
        loss.backward()
        optimizers[id(ref)].step()
        ref.zero_grad(set_to_none=True)

    modes = {("ours", "fp32"): (step_ours, False), ("transformers", "fp32"): (step_ref, False),
             ("ours", "bf16"): (step_ours, True), ("transformers", "bf16"): (step_ref, True)}  # fmt: skip
    seconds = dict.fromkeys(modes, 0.0)
    real = 0
    for i, row in enumerate(rows):
        for mode, (fn, bf16) in modes.items():
            t = time.perf_counter()
            fn(row, bf16)
            if i:  # row 0 warms up
                seconds[mode] += time.perf_counter() - t
        if i:
            real += sum(len(s) for s in row)
        print(f"  row {i}/{args.rows}", file=sys.stderr, end="\r")
    padded = sum(len(r) * max(len(s) for s in r) for r in rows[1:])
    print(f"\n{args.rows} packed rows of <= {cfg.batch_tokens} tokens from the curriculum's stage-2 mix: {real} real "
          f"tokens ({padded} padded, for transformers), {sum(len(r) for r in rows[1:]) / args.rows:.1f} samples a "
          f"row; forward + backward + AdamW, 2 threads")  # fmt: skip
    print(f"{'dtype':<6} {'ours tok/s':>11} {'transformers tok/s':>19} {'ours/transformers':>18}")
    for dtype in ("fp32", "bf16"):
        a, b = real / seconds[("ours", dtype)], real / seconds[("transformers", dtype)]
        print(f"{dtype:<6} {a:>11.0f} {b:>19.0f} {a / b:>18.2f}")
    print(f"ours bf16 / ours fp32: {seconds[('ours', 'fp32')] / seconds[('ours', 'bf16')]:.2f}")


if __name__ == "__main__":
    main()
