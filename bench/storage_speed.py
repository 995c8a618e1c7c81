"""The storage layer's three figures (the paper §2.3), each beside its reference from the same run and a bound:

  loader   samples/s of a prepared store whose images sit behind an HTTP server that takes a fixed 50 ms per GET
           (tests/storage_servers.py on 127.0.0.1), loaded by the prefetcher with N fetch workers, against
           fetching inside the training loop (0 workers). Bound: N / 50 ms (each sample is one GET).
  open     opening a store of 1,000,000 samples and planning an epoch's rows from its stored lengths: seconds and
           the resident memory added, against reading the same samples' JSONL into memory (what training did
           before). Bound: the memory of the lengths alone (4 bytes a sample).
  video    loading an HD video through the decoded-video cache: the second epoch (a hit: the file hashed, the
           frames read back, cut into patches) against the first (decoded, written). Goal >= 10x. Bound: the file's
           and the kept frames' bytes at this machine's measured copy bandwidth (a hit reads each once).

"disturbed": the CPU time other processes took meanwhile, as a share of the 2 cores (above 5%, do not trust it).

    .venv/bin/python bench/storage_speed.py
    .venv/bin/python bench/storage_speed.py --only loader --samples 400
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from model_speed import OtherLoad  # noqa: E402

GET_SECONDS = 0.05


class OthersThanUs(OtherLoad):
    """OtherLoad, counting the CPU time of our own finished subprocesses as ours."""

    @staticmethod
    def _read() -> tuple[float, float, float]:
        import os

        busy, _, now = OtherLoad._read()
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK"), now


def disturbed(load: OtherLoad) -> str:
    r = load.result()
    return f"{100 * r['others_cpu_s'] / (2 * r['wall_s']):.1f}%"


def small_checkpoint(where: Path) -> Path:
    from helpers import make_reference, small_config, small_tokenizer_json

    from qwen2vl.processing.processor import save_processor_files

    make_reference(small_config(), where)
    save_processor_files(where, small_tokenizer_json())
    return where


def loader(args, tmp: Path) -> None:
    from PIL import Image
    from storage_servers import MediaServer

    from qwen2vl.processing.processor import Processor
    from qwen2vl.train.loader import Prefetcher, StoreSamples, media_access
    from qwen2vl.train.store import Store, prepare

    files = {}
    for k in range(args.samples):
        buf = io.BytesIO()
        Image.new("RGB", (112, 112), (k % 256, 40, 200)).save(buf, format="PNG")
        files[f"/img{k}.png"] = buf.getvalue()
    model = small_checkpoint(tmp / "model")
    with MediaServer(files, delay=GET_SECONDS) as server:
        recs = [{"messages": [{"role": "user", "content": [{"type": "image", "image": server.url(f"/img{k}.png")},
                                                           {"type": "text", "text": "colour?"}]},
                              {"role": "assistant", "content": "blue"}]} for k in range(args.samples)]  # fmt: skip
        (tmp / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        processor = Processor.from_pretrained(model)
        processor.media.access = media_access(workers=32, allow_private=True)
        prepare([str(tmp / "l.jsonl")], tmp / "lstore", processor, model, workers=32)
        store = Store.open(tmp / "lstore")
        print(f"\nloader: {args.samples} samples, one {GET_SECONDS * 1000:.0f} ms GET each, rows of 8 samples")
        print(f"{'workers':>7} {'samples/s':>10} {'in-loop/s':>10} {'ours/ref':>9} {'bound/s':>8} {'ours/bound':>10} "
              f"{'disturbed':>9}")  # fmt: skip
        reference = None
        for workers in [0, *args.workers]:
            processor.media.access = media_access(workers=max(1, workers), allow_private=True)
            samples = StoreSamples(store, processor, {}, turn_weights=False, batch_tokens=10**6, max_overlong=0)
            steps = [[list(range(i, min(i + 8, args.samples)))] for i in range(0, args.samples, 8)]
            load = OthersThanUs()
            t = time.perf_counter()
            for _, got in Prefetcher(samples, workers, ahead=max(1, workers // 8 + 1)).steps(iter(steps), lambda s: s[0]):
                assert len(got) == len(_[0])
            rate = args.samples / (time.perf_counter() - t)
            reference = reference or rate
            bound = max(1, workers) / GET_SECONDS
            print(f"{workers:>7} {rate:>10.1f} {reference:>10.1f} {rate / reference:>9.2f} {bound:>8.0f} "
                  f"{rate / bound:>10.2f} {disturbed(load):>9}")  # fmt: skip


def _open_worker(path: str, jsonl: str) -> None:
    """Run in a fresh process: (seconds, resident MiB added) of opening the store and planning an epoch, then of
    reading the JSONL into memory."""
    import torch

    from qwen2vl.train.packing import plan_rows
    from qwen2vl.train.store import Store

    def rss() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
        return 0.0

    out = {}
    base, t = rss(), time.perf_counter()
    store = Store.open(path)
    out["open_s"], out["open_mib"] = time.perf_counter() - t, rss() - base
    t = time.perf_counter()
    lengths = store.lengths.tolist()
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    rows = plan_rows([lengths[i] for i in order], 4096)
    for i in np.random.default_rng(0).integers(0, len(store), 1000):
        store.text(int(i))
    out["plan_s"], out["plan_mib"], out["rows"] = time.perf_counter() - t, rss() - base, len(rows)
    del lengths, order, rows
    base, t = rss(), time.perf_counter()
    with open(jsonl) as f:
        records = [json.loads(line) for line in f]
    out["jsonl_s"], out["jsonl_mib"], out["jsonl_records"] = time.perf_counter() - t, rss() - base, len(records)
    print(json.dumps(out))


def open_store(args, tmp: Path) -> None:
    from qwen2vl.train.data import Text
    from qwen2vl.train.store import StoreWriter

    n, rng = args.store_samples, np.random.default_rng(0)
    t = time.perf_counter()
    writer = StoreWriter(tmp / "big", {"tokenizer": "synthetic", "media_settings": {}, "sources": []})
    with open(tmp / "big.jsonl", "w") as f:
        for i in range(n):
            size = int(rng.integers(8, 40))
            ids = rng.integers(0, 150000, size)
            turns = np.where(np.arange(size) >= size // 2, 0, -1)
            image = {"type": "image", "image": f"s3://bucket/images/{i:07d}.jpg"}
            writer.add(Text(ids, turns), [["image", image, 64]], f"data.jsonl:{i + 1}", size + 63)
            f.write(json.dumps({"messages": [{"role": "user", "content": [image, {"type": "text", "text": "w " * (size // 2)}]},
                                             {"role": "assistant", "content": "w " * (size // 2)}]}) + "\n")  # fmt: skip
    writer.close()
    made = time.perf_counter() - t
    load = OthersThanUs()
    code = f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'bench')]!r}; from storage_speed import _open_worker; " \
           f"_open_worker({str(tmp / 'big')!r}, {str(tmp / 'big.jsonl')!r})"  # fmt: skip
    r = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    bound_mib = n * 4 / 2**20
    print(f"\nopen: a store of {n:,} samples (written in {made:.0f} s; {sum(p.stat().st_size for p in (tmp / 'big').iterdir()) / 2**20:.0f} MiB), "
          f"its JSONL {(tmp / 'big.jsonl').stat().st_size / 2**20:.0f} MiB")  # fmt: skip
    print(f"{'':<22} {'seconds':>8} {'MiB added':>10}")
    print(f"{'open':<22} {r['open_s']:>8.3f} {r['open_mib']:>10.1f}")
    print(f"{'+ plan an epoch':<22} {r['plan_s']:>8.3f} {r['plan_mib']:>10.1f}   ({r['rows']:,} rows of 4096 tokens)")
    print(f"{'JSONL into memory':<22} {r['jsonl_s']:>8.3f} {r['jsonl_mib']:>10.1f}")
    print(f"ref/ours: open {r['jsonl_s'] / r['open_s']:.0f}x faster, {r['jsonl_mib'] / max(r['open_mib'], 0.1):.0f}x less "
          f"memory; planned: {r['jsonl_mib'] / max(r['plan_mib'], 0.1):.1f}x less memory than the JSONL. bound: the "
          f"lengths alone, {bound_mib:.1f} MiB (planned/bound {r['plan_mib'] / bound_mib:.1f}); disturbed "
          f"{disturbed(load)}")  # fmt: skip


def hd_clip(path: Path, seconds: int) -> Path:
    """HD at 30 fps: a moving gradient under a band of noise, so that it encodes and decodes as a camera's footage
    does, not as a still."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "23"}
        y, x = np.mgrid[0:720, 0:1280]
        noise = np.random.default_rng(0).integers(0, 255, (720 * 2, 1280, 3), dtype=np.uint8)
        for k in range(30 * seconds):
            a = np.repeat(((x + 4 * k) % 256).astype(np.uint8)[..., None], 3, axis=2)
            a[:, :, 1] = (y + 2 * k) % 256
            a[200:300] = noise[(k * 7) % 1000 : (k * 7) % 1000 + 100]
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def video(args, tmp: Path) -> None:
    from qwen2vl.processing.processor import MediaLoader
    from qwen2vl.train.loader import media_access  # what training reads with: videos up to 2 GiB

    a = np.random.default_rng(0).integers(0, 255, 2**28, dtype=np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    t = time.perf_counter()
    np.copyto(b, a)
    bandwidth = a.nbytes / (time.perf_counter() - t)  # bytes copied a second (read once, written once)
    del a, b
    print(f"\nvideo: HD (1280x720, 30 fps) clips loaded as training loads them (frames sampled at 2 fps, resized, "
          f"cut into patches), medians of {args.repeats}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")  # fmt: skip
    print(f"{'clip':>6} {'MiB':>6} {'kept':>16} {'first s':>8} {'second s':>9} {'first/second':>12} {'bound ms':>9} "
          f"{'bound/second':>12} {'disturbed':>9}")  # fmt: skip
    for seconds in args.video_seconds:
        path = hd_clip(tmp / f"clip{seconds}.mp4", seconds)
        load = OthersThanUs()
        first, second = [], []
        for k in range(args.repeats):
            loader = MediaLoader(video_cache=str(tmp / f"cache{seconds}-{k}"), access=media_access())
            for times in (first, second):
                t = time.perf_counter()
                info, _ = loader.load("video", {"video": str(path)}, "video", {}, levels=True)
                times.append(time.perf_counter() - t)
        kept = next((tmp / f"cache{seconds}-0").rglob("*.clip")).stat().st_size
        f, s = float(np.median(first)), float(np.median(second))
        bound = (kept + path.stat().st_size) / bandwidth  # the frames read back, the file hashed: each byte once
        print(f"{seconds:>5}s {path.stat().st_size / 2**20:>6.1f} {f'{info.frames}x{info.size[1]}x{info.size[0]}':>16} "
              f"{f:>8.3f} {s:>9.3f} {f / s:>11.1f}x {bound * 1000:>9.1f} {bound / s:>12.2f} {disturbed(load):>9}")  # fmt: skip
    print("goal: first/second >= 10x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["loader", "open", "video"])
    parser.add_argument("--samples", type=int, default=320, help="loader: samples behind the HTTP server")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--store-samples", type=int, default=1_000_000)
    parser.add_argument("--video-seconds", type=int, nargs="+", default=[10, 30, 90])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"storage_speed, {time.strftime('%Y-%m-%d %H:%M')}; peak RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("loader", loader), ("open", open_store), ("video", video)):
            if args.only in (None, name):
                (Path(tmp) / name).mkdir()
                fn(args, Path(tmp) / name)


if __name__ == "__main__":
    main()
