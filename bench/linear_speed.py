"""One linear layer: ``F.linear`` (what transformers and our plain model call) against the oneDNN-packed weight
of ``pack_for_cpu()`` (``model/packed.py``), in the same run.

The 2B's MLP up-projection, 1536 -> 8960, for 1 row (decoding one sequence), 8 rows (batched decoding), 278 rows
(the benchmark prompt's prefill) and 1024 rows (a 448x448 image in the vision tower's width class), in fp32 and
bf16; median of --repeats timed calls after a warm-up; ratio = F.linear / packed (> 1: packing is faster). Also
the largest difference between the two outputs.

    .venv/bin/python bench/linear_speed.py [--repeats 50] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from qwen2vl.model.packed import PackedLinear, available
from timing import timed  # bench/timing.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not available():
        raise SystemExit("oneDNN (torch.ops.mkldnn._linear_pointwise) is not available in this torch build")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'dtype':<6} {'rows':>5} {'F.linear (ms)':>14} {'packed (ms)':>12} {'ratio':>6} {'max |diff|':>11}")
    for dtype in (torch.float32, torch.bfloat16):
        dense = torch.nn.Linear(1536, 8960, bias=True).to(dtype)
        packed = PackedLinear(dense)
        with torch.inference_mode():
            for rows in (1, 8, 278, 1024):
                x = torch.randn(rows, 1536).to(dtype)
                plain = timed(lambda: F.linear(x, dense.weight, dense.bias), args.repeats)[0]
                fast = timed(lambda: packed(x), args.repeats)[0]
                diff = (packed(x).float() - F.linear(x, dense.weight, dense.bias).float()).abs().max().item()
                name = str(dtype).removeprefix("torch.")
                print(f"{name:<6} {rows:>5} {plain * 1e3:>14.2f} {fast * 1e3:>12.2f} {plain / fast:>6.2f} {diff:>11.2e}")


if __name__ == "__main__":
    main()
