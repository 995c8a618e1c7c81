"""Speed of qwen2vl next to transformers (sdpa) on a CUDA GPU, on the Qwen2-VL-2B architecture.

The same random weights in both (built as in ``model_speed.py``: ours initialised, transformers holding the very
tensors), moved to the GPU in the chosen dtype. TF32 off, so float32 means float32 in both. Each figure is the
median of ``--repeats`` timed runs after one warm-up, the two implementations alternating; the GPU is synchronised
before every clock read.

  vision1   the vision tower on one 448x448 image (1024 patches -> 256 tokens)
  vision4   the vision tower on 4 images in one call (224x224, 448x672, 896x896, 1344x896: 12,032 patches)
  ttft      time to the first new token of a 278-token prompt with that one image, vision included
  decode    mean ms per token over the next --decode-steps tokens (greedy, no early stop)

Ratios are transformers / ours: > 1 means we are faster.

    python bench/gpu_speed.py --dtypes bf16,fp32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from model_speed import (  # noqa: E402
    DTYPES,
    MIXED_GRIDS,
    ONE_IMAGE_GRID,
    build_ours,
    build_reference,
    config,
    generation_stamps,
    pixels,
    prompt_ids,
    vision_call,
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--preset", default="2b", choices=("2b", "tiny"))
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (--preset tiny)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_speed.py needs a CUDA GPU that torch can see")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    import transformers

    print(f"transformers {transformers.__version__}")
    print("| dtype | work | ours | transformers | ratio |\n|---|---|---:|---:|---:|")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        cfg = config(args.preset)
        ours = build_ours(cfg, dtype).to(dev)
        ref = build_reference(cfg, ours).to(dev)  # the same storage: .to() above already moved it
        models = {"ours": ours, "hf": ref}
        patch = cfg.vision.patch_dim
        works = {}
        for label, grids in (("vision1", ONE_IMAGE_GRID), ("vision4", MIXED_GRIDS)):
            pv, grid = pixels(grids, patch, dtype).to(dev), torch.tensor(grids, device=dev)
            works[label] = {impl: (lambda impl=impl, pv=pv, grid=grid: vision_call(impl, models[impl], pv, grid))
                            for impl in models}  # fmt: skip
        n_tokens = ONE_IMAGE_GRID[0][1] * ONE_IMAGE_GRID[0][2] // 4
        inputs = {"input_ids": prompt_ids(n_tokens).to(dev),
                  "pixel_values": pixels(ONE_IMAGE_GRID, patch, dtype).to(dev),
                  "image_grid_thw": torch.tensor(ONE_IMAGE_GRID, device=dev),
                  "pad_token_id": cfg.pad_token_id}  # fmt: skip
        times: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats + 1):
            for impl in (("ours", "hf") if rep % 2 else ("hf", "ours")):
                for label, fns in works.items():
                    t = timed(fns[impl])
                    if rep:
                        times.setdefault((label, impl), []).append(t)
                sync()
                stamps, _ = generation_stamps(impl, models[impl], inputs, args.decode_steps + 1)
                if rep:
                    times.setdefault(("ttft", impl), []).append(stamps[0])
                    times.setdefault(("decode", impl), []).append((stamps[-1] - stamps[0]) / args.decode_steps)
        for label in (*works, "ttft", "decode"):
            o, r = (statistics.median(times[(label, impl)]) for impl in ("ours", "hf"))
            unit = "ms/token" if label == "decode" else "ms"
            print(f"| {name} | {label} | {o * 1e3:.2f} {unit} | {r * 1e3:.2f} {unit} | {r / o:.2f} |")
        del ours, ref, models, works
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
