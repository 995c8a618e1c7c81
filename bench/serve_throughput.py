"""Serving throughput: 8 concurrent clients against the same 8 requests sent one after another, through the
OpenAI-compatible server (continuous batching), on the Qwen2-VL-2B architecture with random weights.

The server runs in this process (uvicorn on 127.0.0.1, engine thread) with the genuine Qwen2 tokenizer built
offline as in the tests (needs the test extras: dashscope's qwen.tiktoken). Nothing is written to disk but the
tokenizer files. Each request: a different short question (20-30 prompt tokens), ``max_tokens`` new tokens,
greedy; eos ends a request early only if the random model happens to produce it (reported). Throughput =
completion tokens / wall time. Ratio = concurrent / sequential (> 1: batching helps; the goal is >= 3).

    .venv/bin/python bench/serve_throughput.py [--dtype bfloat16] [--max-tokens 32] [--clients 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build_assistant(dtype: torch.dtype, preset: str, directory: str, pack: bool = True):
    import qwen2vl
    from helpers import write_processor_files

    write_processor_files(directory)
    config = qwen2vl.qwen2vl_2b() if preset == "2b" else qwen2vl.tiny()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = qwen2vl.Qwen2VL(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights()
    model = model.to(dtype).eval()
    if pack:
        model.pack_for_cpu()  # as qwen2vl.load() does on the CPU
    return qwen2vl.Assistant(model, qwen2vl.Processor.from_pretrained(directory))


def start_server(assistant, max_batch_size: int):
    import uvicorn

    from qwen2vl.serve.app import ServerConfig, create_app

    config = ServerConfig(model_name="bench", max_model_len=4096, max_batch_size=max_batch_size, max_queue=64)
    server = uvicorn.Server(uvicorn.Config(create_app(assistant, config), host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


QUESTIONS = [
    "What is the capital of France, and why did it become the capital?",
    "Describe the water cycle in a few sentences for a child.",
    "Write a short poem about the sea at night.",
    "List three differences between cats and dogs.",
    "How does a bicycle stay upright when it moves?",
    "Explain what a neural network is in simple words.",
    "What should I pack for a weekend hiking trip?",
    "Summarise the plot of a detective story you like.",
]


def ask(base: str, question: str, max_tokens: int) -> tuple[int, str]:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=3600)
    r.raise_for_status()
    out = r.json()
    return out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--preset", default="2b", choices=["2b", "tiny"])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-pack", action="store_true", help="the plain model, without pack_for_cpu()")
    args = parser.parse_args()
    torch.set_num_threads(2)
    questions = (QUESTIONS * ((args.clients + 7) // 8))[: args.clients]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        assistant = build_assistant(getattr(torch, args.dtype), args.preset, d, pack=not args.no_pack)
        print(f"built the {args.preset} model ({args.dtype}, random weights) in {time.perf_counter() - t:.0f} s")
        server, base = start_server(assistant, max_batch_size=args.clients)
        ask(base, "warm-up", 2)

        t = time.perf_counter()
        sequential = [ask(base, q, args.max_tokens) for q in questions]
        seq_time = time.perf_counter() - t

        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            concurrent_ = list(pool.map(lambda q: ask(base, q, args.max_tokens), questions))
        con_time = time.perf_counter() - t
        server.should_exit = True

    seq_tokens, con_tokens = sum(n for n, _ in sequential), sum(n for n, _ in concurrent_)
    early = sum(reason == "stop" for _, reason in sequential + concurrent_)
    seq_rate, con_rate = seq_tokens / seq_time, con_tokens / con_time
    print(f"\n{args.clients} requests x {args.max_tokens} tokens, {args.preset} {args.dtype}"
          f"{'' if args.no_pack else ' (packed for the CPU)'}, 2 threads"
          f"{f' ({early} ended early on eos)' if early else ''}")
    print(f"{'mode':<26} {'tokens':>7} {'wall (s)':>9} {'tokens/s':>9}")
    print(f"{'one after another':<26} {seq_tokens:>7} {seq_time:>9.1f} {seq_rate:>9.2f}")
    print(f"{f'{args.clients} concurrent clients':<26} {con_tokens:>7} {con_time:>9.1f} {con_rate:>9.2f}")
    print(f"ratio concurrent / sequential: {con_rate / seq_rate:.2f}x")


if __name__ == "__main__":
    main()
