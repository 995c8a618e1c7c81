"""Speed and memory of qwen2vl next to transformers (sdpa), on the Qwen2-VL-2B architecture.

Random weights (speed does not depend on weight values), no download. Both implementations get
the SAME weights: ours is built on the meta device, materialised and initialised with
``Qwen2VL.init_weights`` (seeded), and the transformers model, also built on meta, takes those very
tensors through ``load_state_dict(assign=True)`` with the keys renamed to the transformers 5.x
layout. Nothing is written to disk, and when both live in one process the weights exist once.

Measurements (W1 and W2 of /work/shared/PERFORMANCE.md):
  vision   the vision tower alone on one 448x448 image: grid (1, 32, 32) = 1024 patches x 1176
           -> 256 merged tokens. Ours ``model.visual(pixels, grid)``; transformers
           ``model.model.visual(pixels, grid_thw=grid)``. Pixels already in the model dtype.
  ttft     time to first token through each library's generation loop, vision included: from the
           call to the moment the first new token id exists on the host. Ours
           ``qwen2vl.generate.engine.stream`` (what ``Qwen2VL.generate`` drives), transformers
           ``generate(..., streamer=...)`` (its second ``put``; the first one is the prompt).
  decode   the same runs, continued for --decode-steps more tokens: the mean time between
           consecutive new tokens (ms/token, tokens/s). Greedy; transformers gets
           ``min_new_tokens == max_new_tokens`` and ours no eos ids, so neither stops early.
  memory   the vision tower alone on 4 images packed in one call: 224x224 (1,16,16), 448x672
           (1,32,48), 896x896 (1,64,64), 1344x896 (1,96,64) = 12,032 patches. Peak resident memory
           *increase* during the forward: VmHWM reset through /proc/self/clear_refs, minus VmRSS
           before the call (weights and inputs excluded), with glibc's mmap threshold fixed at
           128 KiB so that RSS follows the live tensors (see run_worker). One cold call per fresh
           process and implementation; its time is reported too.

Prompt layout (278 tokens, batch 1): 10 text ids, <|vision_start|> (151652), 256 x <|image_pad|>
(151655), <|vision_end|> (151653), 10 text ids. Text ids are drawn uniformly from [0, 151643)
with a fixed seed.

Processes: the parent re-invokes this file once per dtype for vision/ttft/decode (both
implementations in that process, sharing one copy of the weights, in alternating order each
repeat so that slow drift and bf16's per-process AMX variance hit both alike), and once per
(implementation, dtype) for memory, so that peaks never add up. ``--separate`` runs the timing
parts in one process per (implementation, dtype) instead.

Ratios: transformers / ours for times (> 1: we are faster), ours / transformers for memory
(< 1: we use less).

    .venv/bin/python bench/model_speed.py --json bench_results.json
    .venv/bin/python bench/model_speed.py --only vision,memory --dtypes bf16 --quick
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PARTS = ("vision", "ttft", "decode", "memory")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("ours", "hf")
NAMES = {"ours": "ours", "hf": "transformers"}

VISION_START, IMAGE_PAD, VISION_END = 151652, 151655, 151653
ONE_IMAGE_GRID = [[1, 32, 32]]  # 448x448
MIXED_GRIDS = [[1, 16, 16], [1, 32, 48], [1, 64, 64], [1, 96, 64]]  # 224², 448x672, 896², 1344x896
TEXT_BEFORE, TEXT_AFTER = 10, 10


# ---- building the models ----------------------------------------------------------------------
def config(preset: str):
    import qwen2vl

    return qwen2vl.qwen2vl_2b() if preset == "2b" else qwen2vl.tiny(tie_word_embeddings=True)


def build_ours(cfg, dtype: torch.dtype, vision_only: bool = False, seed: int = 0) -> torch.nn.Module:
    """Ours with N(0, 0.02) weights: on meta, cast there (free), then allocated directly in ``dtype``."""
    from qwen2vl import Qwen2VL

    with torch.device("meta"):
        model = Qwen2VL(cfg)
    module = model.visual if vision_only else model
    module = module.to(dtype).to_empty(device="cpu")
    if not vision_only and cfg.tie_word_embeddings:
        # to_empty() gives every Parameter its own storage, which unties lm_head from embed_tokens
        model.lm_head.weight = model.model.embed_tokens.weight
    torch.manual_seed(seed)
    Qwen2VL.init_weights(module)  # the model's own (only) init; it walks modules(), so a subtree works
    return module.eval()


def build_reference(cfg, ours: torch.nn.Module, vision_only: bool = False) -> torch.nn.Module:
    """transformers' model (sdpa) built on meta, holding the very tensors of ``ours`` (no copy)."""
    import transformers
    from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

    from qwen2vl.weights import from_hub_name

    hf_cfg = transformers.Qwen2VLConfig(**cfg.to_dict())
    hf_cfg._attn_implementation = "sdpa"
    for sub in (hf_cfg.vision_config, hf_cfg.text_config):
        sub._attn_implementation = "sdpa"
    with torch.device("meta"):
        if vision_only:
            ref = hf.Qwen2VisionTransformerPretrainedModel(hf_cfg.vision_config)
        else:
            ref = transformers.Qwen2VLForConditionalGeneration(hf_cfg)
    state = ours.state_dict()
    if not vision_only:
        state = {from_hub_name(k): v for k, v in state.items()}
    ref.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers (the rotary inv_freq) are not in any state dict: rebuild them on the CPU
    for mod in ref.modules():
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            fresh = type(mod)(mod.config)
            for name, b in fresh.named_buffers(recurse=False):
                setattr(mod, name, b)
    if not vision_only:
        ref.tie_weights()
        assert ref.lm_head.weight.data_ptr() == ref.model.language_model.embed_tokens.weight.data_ptr()
    left = [n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
    assert not left, f"reference tensors left on meta: {left[:5]}"
    attn = (ref.config if vision_only else ref.config.vision_config)._attn_implementation
    assert attn == "sdpa", attn
    return ref.eval()


# ---- inputs -------------------------------------------------------------------------------------
def pixels(grids: list[list[int]], patch_dim: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, patch_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def prompt_ids(n_image_tokens: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 151643, (TEXT_BEFORE + TEXT_AFTER,), generator=g).tolist()
    ids = text[:TEXT_BEFORE] + [VISION_START] + [IMAGE_PAD] * n_image_tokens + [VISION_END] + text[TEXT_BEFORE:]
    return torch.tensor([ids])


# ---- measuring -----------------------------------------------------------------------------------
def vision_call(impl: str, model, pv: torch.Tensor, grid: torch.Tensor):
    with torch.inference_mode():
        if impl == "ours":
            return model.visual(pv, grid)
        return model.model.visual(pv, grid_thw=grid).pooler_output


def vision_only_call(impl: str, tower, pv: torch.Tensor, grid: torch.Tensor):
    with torch.inference_mode():
        out = tower(pv, grid) if impl == "ours" else tower(pv, grid_thw=grid).pooler_output
    return out


def generation_stamps(impl: str, model, inputs: dict, new_tokens: int) -> tuple[list[float], list[int]]:
    """Seconds from the call to each new token id on the host ([ttft, t2, t3, ...]) and the ids."""
    if impl == "ours":
        from qwen2vl.generate.engine import stream
        from qwen2vl.model.qwen2vl import Media

        media = Media(inputs["pixel_values"], inputs["image_grid_thw"])
        t0 = time.perf_counter()
        stamps, tokens = [], []
        for token in stream(model, inputs["input_ids"], media=media, max_new_tokens=new_tokens, eos_token_ids=()):
            stamps.append(time.perf_counter() - t0)
            tokens.append(token)
    else:
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.times, self.tokens = [], []

            def put(self, value):
                self.times.append(time.perf_counter() - t0)
                self.tokens.append(value)

            def end(self):
                pass

        streamer = Stamps()
        t0 = time.perf_counter()
        model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=torch.ones_like(inputs["input_ids"]),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=(inputs["input_ids"] == IMAGE_PAD).long(),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=inputs["pad_token_id"],
            streamer=streamer,
        )
        stamps, tokens = streamer.times[1:], streamer.tokens[1:]  # the first put() is the prompt
    if len(stamps) != new_tokens:
        raise RuntimeError(f"{impl}: expected {new_tokens} new tokens, got {len(stamps)}")
    return stamps, [int(t.reshape(-1)[0]) for t in tokens]


def proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_increase(fn) -> tuple[float, float]:
    """(peak resident-memory increase in MiB during fn(), seconds)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS-before is tight
    except OSError:
        pass
    before = proc_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = proc_kib("VmHWM")
    del out
    return (peak - before) / 1024, seconds


def order(rep: int, impls: list[str]) -> list[str]:
    return impls if rep % 2 == 0 else impls[::-1]


# ---- workers (one fresh process each) ------------------------------------------------------------
def worker_timing(args) -> dict:
    dtype = DTYPES[args.dtype]
    impls = args.impls.split(",")
    parts = args.only.split(",")
    cfg = config(args.preset)
    t0 = time.perf_counter()
    ours = build_ours(cfg, dtype)
    models = {"ours": ours}
    if "hf" in impls:
        models["hf"] = build_reference(cfg, ours)  # shares ours' dense tensors
    if "ours" not in impls:
        del models["ours"]
    elif not args.no_pack:
        ours.pack_for_cpu()  # what qwen2vl.load() gives on the CPU; the dense weights stay with the reference
    del ours
    build_s = time.perf_counter() - t0
    pd = cfg.vision.patch_dim
    grid = torch.tensor(ONE_IMAGE_GRID)
    pv = pixels(ONE_IMAGE_GRID, pd, dtype)
    n_tokens = int(grid.prod(-1).sum()) // cfg.vision.spatial_merge_size**2
    out: dict = {"build_s": build_s}

    generation = "ttft" in parts or "decode" in parts
    inputs = dict(input_ids=prompt_ids(n_tokens), pixel_values=pv, image_grid_thw=grid, pad_token_id=cfg.pad_token_id)
    # one warm-up per implementation: a 2-token generation runs the vision tower, the prefill and a
    # decode step; with the vision part alone, one vision call
    for impl in impls:
        if generation:
            out.setdefault("warmup_ids", {})[impl] = generation_stamps(impl, models[impl], inputs, 2)[1]
        else:
            vision_call(impl, models[impl], pv, grid)
    if generation and len(impls) == 2:  # greedy ids; a near-tie in random weights may flip one in bf16
        out["first_ids_agree"] = out["warmup_ids"]["ours"] == out["warmup_ids"]["hf"]

    if "vision" in parts:
        times = {impl: [] for impl in impls}
        first = {}
        for rep in range(args.repeats):
            for impl in order(rep, impls):
                t = time.perf_counter()
                feats = vision_call(impl, models[impl], pv, grid)
                times[impl].append(time.perf_counter() - t)
                first.setdefault(impl, feats.float())
                log(f"  {args.dtype} vision {impl}: {times[impl][-1]:.3f} s")
        out["vision_s"] = times
        if len(first) == 2:  # same weights, same input: the outputs should agree to rounding
            out["vision_max_abs_diff"] = (first["ours"] - first["hf"]).abs().max().item()
            out["vision_max_abs"] = first["hf"].abs().max().item()
        del first, feats

    if generation:
        new = 1 + (args.decode_steps if "decode" in parts else 0)
        ttft = {impl: [] for impl in impls}
        step_ms = {impl: [] for impl in impls}
        for rep in range(args.repeats):
            for impl in order(rep, impls):
                stamps, _ = generation_stamps(impl, models[impl], inputs, new)
                ttft[impl].append(stamps[0])
                msg = f"  {args.dtype} ttft {impl}: {stamps[0]:.3f} s"
                if new > 1:
                    step_ms[impl].append(1000 * (stamps[-1] - stamps[0]) / (new - 1))
                    msg += f", decode {step_ms[impl][-1]:.1f} ms/token"
                log(msg)
        if "ttft" in parts:
            out["ttft_s"] = ttft
        if "decode" in parts:
            out["decode_ms_per_token"] = step_ms
        out["prompt_tokens"] = inputs["input_ids"].shape[1]
    return out


def worker_memory(args) -> dict:
    dtype = DTYPES[args.dtype]
    (impl,) = args.impls.split(",")
    cfg = config(args.preset)
    tower = build_ours(cfg, dtype, vision_only=True)
    if impl == "hf":
        tower = build_reference(cfg, tower, vision_only=True)
    elif not args.no_pack:
        from qwen2vl.model.packed import pack_linears

        pack_linears(tower)
    grid = torch.tensor(MIXED_GRIDS)
    pv = pixels(MIXED_GRIDS, cfg.vision.patch_dim, dtype)
    mib, seconds = peak_rss_increase(lambda: vision_only_call(impl, tower, pv, grid))
    log(f"  {args.dtype} memory {impl}: +{mib:.0f} MiB peak, {seconds:.2f} s")
    return {"peak_mib": mib, "seconds": seconds, "patches": pv.shape[0]}


class OtherLoad:
    """CPU seconds that other processes used while this worker ran: the others' share of the 2 cores
    is what disturbs the timings (the other engineer's tests, say)."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        hz = os.sysconf("SC_CLK_TCK")
        cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(x) for i, x in enumerate(cpu) if i not in (3, 4))  # all but idle and iowait
        own = sum(int(x) for x in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        return busy / hz, own / hz, time.monotonic()

    def result(self) -> dict:
        busy, own, t = self._read()
        return {"wall_s": t - self.start[2], "others_cpu_s": max(0.0, (busy - self.start[0]) - (own - self.start[1]))}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the parent: run the workers, print tables -----------------------------------------------------
def run_worker(kind: str, dtype: str, impls: list[str], args, parts: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [
        sys.executable, __file__, "--worker", kind, "--dtype", dtype, "--impls", ",".join(impls),
        "--only", ",".join(parts), "--repeats", str(args.repeats), "--decode-steps", str(args.decode_steps),
        "--preset", args.preset, "--threads", str(args.threads), "--result", result_path,
        *(["--no-pack"] if args.no_pack else []),
    ]  # fmt: skip
    log(f"[{time.strftime('%H:%M:%S')}] {kind} {dtype} {'+'.join(impls)}")
    env = dict(os.environ)
    if kind == "memory":
        # A fixed glibc mmap threshold: every block >= 128 KiB is mmapped and unmapped on free, so RSS
        # follows the live tensors. With glibc's default (a threshold that rises to 32 MiB as blocks
        # are freed), freed activations of 30-60 MiB linger in the heap and the peak of identical
        # runs varied by 100-350 MiB.
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    result["process_s"] = time.perf_counter() - t0
    load = result["load"]
    share = load["others_cpu_s"] / (load["wall_s"] * os.cpu_count())
    log(f"  other processes used {load['others_cpu_s']:.0f} CPU-s in {load['wall_s']:.0f} s ({100 * share:.0f}% of the machine)"
        + ("  <- timings disturbed" if share > 0.05 else ""))
    return result


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def table(title: str, rows: list[tuple[str, float | None, float | None]], unit: str, ratio: str, fmt: str) -> str:
    """rows: (label, ours, transformers); ratio: 'hf/ours' or 'ours/hf' (which way the quotient goes)."""
    lines = [f"\n{title}", f"| dtype | ours ({unit}) | transformers ({unit}) | ratio {ratio} |", "|---|---:|---:|---:|"]
    for label, o, h in rows:
        r = "" if not o or not h else f"{(h / o if ratio == 'hf/ours' else o / h):.2f}"
        cell = lambda x: "" if x is None else format(x, fmt)  # noqa: E731
        lines.append(f"| {label} | {cell(o)} | {cell(h)} | {r} |")
    return "\n".join(lines)


def report(results: dict, dtypes: list[str], args, meta: dict) -> str:
    out = [
        f"qwen2vl at {meta['code']}; transformers {meta['transformers']}, torch {meta['torch']}; {meta['cpu']}"
        f"{'' if meta['amx'] else ' (no AMX)'}.",
        f"Qwen2-VL-{args.preset.upper()} architecture, random weights, {args.threads} threads, "
        f"median of {args.repeats} after 1 warm-up; ratio transformers/ours for time (>1: ours faster), "
        "ours/transformers for memory (<1: ours smaller)."
    ]

    def get(dtype, key, impl):
        return median(results.get(dtype, {}).get("timing", {}).get(key, {}).get(impl, []))

    if any("vision_s" in results.get(d, {}).get("timing", {}) for d in dtypes):
        rows = [(d, get(d, "vision_s", "ours"), get(d, "vision_s", "hf")) for d in dtypes]
        out.append(table("Vision encoder, one 448x448 image (1024 patches -> 256 tokens)", rows, "s", "hf/ours", ".3f"))
    if any("ttft_s" in results.get(d, {}).get("timing", {}) for d in dtypes):
        n = next(results[d]["timing"].get("prompt_tokens") for d in dtypes if d in results)
        rows = [(d, get(d, "ttft_s", "ours"), get(d, "ttft_s", "hf")) for d in dtypes]
        out.append(table(f"Time to first token, {n}-token prompt with the image (vision included)", rows, "s", "hf/ours", ".3f"))
    if any("decode_ms_per_token" in results.get(d, {}).get("timing", {}) for d in dtypes):
        rows = [(d, get(d, "decode_ms_per_token", "ours"), get(d, "decode_ms_per_token", "hf")) for d in dtypes]
        out.append(table(f"Decode, mean of {args.decode_steps} steps after the first token", rows, "ms/token", "hf/ours", ".1f"))
        rows = [(d, 1000 / o if o else None, 1000 / h if h else None) for d, o, h in rows]
        # tokens/s is 1000 / (ms/token): ours/transformers here is the same number as the ratio above
        out.append(table("Decode throughput (same runs)", rows, "tokens/s", "ours/hf", ".2f"))
    if any("memory" in results.get(d, {}) for d in dtypes):
        mem = lambda d, i: results.get(d, {}).get("memory", {}).get(i, {})  # noqa: E731
        rows = [(d, mem(d, "ours").get("peak_mib"), mem(d, "hf").get("peak_mib")) for d in dtypes]
        out.append(table("Vision tower peak memory increase, 4 mixed images in one call (12,032 patches)", rows, "MiB", "ours/hf", ".0f"))
        rows = [(d, mem(d, "ours").get("seconds"), mem(d, "hf").get("seconds")) for d in dtypes]
        out.append(table("Vision tower time, same call (single cold call per fresh process)", rows, "s", "hf/ours", ".2f"))
    lines = ["\nOther processes during each worker (their CPU time / (wall x cores); > 5% disturbs timings)",
             "| worker | wall (s) | others' CPU (s) | share |", "|---|---:|---:|---:|"]
    for d in dtypes:
        r = results.get(d, {})
        workers = [(f"timing {d}", r["timing"])] if "load" in r.get("timing", {}) else []
        workers += [(f"timing {d} {NAMES[i]}", v) for i, v in r.get("timing", {}).get("loads", {}).items()]
        workers += [(f"memory {d} {NAMES[i]}", v) for i, v in r.get("memory", {}).items()]
        for name, w in workers:
            load = w.get("load", w)
            share = load["others_cpu_s"] / (load["wall_s"] * os.cpu_count())
            lines.append(f"| {name} | {load['wall_s']:.0f} | {load['others_cpu_s']:.0f} | {100 * share:.0f}% |")
    out.append("\n".join(lines))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--impls", default="ours,hf", help="comma list of ours, hf (transformers)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    p.add_argument("--decode-steps", type=int, default=24, help="decode steps timed after the first token")
    p.add_argument("--quick", action="store_true", help="1 repeat and 8 decode steps (the memory part is unchanged)")
    p.add_argument("--separate", action="store_true", help="timing: one process per (implementation, dtype), not interleaved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-pack", action="store_true", help="ours without oneDNN-packed linear weights (pack_for_cpu)")
    p.add_argument("--json", help="also write all raw numbers here")
    p.add_argument("--preset", default="2b", choices=("2b", "tiny"), help="tiny: a smoke test of this script only")
    p.add_argument("--worker", choices=("timing", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        load = OtherLoad()
        result = (worker_timing if args.worker == "timing" else worker_memory)(args)
        result["load"] = load.result()
        Path(args.result).write_text(json.dumps(result))
        return

    if args.quick:
        args.repeats, args.decode_steps = 1, 8
    parts = args.only.split(",")
    dtypes = args.dtypes.split(",")
    impls = args.impls.split(",")
    for name, got, allowed in (("--only", parts, PARTS), ("--dtypes", dtypes, DTYPES), ("--impls", impls, IMPLS)):
        if bad := [x for x in got if x not in allowed]:
            p.error(f"{name}: unknown {bad}; choose from {list(allowed)}")
    timing_parts = [x for x in parts if x != "memory"]

    import transformers

    meta = {
        "preset": args.preset,
        "threads": args.threads,
        "repeats": args.repeats,
        "decode_steps": args.decode_steps,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "code": _code_version(),
        "cpu": _cpu_name(),
        "amx": _has_amx(),
        "loadavg_start": os.getloadavg(),
        "prompt": f"{TEXT_BEFORE} text + <|vision_start|> + 256 x <|image_pad|> + <|vision_end|> + {TEXT_AFTER} text",
        "weights": "identical in both: ours' N(0, 0.02) init (seed 0), shared into transformers via load_state_dict(assign=True)",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results: dict = {}
    t_start = time.perf_counter()
    for dtype in dtypes:
        r = results.setdefault(dtype, {})
        if timing_parts:
            if args.separate:
                r["timing"] = {"process_s": {}}
                for impl in impls:
                    one = run_worker("timing", dtype, [impl], args, timing_parts)
                    r["timing"]["process_s"][impl] = one.pop("process_s")
                    r["timing"].setdefault("loads", {})[impl] = one.pop("load")
                    for key, val in one.items():
                        if isinstance(val, dict):
                            r["timing"].setdefault(key, {}).update(val)
                        else:
                            r["timing"][key] = val
            else:
                r["timing"] = run_worker("timing", dtype, impls, args, timing_parts)
        if "memory" in parts:
            r["memory"] = {impl: run_worker("memory", dtype, [impl], args, ["memory"]) for impl in impls}
    meta["loadavg_end"] = os.getloadavg()
    meta["total_s"] = time.perf_counter() - t_start

    text = report(results, dtypes, args, meta)
    print(text)
    print(f"\ntotal {meta['total_s']:.0f} s; load average at start {meta['loadavg_start'][0]:.2f}, end {meta['loadavg_end'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "report": text}, indent=2))


def _code_version() -> str:
    """The commit, and whether qwen2vl/ differs from it (timings follow the code being edited)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qwen2vl"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return head.stdout.strip() + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def _has_amx() -> bool:
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
