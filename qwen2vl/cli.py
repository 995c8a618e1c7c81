"""``qwen2vl <verb>``: the command line. Argument parsing, then one library call per verb; this file owns the
terminal. Heavy modules (torch, training) are imported inside the verbs, so that ``--help`` loads none of them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .hub import HUB_ID, resolve_model


class ArgumentError(ValueError):
    """An argument that cannot be used (a missing file, an unreadable image): exit code 2, as argparse's own."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Qwen2-VL in plain PyTorch")
    verbs = parser.add_subparsers(dest="verb", required=True)

    verbs.add_parser("params", help="parameter counts of the presets (the paper's Table 1)")

    chat = verbs.add_parser("chat", help="ask a model about images and videos (interactive without a prompt)")
    chat.add_argument("model", help="a checkpoint directory, or a hub id (fetched when online)")
    chat.add_argument("prompt", nargs="?", help="the question; without it, an interactive multi-turn session")
    add_media_arguments(chat)
    chat.add_argument("--system", help="system prompt (default: the template's 'You are a helpful assistant.')")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--top-k", type=int)
    chat.add_argument("--repetition-penalty", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--stop", action="append", help="stop string (repeatable)")
    chat.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on the CPU")
    chat.add_argument("--quantize", choices=["int8"], help="int8: the LLM's weights in int8 (faster CPU decoding)")
    chat.add_argument("--device", help="e.g. cuda, cpu (default: cpu)")
    chat.add_argument("--draw-boxes", metavar="OUT.png", help="draw the answer's grounding boxes on the first image")

    serve = verbs.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions)")
    serve.add_argument("model", help="a checkpoint directory, or a hub id (fetched when online)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $QWEN2VL_API_KEY)")
    serve.add_argument("--served-model-name", help="the model id clients use (default: the directory name)")
    serve.add_argument("--max-model-len", type=int, default=32768, help="prompt + answer tokens per request")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=32, help="requests waiting for a slot; more get 429")
    serve.add_argument("--max-request-bytes", type=int, default=64 * 2**20,
                       help="largest request body accepted; more get 413 (default 64 MiB)")  # fmt: skip
    serve.add_argument("--limit-mm-per-prompt", default='{"image": 4, "video": 1}', help="JSON, per request")
    serve.add_argument("--allowed-local-media-path", metavar="DIR", help="local files (file:// or paths) only inside")
    serve.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="D",
                       help="hosts whose URLs may resolve to private addresses")  # fmt: skip
    serve.add_argument("--tool-format", choices=["qwen", "hermes"], default="qwen",
                       help="how tools and calls are written for the model (default qwen: Qwen-Agent's ✿FUNCTION✿)")
    serve.add_argument("--video-cache", metavar="DIR", help="keep decoded video clips in DIR, keyed by content: "
                       "a clip posted again (any URL, any name) is read back instead of decoded")
    serve.add_argument("--video-cache-size", type=size, metavar="SIZE",
                       help="bytes DIR may hold, e.g. 500M, 50G; the least recently used clips are evicted "
                            "(default 10G)")  # fmt: skip
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--quantize", choices=["int8"], help="int8: the LLM's weights in int8 (faster CPU decoding)")
    serve.add_argument("--device")

    train = verbs.add_parser("train", help="train one of the paper's three stages (torchrun for several processes)")
    train.add_argument("--stage", type=int, choices=[1, 2, 3])
    train.add_argument("--model", help="checkpoint directory to start from")
    train.add_argument("--data", help="JSONL records (messages or ShareGPT conversations), or a store that "
                       "`qwen2vl data prepare` made: its directory or its object-store URI (s3://...)")
    train.add_argument("--out", help="output directory: checkpoints, metrics.jsonl")
    train.add_argument("--recipe", help="YAML file of settings; flags override it")
    train.add_argument("--resume", action="store_true", default=None, help="continue from OUT's latest checkpoint")
    train.add_argument("--max-steps", type=int)
    train.add_argument("--batch-tokens", type=int, help="tokens per packed row")
    train.add_argument("--rows-per-step", type=int, help="rows per optimizer step per process (accumulation)")
    train.add_argument("--lr", type=float)
    train.add_argument("--vision-lr-scale", type=float, help="the ViT's lr relative to --lr (default: the stage's)")
    train.add_argument("--warmup-steps", type=int, help="default: a tenth of --max-steps, at most 10")
    train.add_argument("--save-every", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--dtype", choices=["float32", "bfloat16"], help="bfloat16: autocast")
    train.add_argument("--activation-checkpointing", action="store_true", default=None)
    train.add_argument("--parallel", choices=["ddp", "fsdp"], help="under torchrun (default ddp)")
    train.add_argument("--loss-weighting", choices=["token", "turn"],
                       help="token: every supervised token weighs the same (default); turn: every reply does")
    train.add_argument("--device", help="cpu, cuda, cuda:N (default: this process's GPU if there is one, else cpu)")
    train.add_argument("--video-cache", metavar="DIR", help="keep decoded clips in DIR, keyed by the videos' content: "
                       "the next epoch or run (or a server) reads them back instead of decoding")
    train.add_argument("--video-cache-size", type=size, metavar="SIZE",
                       help="bytes --video-cache DIR may hold, e.g. 50G; the least recently used clips are evicted")
    train.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    train.add_argument("--tensorboard", action="store_true", default=None, help="also log to OUT/tensorboard")
    train.add_argument("--max-skipped", type=float, help="fraction of samples whose media cannot be had that fails "
                       "the run (default 0.01); below it each is skipped, counted and logged with its reason")
    add_fetch_arguments(train, defaults=None)

    export = verbs.add_parser("export", help="a training checkpoint -> a hub-layout model directory")
    export.add_argument("checkpoint", help="OUT/checkpoint-N, or OUT (its latest checkpoint)")
    export.add_argument("dest")
    export.add_argument("--base", help="where the tokenizer/preprocessor files come from (default: the run's --model)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="store the weights in this type")

    ev = verbs.add_parser("eval", help="answer a JSONL of questions and score them per task")
    ev.add_argument("model", help="a checkpoint directory, or a hub id (fetched when online)")
    ev.add_argument("--data", required=True, help="JSONL: messages + answer(s), optional task and metric")
    ev.add_argument("--metric", help="default scorer: exact, vqa, anls, relaxed, box, choice")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--limit", type=int, help="only the first N records")
    ev.add_argument("--out", help="write the JSON report here")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute in this type (default: as stored)")
    ev.add_argument("--quantize", choices=["int8"], help="int8: the LLM's weights in int8 (faster CPU decoding)")

    agent = verbs.add_parser("agent", help="act in a GUI: screenshot -> model -> function call -> repeat")
    agent.add_argument("model", help="a checkpoint directory, a hub id, or the http(s) URL of an OpenAI-compatible "
                                     "server")
    agent.add_argument("--env", choices=["gui", "browser"], default="gui",
                       help="gui: the synthetic screens drawn with PIL; browser: the same tasks in headless Chromium")
    agent.add_argument("--task", help="a task template (click, tick_then_press, type_and_enter, menu, "
                                      "scroll_and_click); default: one drawn by the seed")
    agent.add_argument("--seed", type=int, default=0, help="the first episode's seed")
    agent.add_argument("--episodes", type=int, default=1, help="episodes to run (seeds seed, seed + 1, ...)")
    agent.add_argument("--max-steps", type=int, default=10)
    agent.add_argument("--format", choices=["qwen", "hermes"], default="qwen", help="the function-call format")
    agent.add_argument("--api-key", help="the server's key, for a URL (default: $QWEN2VL_API_KEY)")
    agent.add_argument("--out", help="write each trajectory here (JSONL, screenshots, index.html)")
    agent.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on the CPU")

    data = verbs.add_parser("data", help="training data tools")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    check = data_verbs.add_parser("check", help="validate every record and show one with its supervised tokens")
    check.add_argument("file")
    check.add_argument("--model", required=True, help="checkpoint directory (its tokenizer and preprocessor)")
    check.add_argument("--batch-tokens", type=int, default=2048, help="the length limit to check against")
    check.add_argument("--show", type=int, default=1, help="which record to print (line number)")
    prep = data_verbs.add_parser("prepare", help="tokenise JSONL records once into a memory-mapped store that "
                                 "`qwen2vl train --data` reads (media stay where they are; their tokens are counted "
                                 "from their headers)")  # fmt: skip
    prep.add_argument("inputs", nargs="+", metavar="IN.jsonl")
    prep.add_argument("--out", required=True, help="the store's directory, or an object-store URI to upload it to")
    prep.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct",
                      help="checkpoint whose tokenizer and preprocessor settings the store is made with "
                           "(default: the official one, from the hub; all Qwen2-VL sizes share them)")  # fmt: skip
    for flag in ("--min-pixels", "--max-pixels"):
        prep.add_argument(flag, type=int, help="as the run's media settings (train checks they agree)")
    prep.add_argument("--fps", type=float)
    prep.add_argument("--max-frames", type=int)
    add_fetch_arguments(prep, defaults=True)
    upload = data_verbs.add_parser("upload", help="copy a prepared store to an object store (its index last, so "
                                   "that a half-done upload is never taken for a store)")  # fmt: skip
    upload.add_argument("store", help="the store's directory")
    upload.add_argument("dest", metavar="URI", help="e.g. s3://bucket/prepared")
    add_fetch_arguments(upload, defaults=True, reading=False)

    tokens = verbs.add_parser("tokens", help="how many tokens each image and video costs, without a model")
    add_media_arguments(tokens)
    tokens.add_argument("--model", help="checkpoint directory whose preprocessor_config.json sets the defaults")

    args, extra = parser.parse_known_args(argv)
    # argparse binds positionals at their first chance, so "chat MODEL --image P PROMPT" leaves PROMPT over
    if args.verb == "chat" and args.prompt is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.prompt, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verb == "agent":  # a server's URL is not a model to load
        args.local_model = None if args.model.startswith(("http://", "https://")) else args.model
    run = {"params": run_params, "tokens": run_tokens, "chat": run_chat, "serve": run_serve,
           "train": run_train, "export": run_export, "eval": run_eval, "data": run_data,
           "agent": run_agent}[args.verb]
    try:
        check_inputs(args)
        return run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # our errors are one line and name the problem
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ArgumentError) else 1


def add_fetch_arguments(p: argparse.ArgumentParser, defaults: bool | None, reading: bool = True) -> None:
    """Fetching from URLs and object stores. ``defaults=None``: unset flags stay None (a recipe may set them)."""
    def default(value):
        return value if defaults else None

    p.add_argument("--fetch-workers", type=int, default=default(8), metavar="N",
                   help="requests in flight at once (training: threads loading the next steps' samples; 0: in the "
                        "loop)")  # fmt: skip
    p.add_argument("--fetch-qps", type=float, metavar="Q", help="at most Q requests in any one second (the store's "
                   "limit), retries included")  # fmt: skip
    p.add_argument("--fetch-retries", type=int, default=default(5), metavar="N",
                   help="retries of a throttled (429, 503, SlowDown) or failed (reset, truncated, timed out) request, "
                        "with exponential backoff and jitter")  # fmt: skip
    p.add_argument("--fetch-timeout", type=float, default=default(30.0), metavar="S", help="seconds per request")
    if reading:
        p.add_argument("--fetch-allow-private", action="store_true", default=default(False),
                       help="media URLs may resolve to private addresses (an in-house media server)")
    p.add_argument("--storage-options", type=json_object, metavar="JSON", default=default({}),
                   help='fsspec options per protocol, e.g. \'{"s3": {"endpoint_url": "http://127.0.0.1:9000"}}\' '
                        "(fsspec's FSSPEC_S3_ENDPOINT_URL-style variables and AWS_* work too)")  # fmt: skip


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def size(text: str) -> int:
    """An argparse type: ``--video-cache-size 10G`` -> bytes (the parser is imported only when the flag is given)."""
    from .processing.video_cache import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_media_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], metavar="P", help="image path or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="P", help="video path or URL (repeatable)")
    p.add_argument("--min-pixels", type=int, help="per image (per video frame) pixel floor")
    p.add_argument("--max-pixels", type=int, help="per image (per video frame) pixel ceiling")
    p.add_argument("--fps", type=float, help="video frames sampled per second (default 2)")
    p.add_argument("--max-frames", type=int, help="at most this many video frames")


def media_options(args: argparse.Namespace) -> dict:
    keys = ("min_pixels", "max_pixels", "fps", "max_frames")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def media_content(args: argparse.Namespace) -> list[dict]:
    return [{"type": "image", "image": p} for p in args.image] + [{"type": "video", "video": p} for p in args.video]


# The local files and directories each verb reads, checked before anything loads: (attribute, its name, kind).
# A "model" is a directory or a hub id; "image" and "video" are paths (checked and decoded) or URLs (fetched later).
INPUTS = {
    "chat": [("model", "MODEL", "model"), ("image", "--image", "image"), ("video", "--video", "video")],
    "tokens": [("model", "--model", "model"), ("image", "--image", "image"), ("video", "--video", "video")],
    "serve": [("model", "MODEL", "model"), ("allowed_local_media_path", "--allowed-local-media-path", "directory")],
    "eval": [("model", "MODEL", "model"), ("data", "--data", "file")],
    "train": [("recipe", "--recipe", "file"), ("model", "--model", "directory"), ("data", "--data", "data")],
    "export": [("checkpoint", "CHECKPOINT", "directory"), ("base", "--base", "directory")],
    "data check": [("file", "FILE", "file"), ("model", "--model", "model")],
    "data prepare": [("inputs", "IN.jsonl", "file"), ("model", "--model", "model")],
    "data upload": [("store", "STORE", "store")],
    "agent": [("local_model", "MODEL", "model")],
}


def check_inputs(args: argparse.Namespace) -> None:
    """Raise an :class:`ArgumentError` naming the first of a verb's ``INPUTS`` that does not exist, read or decode."""
    verb = f"data {args.data_verb}" if args.verb == "data" else args.verb
    for attr, name, kind in INPUTS.get(verb, []):
        value = getattr(args, attr)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and kind in ("image", "video"):
                check_media(kind, v, name)
            elif v is not None:
                check_path(v, name, kind)


def check_path(value: str, name: str, kind: str) -> None:
    """``kind``: "file", "directory", "model" (a directory, or a hub id that is fetched later), "store" (a prepared
    store's directory) or "data" (a JSONL file, a store's directory, or an object-store URI, read later)."""
    if kind == "data" and "://" in value:
        return
    path = Path(value).expanduser()
    if kind in ("store", "data") and path.is_dir():
        if not (path / "index.json").is_file():
            raise ArgumentError(f"{name} {value}: a directory without index.json, not a prepared store")
        kind = "directory"
    elif kind == "data":
        kind = "file"
    if not path.exists():
        if kind == "model" and HUB_ID.fullmatch(value):
            return
        raise ArgumentError(f"{name} {value}: no such {'file' if kind == 'file' else 'directory'}")
    if kind == "file" and path.is_dir():
        raise ArgumentError(f"{name} {value}: a directory, not a file")
    if kind != "file" and not path.is_dir():
        raise ArgumentError(f"{name} {value}: not a directory")
    if not os.access(path, os.R_OK):
        raise ArgumentError(f"{name} {value}: not readable (permission denied)")


def check_media(kind: str, source: str, name: str) -> None:
    """A local image decodes, a local video opens and its first frame decodes; URLs are left to the loader."""
    from .processing.errors import MediaError, describe
    from .processing.image import load_image

    if source.startswith(("http://", "https://", "data:")):
        return
    path = source.removeprefix("file://")
    check_path(path, name, "file")
    try:
        if kind == "image":
            load_image(path, name=name)
            return
        import av

        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise MediaError("no video stream")
                if next(container.decode(container.streams.video[0]), None) is None:
                    raise MediaError("no decodable frame")
        except (av.FFmpegError, OSError) as e:
            raise MediaError(f"not a readable video ({e})") from None
    except MediaError as e:  # the library names the item by a shortened path: name it by the whole one
        raise ArgumentError(f"{name} {source}: {str(e).removeprefix(f'{name} ({describe(path)}): ')}") from None


def run_tokens(args: argparse.Namespace) -> None:
    """One line per item: original and model size, frames, grid, tokens; then the total."""
    from .processing.processor import MediaLoader, media_settings

    items = media_content(args)
    if not items:
        raise ValueError("give at least one --image or --video")
    loader = MediaLoader(**(media_settings(resolve_model(args.model)) if args.model else {}))
    options = media_options(args)
    total = 0
    print(f"{'item':<10} {'source':<36} {'original':>11} {'model input':>13} {'frames':>6} {'grid (t,h,w)':>14} "
          f"{'tokens':>7}")
    for i, part in enumerate(items):
        kind = part["type"]
        n = sum(p["type"] == kind for p in items[:i]) + 1
        info, _ = loader.load(kind, part, f"{kind} {n}", options, levels=True)  # sizes only: skip normalising
        total += info.tokens
        (h0, w0), (h, w) = info.original_size, info.size
        source = info.source if len(info.source) <= 36 else "..." + info.source[-33:]
        print(f"{kind + ' ' + str(n):<10} {source:<36} {f'{w0}x{h0}':>11} {f'{w}x{h}':>13} {info.frames:>6} "
              f"{tuple(info.grid)!s:>14} {info.tokens:>7}")
    print(f"total: {total} visual tokens ({total + 2 * len(items)} with <|vision_start|>/<|vision_end|>)")


def run_chat(args: argparse.Namespace) -> None:
    """One answer, or an interactive session where a bad /image path or a failed turn is an error line and the
    conversation goes on."""
    from . import load

    assistant = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    keys = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
    generation = {k: getattr(args, k) for k in keys} | media_options(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    media = media_content(args)
    interactive = args.prompt is None
    for question in read_questions(media) if interactive else [args.prompt]:
        history.append({"role": "user", "content": [*media, {"type": "text", "text": question}]})
        media.clear()
        answer = []
        try:
            for piece in assistant.stream(history, **generation):
                answer.append(piece)
                print(piece, end="", flush=True)
        except ValueError as e:  # a media file that fails to decode, a prompt too long: this turn only
            if not interactive:
                raise
            history.pop()
            print(f"{chr(10) if answer else ''}qwen2vl: error: {e} (this turn is dropped; the conversation goes on)",
                  file=sys.stderr)  # fmt: skip
            continue
        print()
        history.append({"role": "assistant", "content": "".join(answer)})
        if args.draw_boxes:
            draw_answer_boxes(history, "".join(answer), args.draw_boxes)


def read_questions(media: list[dict]) -> Iterator[str]:
    """The interactive session's questions, up to an empty line or EOF; ``/image P`` and ``/video P`` add to
    ``media`` (the next turn's) instead."""
    print("Interactive chat: empty line or Ctrl-D ends it; /image P or /video P attaches media to the next turn.",
          file=sys.stderr)
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "").strip()
        except EOFError:
            return
        if not line or line in ("/exit", "/quit"):
            return
        command, _, path = line.partition(" ")
        if command not in ("/image", "/video"):
            yield line
            continue
        kind, path = command[1:], path.strip()
        try:
            if not path:
                raise ArgumentError(f"{command} wants a path or URL: {command} PATH")
            check_media(kind, path, command)
            media.append({"type": kind, kind: path})
        except ArgumentError as e:
            print(f"qwen2vl: error: {e} (the conversation goes on)", file=sys.stderr)


def draw_answer_boxes(history: list[dict], answer: str, out: str) -> None:
    from .processing.grounding import draw_answer

    images = [p["image"] for m in history if isinstance(m["content"], list) for p in m["content"] if "image" in p]
    if not images:
        raise ValueError("--draw-boxes needs an --image to draw on")
    boxes = draw_answer(images[0], answer, out, name="image 1")
    print(f"[{len(boxes)} box{'es' if len(boxes) != 1 else ''} drawn on image 1 -> {out}]", file=sys.stderr)


def run_train(args: argparse.Namespace) -> None:
    from .train.loop import TrainConfig, train

    settings = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.from_recipe(args.recipe, **{k: v for k, v in vars(args).items() if k in settings})
    for key, kind in (("model", "directory"), ("data", "file")):
        if getattr(args, key) is None:  # the recipe's (the flags were checked before it was read)
            check_path(getattr(cfg, key), f"{args.recipe}: {key}", kind)
    history = train(cfg)
    if history and int(os.environ.get("RANK", "0")) == 0:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}; checkpoints and metrics.jsonl in {cfg.out}")


def run_export(args: argparse.Namespace) -> None:
    from .train.export import export

    print(f"exported to {export(args.checkpoint, args.dest, args.base, args.dtype)}")


def run_eval(args: argparse.Namespace) -> None:
    from . import load
    from .eval.run import evaluate, markdown, write_report

    report = evaluate(load(args.model, dtype=args.dtype, quantize=args.quantize), args.data, args.metric, max_new_tokens=args.max_new_tokens,
                      limit=args.limit)  # fmt: skip
    print(markdown(report))
    print(f"{report['n']} records in {report['seconds']:.0f} s")
    if args.out:
        write_report(report, args.out)
        print(f"report: {args.out}")


def run_data(args: argparse.Namespace) -> int | None:
    if args.data_verb == "check":
        from .train.check import check_file

        return check_file(args.file, args.model, args.batch_tokens, args.show)
    from .train.loader import media_access
    from .train.store import prepare, upload

    access = media_access(workers=args.fetch_workers, qps=args.fetch_qps, retries=args.fetch_retries,
                          timeout=args.fetch_timeout, allow_private=getattr(args, "fetch_allow_private", False),
                          storage_options=args.storage_options)  # fmt: skip
    if args.data_verb == "upload":
        files = upload(args.store, args.dest, access.remote)
        print(f"{files} files of {args.store} -> {args.dest}")
        return None
    from .processing.processor import Processor
    from .train.store import is_uri

    model = resolve_model(args.model)
    processor = Processor.from_pretrained(model)
    processor.media.access = access
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "store" if is_uri(args.out) else Path(args.out)
        index = prepare(args.inputs, local, processor, model, media=media_options(args), workers=args.fetch_workers,
                        log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
        if is_uri(args.out):
            upload(local, args.out, access.remote)
    print(f"{index['samples']} samples, {index['tokens']:,} tokens with their media, in {len(index['shards'])} "
          f"shard(s) -> {args.out}")  # fmt: skip
    return None


def run_serve(args: argparse.Namespace) -> None:
    try:
        from .serve.app import ServerConfig, serve
    except ImportError as e:
        raise ValueError(f"serving needs the 'serve' extra: pip install 'qwen2vl[serve]' ({e})") from None
    try:
        limits = json.loads(args.limit_mm_per_prompt)
        if not isinstance(limits, dict) or not all(isinstance(v, int) and v >= 0 for v in limits.values()):
            raise ValueError
    except ValueError:
        raise ValueError(f"--limit-mm-per-prompt must be a JSON object of counts, got {args.limit_mm_per_prompt!r}")
    as_given = ("max_model_len", "max_batch_size", "max_queue", "allowed_local_media_path", "max_request_bytes",
                "tool_format", "video_cache")
    if args.video_cache_size is not None:  # else ServerConfig's default bound
        as_given += ("video_cache_size",)
    config = ServerConfig(api_key=args.api_key or os.environ.get("QWEN2VL_API_KEY"), limit_mm_per_prompt=limits,
                          allowed_media_domains=tuple(args.allowed_media_domains),
                          **{k: getattr(args, k) for k in as_given})
    if args.served_model_name:
        config.model_name = args.served_model_name
    serve(args.model, args.host, args.port, dtype=args.dtype, device=args.device, config=config,
          quantize=args.quantize)


def run_agent(args: argparse.Namespace) -> None:
    from .agent import TEMPLATES, environment, run

    if args.task is not None and args.task not in TEMPLATES:
        raise ArgumentError(f"--task: {args.task!r} is not one of {', '.join(TEMPLATES)}")
    if args.episodes < 1 or args.max_steps < 1:
        raise ArgumentError("--episodes and --max-steps must be at least 1")
    if args.local_model is not None:
        from . import load

        model = load(args.local_model, dtype=args.dtype)
    else:
        model = args.model
    wins = 0
    with environment(args.env) as env:
        for k in range(args.episodes):
            out = None if args.out is None else Path(args.out) / (f"episode_{k}" if args.episodes > 1 else "")
            t = run(model, env, args.task, seed=args.seed + k, max_steps=args.max_steps, fmt=args.format, out=out,
                    api_key=args.api_key or os.environ.get("QWEN2VL_API_KEY"))
            wins += t.success
            seconds = sum(s.seconds for s in t.steps)
            print(f"{t.task!r}: {'success' if t.success else 'failure'} ({t.reason}) in {len(t.steps)} steps, "
                  f"{seconds:.1f} s" + (f" -> {out / 'index.html'}" if out is not None else ""))
    if args.episodes > 1:
        print(f"success: {wins} of {args.episodes} ({100 * wins / args.episodes:.0f}%)")


def params_table() -> str:
    """Parameter counts of the 2B, 7B and 72B presets, counted on the meta device (the paper's Table 1)."""
    import torch

    from . import Qwen2VL, qwen2vl_2b, qwen2vl_7b, qwen2vl_72b

    lines = ["Parameters of the presets, counted on the meta device (paper, Table 1):",
             f"  {'model':<6} {'vision (ViT+merger)':>20} {'LLM':>16} {'total':>16}"]  # fmt: skip
    for name, make in (("2B", qwen2vl_2b), ("7B", qwen2vl_7b), ("72B", qwen2vl_72b)):
        with torch.device("meta"):
            m = Qwen2VL(make())
        vis = sum(p.numel() for p in m.visual.parameters())
        total = sum(p.numel() for p in m.parameters())
        lines.append(f"  {name:<6} {vis:>20,} {total - vis:>16,} {total:>16,}")
    return "\n".join(lines)


def run_params(args: argparse.Namespace) -> None:
    print(params_table())


if __name__ == "__main__":
    raise SystemExit(main())
