"""int8 weight-only decoding (``qwen2vl.load(..., quantize="int8")``) against the same model's dense weights, and the
bandwidth bound of each: milliseconds per decoded token (a prompt of --prompt tokens in the cache, then --tokens
greedy steps through ``model.generate``), with the greedy tokens' agreement and the last logits' relative error of
int8 against dense over --prompts random prompts.

Models: the shipped one (4.6M parameters: decoding is Python, not bytes) and the Qwen2-VL-2B architecture with
random weights (1.5B LLM parameters: decoding is the weights' bytes). Bound: the LLM's and the head's weight bytes
over the one-stream read bandwidth measured in the same run. "disturbed": other processes' CPU share meanwhile.

    .venv/bin/python bench/quant_speed.py                 # both models, bf16 and int8
    .venv/bin/python bench/quant_speed.py --only synth --dtype float32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import qwen2vl  # noqa: E402
from model_speed import OtherLoad  # noqa: E402
from qwen2vl.model.quant import Int8Linear  # noqa: E402


def read_bandwidth() -> float:
    a = torch.empty(2**28, dtype=torch.uint8).random_()
    a.sum(dtype=torch.int64)
    best = min(_timed(lambda: a.view(torch.int64).sum()) for _ in range(5))
    return a.numel() / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def llm_bytes(model) -> int:
    """The bytes decoding reads a token: the decoder layers' and the head's weights (not the embedding table)."""
    total = 0
    for m in [*model.model.layers.modules(), model.lm_head]:
        if isinstance(m, Int8Linear):
            total += m.weight_int8.numel() + m.scale.numel() * 4
        else:  # the layer's own weights (norms, dense linears, a tied head's embedding)
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def decode_ms(model, prompt: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    model.generate(prompt, max_new_tokens=2)  # warm-up
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=tokens, eos_token_ids=[])
    prefill = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, eos_token_ids=[])
    one = time.perf_counter() - prefill
    return ((prefill - t) - one) / (tokens - 1) * 1000, out


def run(name: str, dense, quant, dense_bytes: int, args, bandwidth: float) -> None:
    c = dense.config  # ordinary tokens only: below every special one (a vision pad without pixels is an error)
    vocab = min(c.text.vocab_size, c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id,
                c.bos_token_id, *c.eos_token_ids)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (1, args.prompt), generator=g) for _ in range(args.prompts)]
    load = OtherLoad()
    with torch.no_grad():
        ms_dense, _ = decode_ms(dense, prompts[0], args.tokens)
        ms_int8, _ = decode_ms(quant, prompts[0], args.tokens)
        agree, errors = [], []
        for p in prompts:
            a = dense.generate(p, max_new_tokens=args.agree_tokens, eos_token_ids=[])
            b = quant.generate(p, max_new_tokens=args.agree_tokens, eos_token_ids=[])
            agree.append(float((a == b).float().mean()))
            la, lb = dense(p)[0, -1].float(), quant(p)[0, -1].float()
            errors.append(float((la - lb).norm() / la.norm()))
    r = load.result()
    q_bytes = llm_bytes(quant)
    print(f"{name:<14} {args.dtype:<9} {ms_dense:>8.1f} {dense_bytes / bandwidth * 1000:>8.1f} {ms_int8:>8.1f} "
          f"{q_bytes / bandwidth * 1000:>8.1f} {ms_int8 / ms_dense:>10.2f} {100 * sum(agree) / len(agree):>8.1f}% "
          f"{max(errors):>9.4f} {100 * r['others_cpu_s'] / (2 * r['wall_s']):>8.1f}%")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["synth", "2b"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--agree-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bandwidth = read_bandwidth()
    print(f"quant_speed {time.strftime('%Y-%m-%d %H:%M')}: one-stream read {bandwidth / 1e9:.1f} GB/s; ms per decoded "
          f"token after a {args.prompt}-token prompt; agreement of {args.agree_tokens} greedy tokens over "
          f"{args.prompts} random prompts")  # fmt: skip
    print(f"{'model':<14} {'dtype':<9} {'dense ms':>8} {'bound':>8} {'int8 ms':>8} {'bound':>8} {'int8/dense':>10} "
          f"{'agree':>9} {'logit err':>9} {'disturbed':>9}")  # fmt: skip
    dtype = getattr(torch, args.dtype)
    if args.only in (None, "synth"):
        path = ROOT / "models" / "qwen2vl-synth"
        dense = qwen2vl.Qwen2VL.from_pretrained(path, dtype=dtype).eval()
        dense_bytes = llm_bytes(dense)
        quant = qwen2vl.Qwen2VL.from_pretrained(path, dtype=dtype).eval().quantize("int8").pack_for_cpu()
        run("shipped synth", dense.pack_for_cpu(), quant, dense_bytes, args, bandwidth)
    if args.only in (None, "2b"):
        torch.manual_seed(0)
        config = qwen2vl.qwen2vl_2b()
        torch.set_default_dtype(dtype)  # built in the dtype: two 2B models in fp32 would need 18 GB
        dense = qwen2vl.Qwen2VL(config).eval()
        dense_bytes = llm_bytes(dense)
        quant = qwen2vl.Qwen2VL(config).eval()
        torch.set_default_dtype(torch.float32)
        quant.load_state_dict(dense.state_dict())
        quant.tie_weights()
        quant.quantize("int8").pack_for_cpu()
        run("2B random", dense.pack_for_cpu(), quant, dense_bytes, args, bandwidth)


if __name__ == "__main__":
    main()
