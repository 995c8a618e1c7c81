"""``qwen2vl <verb>``: the command line. Each verb calls library functions; this file owns the terminal."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Qwen2-VL in plain PyTorch")
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="what the model code does today, offline, with random weights")
    demo.add_argument("--preset", default="tiny", choices=["tiny", "2b"], help="architecture to run (default tiny)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    demo.add_argument("--new-tokens", type=int, default=16)

    verbs.add_parser("params", help="parameter counts of the presets (the paper's Table 1)")

    args = parser.parse_args(argv)
    try:
        if args.verb == "params":
            print_params()
        elif args.verb == "demo":
            print_params()
            run_demo(args.preset, getattr(torch, args.dtype), args.new_tokens)
    except (ValueError, OSError) as e:  # our errors are one line and name the problem
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 1
    return 0


def print_params() -> None:
    from . import Qwen2VL, qwen2vl_2b, qwen2vl_7b, qwen2vl_72b

    print("Parameters of the presets, counted on the meta device (paper, Table 1):")
    print(f"  {'model':<6} {'vision (ViT+merger)':>20} {'LLM':>16} {'total':>16}")
    for name, make in (("2B", qwen2vl_2b), ("7B", qwen2vl_7b), ("72B", qwen2vl_72b)):
        with torch.device("meta"):
            m = Qwen2VL(make())
        vis = sum(p.numel() for p in m.visual.parameters())
        total = sum(p.numel() for p in m.parameters())
        print(f"  {name:<6} {vis:>20,} {total - vis:>16,} {total:>16,}")


def run_demo(preset: str, dtype: torch.dtype, new_tokens: int) -> None:
    """Random weights through the real pipeline: save -> strict load -> vision -> M-RoPE -> decode."""
    from . import Qwen2VL, qwen2vl_2b, tiny

    c = config = tiny() if preset == "tiny" else qwen2vl_2b()
    print(f"\nDemo on the {preset} architecture with random weights ({dtype}); no trained weights ship yet.")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2VL(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    if preset == "tiny":  # exercise the checkpoint path too: hub-layout save, strict meta-device load
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            model = Qwen2VL.from_pretrained(d, dtype=dtype)
    model = model.to(dtype).eval()

    # One 448x448 image: 32x32 patches of 14 px -> 1024 patches -> 256 tokens after the 2x2 merge.
    h = w = 448 // c.vision.patch_size
    grid = torch.tensor([[1, h, w]])
    n_img = h * w // c.vision.spatial_merge_size**2
    text = [9707, 11, 1128, 374, 304, 419, 2168, 30]  # token ids standing in for a question
    ids = torch.tensor([[c.vision_start_token_id] + [c.image_token_id] * n_img + [c.vision_end_token_id] + text])
    pixels = torch.randn(h * w, c.vision.patch_dim)
    pos, delta = model.positions(ids, None, grid, None)
    print(f"prompt: 1 image 448x448 -> grid {grid.tolist()[0]} -> {h * w} patches -> {n_img} tokens; "
          f"{ids.shape[1]} tokens in all")
    print(f"M-RoPE: image tokens span t 1..1, h 1..{h // 2}, w 1..{w // 2}; text resumes at {int(pos[0, 0, n_img + 1])}; "
          f"next position {ids.shape[1] + int(delta)} (delta {int(delta)})")

    with torch.inference_mode():
        t0 = time.perf_counter()
        feats = model.visual(pixels, grid)
        t1 = time.perf_counter()
        out = model.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=new_tokens)
        t2 = time.perf_counter()
    print(f"vision tower: {tuple(feats.shape)} features in {t1 - t0:.2f} s")
    print(f"generate: {new_tokens} greedy tokens in {t2 - t1:.2f} s (prefill included): {out[0].tolist()}")


if __name__ == "__main__":
    raise SystemExit(main())
