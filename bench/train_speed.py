"""Training-step throughput: packing against padding to the longest sample, and against transformers' model in a
plain loop on the same padded batch, in the same run.

Model: a small Qwen2-VL-architecture config (the 2B's optimizer state does not fit this machine's 24 GiB):
ViT depth 4, width 256; LLM 4 layers, width 512, GQA 8/2, the real 151,936-token vocabulary; random weights,
fp32, ``torch.set_num_threads(2)``. Batch: 8 samples of mixed lengths (a 112-448 px image each, 20-400 text
tokens), 40% of tokens supervised.

  packed   ours: the samples in rows of <= --budget tokens (``train/packing.py``), per-sample attention, one
           row after another, loss summed over supervised tokens (what ``qwen2vl train`` runs)
  padded   ours: the 8 samples in one batch, left padded to the longest, attention mask, same loss
  hf       transformers 5.24 Qwen2VLForConditionalGeneration (sdpa) on the same padded batch, ``labels=...``
Each: forward, backward, AdamW step. Throughput = real (non-padding) tokens / step time, median of --repeats
after a warm-up step. Ratios are ours-packed / each other (> 1: packing is faster).

    .venv/bin/python bench/train_speed.py [--repeats 3] [--budget 2048] [--device cuda] [--bf16]

On a GPU (``--device cuda``) every step ends with a synchronisation, so the clock sees the work done; ``--bf16``
runs both models' forwards under bf16 autocast (weights and AdamW stay fp32, as ``qwen2vl train --dtype
bfloat16`` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import qwen2vl  # noqa: E402
from timing import timed  # noqa: E402  (bench/timing.py)
from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig  # noqa: E402
from qwen2vl.train.data import IGNORE, Sample  # noqa: E402
from qwen2vl.train.packing import loss_sum, pack, plan_rows  # noqa: E402


def small_config() -> Qwen2VLConfig:
    base = qwen2vl.tiny()
    vision = VisionConfig(**{**base.vision.__dict__, "depth": 4, "embed_dim": 256, "num_heads": 4, "hidden_size": 512})
    text = TextConfig(**{**base.text.__dict__, "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
                         "num_key_value_heads": 2, "intermediate_size": 1408, "mrope_section": (8, 12, 12)})  # fmt: skip
    return Qwen2VLConfig(**{**base.__dict__, "vision": vision, "text": text})


def make_samples(n: int = 8, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        side = int(torch.randint(4, 17, (1,), generator=g)) * 2  # patches per side: 112-448 px
        tokens = side * side // 4
        text = int(torch.randint(20, 400, (1,), generator=g))
        ids = [151644, 872, 198, 151652] + [151655] * tokens + [151653] + torch.randint(0, 150000, (text,), generator=g).tolist()
        supervised = int(text * 0.4)  # the answer: the last 40% of the text
        labels = [IGNORE] * (len(ids) - supervised) + ids[len(ids) - supervised :]
        grid = torch.tensor([[1, side, side]])
        out.append(Sample(torch.tensor(ids), torch.tensor(labels), torch.randn(side * side, 1176, generator=g), grid))
    return out


def padded(samples: list[Sample]):
    L = max(len(s) for s in samples)
    ids = torch.full((len(samples), L), 151643)
    labels = torch.full((len(samples), L), IGNORE)
    mask = torch.zeros((len(samples), L), dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, L - len(s) :], labels[b, L - len(s) :], mask[b, L - len(s) :] = s.input_ids, s.labels, 1
    return ids, labels, mask, torch.cat([s.pixel_values for s in samples]), torch.cat([s.image_grid_thw for s in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(2)
    import tempfile

    from helpers import make_reference, mm_token_type_ids

    cfg = small_config()
    with tempfile.TemporaryDirectory() as d:
        ref = make_reference(cfg, d, attn="sdpa").train()
        ours = qwen2vl.Qwen2VL.from_pretrained(d).train()
    ref, ours = ref.to(device), ours.to(device)
    samples = make_samples()
    real = sum(len(s) for s in samples)
    rows = [pack([samples[i] for i in r], cfg).to(device) for r in plan_rows([len(s) for s in samples], args.budget)]
    count = sum(r.supervised for r in rows)
    ids, labels, mask, pv, grid = (t.to(device) for t in padded(samples))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def optimizer_for(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    opt_ours, opt_ref = optimizer_for(ours), optimizer_for(ref)

    def step_packed():
        opt_ours.zero_grad(set_to_none=True)
        for row in rows:
            with autocast:
                loss, _ = loss_sum(ours, row)
            (loss / count).backward()
        opt_ours.step()
        sync()

    def step_padded():
        opt_ours.zero_grad(set_to_none=True)
        with autocast:
            h = ours.hidden(ids, mask, pv, grid)
            targets = labels[:, 1:]
            keep = targets != IGNORE
            loss = F.cross_entropy(ours.lm_head(h[:, :-1][keep]).float(), targets[keep])
        loss.backward()
        opt_ours.step()
        sync()

    def step_hf():
        opt_ref.zero_grad(set_to_none=True)
        with autocast:
            out = ref(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, labels=labels,
                      mm_token_type_ids=mm_token_type_ids(ids))  # fmt: skip
        out.loss.backward()
        opt_ref.step()
        sync()

    results = {}
    for name, step in (("packed", step_packed), ("padded", step_padded), ("hf", step_hf)):
        results[name] = timed(step, args.repeats)[0]
        print(f"  {name}: {results[name]:.2f} s/step", file=sys.stderr)
    padded_tokens = ids.numel()
    print(f"\n8 samples, {real} real tokens ({padded_tokens} when padded to the longest, {len(rows)} packed row(s) "
          f"of <= {args.budget}); forward + backward + AdamW, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else '2 threads'}")  # fmt: skip
    print(f"{'mode':<44} {'s/step':>8} {'tokens/s':>9} {'packed/x':>9}")
    names = {"packed": "ours, packed", "padded": "ours, padded to the longest",
             "hf": "transformers, padded, plain loop"}  # fmt: skip
    for name, seconds in results.items():
        print(f"{names[name]:<44} {seconds:>8.2f} {real / seconds:>9.0f} {seconds / results['packed']:>9.2f}")


if __name__ == "__main__":
    main()
