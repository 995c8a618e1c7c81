"""The prepared store: training samples tokenised once, read back through mmap, their media left where they are
(the paper §2.3: text alone on a parallel file system, read through mmap; images and videos in an object store).

Megatron's indexed dataset (flat numpy arrays and an index of offsets), with numpy's .npy headers so that every
file says its own dtype and shape, and sharded so that an object store serves it in pieces:

    index.json              what the store is (format, tokenizer, media settings) and its shards, with their sizes
                            and sha256; written last, so a directory without it is not a store
    samples.npy             int64 [N, 3]: each sample's tokens with its vision tokens (what the packer plans with),
                            its supervised tokens and its replies (what the loss is normalised by)
    shard-NNNNN.tokens.npy  uint32 [T]: the text's ids, each image/video placeholder once
    shard-NNNNN.turns.npy   int32 [T]: the reply each token is supervised for; -1 where none
    shard-NNNNN.offsets.npy int64 [n, 4]: each sample's token range and media range in the shard
    shard-NNNNN.media.bin   JSON per sample: where it came from and its media (kind, content part, tokens)

Why this format and not Arrow (HF datasets) or MDS (MosaicML streaming): numpy is already a dependency, a sample
is two integer ranges, and opening is one mmap per file: nothing is read until it is used. A store in an object
store is fetched file by file into a local directory (each checked against its sha256) and then mapped alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..atomic import write_file
from ..processing.chat import media_parts
from ..processing.counting import media_tokens
from ..processing.errors import MediaError
from ..processing.processor import Processor
from ..records import DataError, read_jsonl
from .data import KINDS, Text, to_messages, tokenize, with_media

FORMAT, VERSION = "qwen2vl-store", 1
SHARD_TOKENS = 16 * 2**20  # text tokens a shard holds at most (128 MiB of ids and turns)
SHARD_FILES = ("tokens.npy", "turns.npy", "offsets.npy", "media.bin")


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def is_store(location: str | os.PathLike) -> bool:
    """A prepared store (an object-store URI, or a directory with an index.json), as opposed to a JSONL file."""
    return is_uri(location) or (Path(location) / "index.json").is_file()


def media_identity(processor: Processor, options: dict) -> dict:
    """Everything that decides a media item's token count: the checkpoint's preprocessor settings and the run's
    media options. A store is read only with the settings it was counted with."""
    loader = processor.media
    settings = {k: getattr(loader, k) for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size",
                                                "merge_size")}  # fmt: skip
    return json.loads(json.dumps({"loader": settings, "video_options": loader.video_options, "options": options}))


def tokenizer_hash(model: str | Path) -> str:
    return hashlib.sha256((Path(model) / "tokenizer.json").read_bytes()).hexdigest()


class StoreWriter:
    """Samples appended in order, shards flushed as they fill; ``close`` writes the index. Everything goes to a
    sibling directory that is renamed into place at the end, so a store is whole or absent."""

    def __init__(self, out: str | Path, meta: dict, shard_tokens: int = SHARD_TOKENS):
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise DataError(f"{self.out}: exists and is not empty; remove it or choose another --out")
        self.tmp = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.meta, self.shard_tokens = meta, shard_tokens
        self.shards: list[dict] = []
        self.samples: list[tuple[int, int, int]] = []
        self._reset()

    def _reset(self) -> None:
        self.tokens, self.turns, self.offsets, self.media, self.n_tokens, self.n_media = [], [], [], [], 0, 0

    def add(self, text: Text, media: list, where: str, length: int) -> None:
        blob = json.dumps({"where": where, "media": media}, ensure_ascii=False).encode()
        n = len(text.ids)
        self.offsets.append((self.n_tokens, self.n_tokens + n, self.n_media, self.n_media + len(blob)))
        self.tokens.append(text.ids.astype(np.uint32))
        self.turns.append(text.turns.astype(np.int32))
        self.media.append(blob)
        self.n_tokens, self.n_media = self.n_tokens + n, self.n_media + len(blob)
        supervised = text.turns >= 0
        self.samples.append((length, int(supervised.sum()), len(np.unique(text.turns[supervised]))))
        if self.n_tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.offsets:
            return
        name = f"shard-{len(self.shards):05d}"
        arrays = {"tokens.npy": np.concatenate(self.tokens), "turns.npy": np.concatenate(self.turns),
                  "offsets.npy": np.array(self.offsets, dtype=np.int64).reshape(-1, 4)}  # fmt: skip
        for suffix, array in arrays.items():
            np.save(self.tmp / f"{name}.{suffix}", array)
        (self.tmp / f"{name}.media.bin").write_bytes(b"".join(self.media))
        self.shards.append({"name": name, "samples": len(self.offsets), "files": {
            suffix: _describe_file(self.tmp / f"{name}.{suffix}") for suffix in SHARD_FILES}})  # fmt: skip
        self._reset()

    def close(self) -> dict:
        self._flush()
        np.save(self.tmp / "samples.npy", np.array(self.samples, dtype=np.int64).reshape(-1, 3))
        index = {"format": FORMAT, "version": VERSION, **self.meta, "samples": len(self.samples),
                 "tokens": int(sum(s[0] for s in self.samples)), "samples.npy": _describe_file(self.tmp / "samples.npy"),
                 "shards": self.shards}  # fmt: skip
        write_file(self.tmp / "index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
        if self.out.exists():
            self.out.rmdir()  # empty, checked at the start
        os.replace(self.tmp, self.out)
        return index


def _describe_file(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


class Store:
    """A prepared store opened for random access: ``len``, ``lengths``, ``text(i)``, ``media(i)``, ``where(i)``.
    Shards are mapped on first use (and, for a store in an object store, fetched first); thread-safe."""

    def __init__(self, root: Path, index: dict, fetch: Callable[[str, Path, dict], None] | None = None):
        self.root, self.index, self._fetch = root, index, fetch
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{root}: not a qwen2vl store of version {VERSION} (format {index.get('format')!r}, "
                            f"version {index.get('version')!r})")  # fmt: skip
        self._get("samples.npy", index["samples.npy"])
        self.samples = np.load(root / "samples.npy", mmap_mode="r")
        if self.samples.shape != (index["samples"], 3):
            raise DataError(f"{root}/samples.npy: shape {self.samples.shape}, the index says {index['samples']} rows")
        self.starts = np.cumsum([0] + [s["samples"] for s in index["shards"]])
        self._shards: dict[int, tuple] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, location: str | Path, *, read: Callable[[str], bytes] | None = None,
             cache: str | Path | None = None) -> Store:  # fmt: skip
        """A local store directory, or an object-store URI whose files ``read(uri)`` fetches into ``cache``."""
        if not is_uri(location):
            root = Path(str(location).removeprefix("file://"))
            try:
                index = json.loads((root / "index.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{root}: not a prepared store ({e})") from None
            return cls(root, index)
        if read is None or cache is None:
            raise ValueError("a store in an object store needs a reader and a local cache directory")
        base = str(location).rstrip("/")
        try:
            raw = read(f"{base}/index.json")
            index = json.loads(raw)
        except (MediaError, json.JSONDecodeError) as e:
            raise DataError(f"{base}: cannot read the store's index.json ({e})") from None
        root = Path(cache) / hashlib.sha256(raw).hexdigest()[:16]  # one directory per store version
        root.mkdir(parents=True, exist_ok=True)

        def fetch(name: str, path: Path, expected: dict) -> None:
            data = read(f"{base}/{name}")
            if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
                raise DataError(f"{base}/{name}: {len(data)} bytes that do not match the index (changed or torn)")
            write_file(path, lambda tmp: tmp.write_bytes(data), durable=False)

        return cls(root, index, fetch)

    def _get(self, name: str, expected: dict) -> Path:
        path = self.root / name
        if self._fetch is not None and not (path.exists() and path.stat().st_size == expected["bytes"]):
            self._fetch(name, path, expected)
        if not path.exists() or path.stat().st_size != expected["bytes"]:
            raise DataError(f"{path}: missing or not the size the index says ({expected['bytes']} bytes)")
        return path

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> np.ndarray:
        return self.samples[:, 0]

    def _shard(self, i: int) -> tuple[int, tuple]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        with self._lock:
            if k not in self._shards:
                info = self.index["shards"][k]
                paths = {s: self._get(f"{info['name']}.{s}", info["files"][s]) for s in SHARD_FILES}
                self._shards[k] = (
                    np.load(paths["tokens.npy"], mmap_mode="r"), np.load(paths["turns.npy"], mmap_mode="r"),
                    np.load(paths["offsets.npy"], mmap_mode="r"), np.memmap(paths["media.bin"], np.uint8, "r")
                    if info["files"]["media.bin"]["bytes"] else np.zeros(0, np.uint8),
                )  # fmt: skip
        return i - int(self.starts[k]), self._shards[k]

    def text(self, i: int) -> Text:
        j, (tokens, turns, offsets, _) = self._shard(i)
        a, b = int(offsets[j, 0]), int(offsets[j, 1])
        return Text(tokens[a:b].astype(np.int64), turns[a:b].astype(np.int64))

    def record(self, i: int) -> dict:
        """{"where": "file:line", "media": [[kind, content part, tokens], ...]}"""
        j, (_, _, offsets, media) = self._shard(i)
        return json.loads(media[int(offsets[j, 2]) : int(offsets[j, 3])].tobytes())


def upload(store: str | Path, dest: str, remote) -> int:
    """Copy a store directory to ``dest`` through ``remote`` (a ``Remote``), index.json last: until it lands, the
    destination is not a store. The number of files copied."""
    root = Path(store)
    if not (root / "index.json").is_file():
        raise DataError(f"{root}: not a prepared store (no index.json)")
    names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != "index.json") + ["index.json"]
    for name in names:
        remote.put(root / name, f"{dest.rstrip('/')}/{name}")
    return len(names)


def _bounded_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` in order on ``workers`` threads, with at most a few items per worker in flight."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * max(1, workers):
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def prepare(inputs: list[str], out: str | Path, processor: Processor, model: str | Path, *, media: dict | None = None,
            workers: int = 8, shard_tokens: int = SHARD_TOKENS, log=lambda msg: None) -> dict:  # fmt: skip
    """JSONL records -> a store at ``out``: each sample tokenised and its media's tokens counted from their headers
    (concurrently, ``workers`` at a time); a bad record or an unreadable medium fails it, naming its line."""
    media = dict(media or {})
    meta = {"tokenizer": tokenizer_hash(model), "media_settings": media_identity(processor, media),
            "sources": [str(p) for p in inputs]}  # fmt: skip
    writer = StoreWriter(out, meta, shard_tokens)

    def records() -> Iterator[tuple[str, dict, Path]]:
        for path in inputs:
            root = Path(path).resolve().parent
            for line, record in read_jsonl(path):
                yield f"{path}:{line}", record, root

    def one(item: tuple[str, dict, Path]):
        where, record, root = item
        messages, kind = to_messages(record, where, root)
        text = tokenize(messages, kind, processor)
        counted, numbers = [], {k: [] for k in KINDS}
        try:
            for k, part in media_parts(messages):
                name = f"{where} {k} {len(numbers[k]) + 1}"
                numbers[k].append(media_tokens(processor.media, k, part, name, media))
                counted.append([k, dict(part), numbers[k][-1]])
        except MediaError as e:
            raise DataError(str(e)) from None
        length = int(with_media(text, numbers, processor, where).sum())
        if not (text.turns >= 0).any():
            raise DataError(f"{where}: nothing to learn from (no supervised token)")
        return text, counted, where, length

    try:
        for n, sample in enumerate(_bounded_map(one, records(), workers), 1):
            writer.add(*sample)
            if n % 10000 == 0:
                log(f"{n} samples")
        index = writer.close()
    except BaseException:
        shutil.rmtree(writer.tmp, ignore_errors=True)
        raise
    return index
