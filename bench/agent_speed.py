"""Seconds per agent step (observation -> call) in the synthetic GUI: the shipped model, and the Qwen2-VL-2B
architecture with random weights, next to transformers on the same inputs and to this machine's bound.

One step is what ``qwen2vl.agent.run`` asks of a model after a reset: the tools' system prompt, the 448x448
screenshot (256 visual tokens) and the screen's text with the task, then the call written token by token. We time
the three parts of it separately in our model (medians of --repeats after a warm-up):
  vision   model.visual on the screenshot's patches
  prefill  the LLM over the whole prompt, the vision output placed (the prompt's KV cache filled)
  decode   the call's tokens, one at a time (as many as the shipped model writes for this step)
and the whole step through each library's generation loop: ours ``qwen2vl.generate.engine.stream``,
transformers ``generate(min_new_tokens=max_new_tokens)`` with the same ids, pixels and weights.

The bound: vision and prefill FLOPs (2 x parameters x tokens, plus attention) at the measured matmul rate of this
machine, plus each decoded token reading all the LLM's weights at the measured streaming bandwidth. Ratios:
transformers / ours (> 1: we are faster) and bound / ours (1 would be at the bound). "disturbed": the CPU time other
processes took meanwhile, as a share of the 2 cores (above 5%, the figures are not to be trusted).

    .venv/bin/python bench/agent_speed.py              # both models, fp32
    .venv/bin/python bench/agent_speed.py --only synth --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import qwen2vl  # noqa: E402
from qwen2vl.agent import GuiEnv  # noqa: E402
from qwen2vl.agent.calls import FN_ARGS, FN_NAME, STOP_WORDS, functions_of, render  # noqa: E402
from qwen2vl.agent.loop import first_message  # noqa: E402
from qwen2vl.generate.engine import stream  # noqa: E402
from qwen2vl.model.cache import KVCache  # noqa: E402
from qwen2vl.model.qwen2vl import Media  # noqa: E402
from timing import timed  # noqa: E402

SHIPPED = ROOT / "models" / "qwen2vl-synth"
SEED = 10**6


def machine_rates(dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s, streaming read bytes/s) measured here, now, each the best of 7: the bound's two numbers."""
    def best(fn) -> float:
        fn()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    a, b = torch.randn(2048, 3072, dtype=dtype), torch.randn(3072, 3072, dtype=dtype)
    flops = 2 * 2048 * 3072 * 3072 / best(lambda: a @ b)
    big = torch.randn(64 * 2**20, dtype=torch.float32)  # 256 MiB, far beyond the caches
    return flops, big.numel() * 4 / best(big.sum)


def first_step():
    """The first observation of a held-out click episode, as the model reads it, and the call that does the task
    (the oracle's, as a model would write it, up to its stop word): what one step decodes."""
    env = GuiEnv()
    obs = env.reset(SEED, "click")
    plain = render([first_message(obs)], functions_of(env.tools), "qwen")
    call = env.oracle()
    return plain, f"{FN_NAME}: {call.name}\n{FN_ARGS}: {call.arguments}\n{STOP_WORDS['qwen'][0]}"


def build_2b(dtype: torch.dtype):
    from model_speed import build_ours

    cfg = qwen2vl.qwen2vl_2b()
    return build_ours(cfg, dtype), cfg


def reference(model, cfg, dtype):
    """transformers' model holding our very tensors (bench/model_speed.py), or the shipped directory loaded."""
    if cfg is None:
        import transformers

        return transformers.Qwen2VLForConditionalGeneration.from_pretrained(SHIPPED, dtype=dtype).eval()
    from model_speed import build_reference

    return build_reference(cfg, model)


def measure(name, model, cfg, inputs, new_tokens, dtype, repeats, ref_too):
    from model_speed import OtherLoad

    load = OtherLoad()
    ids, media = inputs["input_ids"], Media.of(inputs)
    pv, grid = inputs["pixel_values"].to(dtype), inputs["image_grid_thw"]
    with torch.inference_mode():
        t_vision, _ = timed(lambda: model.visual(pv, grid), repeats)

        def prefill():
            cache = KVCache.allocate(model.config.text, 1, ids.shape[1] + new_tokens + 1, dtype, "cpu")
            return model.prefill(ids, cache, attention_mask=inputs["attention_mask"], media=media)

        t_prefill, (logits, cache) = timed(prefill, repeats)
        t_prefill -= t_vision  # prefill() runs the vision tower too

        def decode():  # on a fresh prefill each time (the cache fills), only the decode steps timed
            _, (out, c) = None, prefill()
            tok, t = out.argmax(-1), time.perf_counter()
            for _ in range(new_tokens):
                out, c = model.decode(tok, c)
                tok = out.argmax(-1)
            return time.perf_counter() - t

        decode()
        t_decode = sorted(decode() for _ in range(repeats))[repeats // 2]

        def ours_step():
            return [int(t[0]) for t in stream(model, ids, attention_mask=inputs["attention_mask"], media=media,
                                              max_new_tokens=new_tokens, eos_token_ids=())]  # fmt: skip

        t_ours, _ = timed(ours_step, repeats)
        t_ref = None
        if ref_too:
            ref = reference(model, cfg, dtype)
            from helpers import mm_token_type_ids

            kwargs = dict(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=pv,
                          image_grid_thw=grid, mm_token_type_ids=mm_token_type_ids(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)
            t_ref, _ = timed(lambda: ref.generate(**kwargs), repeats)
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": ids.shape[1],
            "new_tokens": new_tokens, "vision_s": t_vision, "prefill_s": t_prefill, "decode_s": t_decode,
            "step_s": t_ours, "reference_step_s": t_ref, **load.result()}


def bound(model, prompt_tokens, visual_patches, new_tokens, rates, dtype) -> float:  # noqa: PLR0913
    """Seconds at this machine's rates: the matmul FLOPs of vision and prefill, then each token's weight reads."""
    flops_rate, bandwidth = rates
    with torch.device("meta"):  # counted on a fresh copy: loaded layers may be repacked for inference
        fresh = qwen2vl.Qwen2VL(model.config)
    vit = sum(p.numel() for p in fresh.visual.parameters())
    llm = sum(p.numel() for p in fresh.model.parameters())
    bytes_per = torch.empty((), dtype=dtype).element_size()
    head = model.config.text.vocab_size * model.config.text.hidden_size
    compute = 2 * (vit * visual_patches + (llm + head) * prompt_tokens) / flops_rate
    return compute + new_tokens * (llm + head) * bytes_per / bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["synth", "2b"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--dtype-2b", choices=["fp32", "bf16"], default="fp32",
                    help="the 2B's dtype (fp32: bf16 is emulated, and slower, on a CPU without AVX512-BF16)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    plain, answer = first_step()
    rows = []
    if args.only in (None, "synth"):
        shipped = qwen2vl.load(SHIPPED, dtype=torch.float32)
        inputs = shipped.processor(plain)
        n = len(shipped.processor.tokenizer.encode(answer))
        r = measure("shipped synth", shipped.model, None, inputs, n, torch.float32, args.repeats,
                    not args.no_reference)
        rates = machine_rates(torch.float32)
        r["bound_s"] = bound(shipped.model, r["prompt_tokens"], 1024, n, rates, torch.float32)
        r["matmul_gflops"], r["read_gbs"] = rates[0] / 1e9, rates[1] / 1e9
        rows.append(r)
    if args.only in (None, "2b"):
        import tempfile

        from helpers import qwen2_tokenizer_json
        from qwen2vl.processing.tokenizer import Tokenizer

        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write(qwen2_tokenizer_json())
            f.flush()
            processor = qwen2vl.Processor(Tokenizer.from_file(f.name))  # the genuine Qwen2 vocabulary
        inputs = processor(plain)
        n = len(processor.tokenizer.encode(answer))
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype_2b]
        model, cfg = build_2b(dtype)
        r = measure("2B random", model, cfg, inputs, n, dtype, args.repeats, not args.no_reference)
        rates = machine_rates(dtype)
        r["bound_s"] = bound(model, r["prompt_tokens"], 1024, n, rates, dtype)
        r["matmul_gflops"], r["read_gbs"] = rates[0] / 1e9, rates[1] / 1e9
        rows.append(r)
    print(f"{'model':<14} {'dtype':<8} {'prompt':>6} {'new':>4} {'vision':>7} {'prefill':>8} {'decode':>7} "
          f"{'step s':>7} {'ref s':>7} {'ref/ours':>8} {'bound s':>8} {'bound/ours':>10} {'disturbed':>9}")
    for r in rows:
        ref = r["reference_step_s"]
        shares = [r[k] / (r["vision_s"] + r["prefill_s"] + r["decode_s"]) for k in ("vision_s", "prefill_s",
                                                                                      "decode_s")]  # fmt: skip
        ref_s, ratio = ("-", "-") if ref is None else (f"{ref:.3f}", f"{ref / r['step_s']:.2f}")
        print(f"{r['model']:<14} {r['dtype']:<8} {r['prompt_tokens']:>6} {r['new_tokens']:>4} "
              f"{100 * shares[0]:>6.0f}% {100 * shares[1]:>7.0f}% {100 * shares[2]:>6.0f}% {r['step_s']:>7.3f} "
              f"{ref_s:>7} {ratio:>8} {r['bound_s']:>8.3f} {r['bound_s'] / r['step_s']:>10.2f} "
              f"{100 * r['others_cpu_s'] / (2 * r['wall_s']):>8.1f}%")
    for r in rows:
        print(f"{r['model']}: the bound's rates, measured in this run: matmul {r['matmul_gflops']:.0f} GFLOP/s "
              f"({r['dtype']}), streaming read {r['read_gbs']:.1f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
