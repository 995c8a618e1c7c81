"""Where the training loop's samples come from, and how they arrive in time.

Two sources, one interface (``lengths``, ``weight(i)``, ``get(i)``): a JSONL file encoded whole at the start (small
runs, many epochs: decoding once pays), or a prepared store (``store.py``), whose text is mapped and whose media are
fetched and decoded only for the rows this process trains on. For a store, ``Prefetcher`` loads the samples of the
next steps on a pool of threads while the current step computes (the paper: media fetched concurrently while
training). A sample whose media cannot be had after the fetcher's retries is not lost silently: it comes back as
``Skipped`` with its reason, which the loop counts, logs and fails the run on past a threshold.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..processing.errors import MediaError
from ..processing.fetch import FetchPolicy
from ..processing.processor import Processor
from ..processing.remote import Remote, RemotePolicy
from ..processing.sources import MediaAccess
from ..records import DataError
from .data import KINDS, Sample, assemble
from .store import Store


@dataclass
class Skipped:
    index: int
    where: str
    reason: str


class MemorySamples:
    """Samples encoded in advance."""

    def __init__(self, samples: list[Sample]):
        self.items = samples
        self.lengths = [len(s) for s in samples]

    def weight(self, i: int) -> float:
        return self.items[i].weight

    def where(self, i: int) -> str:
        return f"sample {i}"

    def get(self, i: int) -> Sample:
        return self.items[i]


class StoreSamples:
    """The samples of a store that fit a row (the others counted and reported, as for JSONL), built on demand:
    stored ids, then the media loaded and expanded exactly as ``data.encode`` does."""

    def __init__(self, store: Store, processor: Processor, media: dict, *, turn_weights: bool, batch_tokens: int,
                 max_overlong: float, log=lambda msg: None):  # fmt: skip
        self.store, self.processor, self.media, self.turn_weights = store, processor, media, turn_weights
        lengths = np.asarray(store.lengths)
        self.keep = np.flatnonzero(lengths <= batch_tokens)
        overlong = len(store) - len(self.keep)
        if not len(store):
            raise DataError(f"{store.root}: the store holds no samples")
        if overlong:
            log(f"{overlong} of {len(store)} samples are longer than batch_tokens={batch_tokens} and are left out")
            if overlong / len(store) > max_overlong:
                raise DataError(f"{overlong} of {len(store)} samples exceed batch_tokens={batch_tokens} "
                                f"(more than max_overlong={max_overlong:.0%}); raise batch_tokens")  # fmt: skip
        self.lengths = lengths[self.keep].tolist()

    def weight(self, i: int) -> float:
        _, supervised, replies = self.store.samples[self.keep[i]]
        return float(replies if self.turn_weights else supervised)

    def where(self, i: int) -> str:
        return self.store.record(int(self.keep[i]))["where"]

    def get(self, i: int) -> Sample:
        j = int(self.keep[i])
        text, record = self.store.text(j), self.store.record(j)
        where, loaded = record["where"], {k: [] for k in KINDS}
        try:
            for kind, part, tokens in record["media"]:
                name = f"{where} {kind} {len(loaded[kind]) + 1}"
                info, values = self.processor.media.load(kind, part, name, self.media, levels=True)
                if info.tokens != tokens:
                    raise MediaError(f"{name}: {info.tokens} tokens now, {tokens} when the store was prepared "
                                     "(the file changed, or decodes to fewer frames than its header says)")  # fmt: skip
                loaded[kind].append((info, values))
        except MediaError as e:
            raise DataError(str(e)) from None
        return assemble(text, loaded, self.processor, where, levels=True, turn_weights=self.turn_weights)


def media_access(*, workers: int = 8, qps: float | None = None, retries: int = 5, timeout: float = 30.0,
                 allow_private: bool = False, storage_options: dict | None = None,
                 max_bytes: int = 2**31) -> MediaAccess:  # fmt: skip
    """What training and ``data prepare`` may read: local files anywhere (the user's own data), URLs and object
    stores with limits, retries, and caps on requests in flight and per second; media up to ``max_bytes`` each
    (2 GiB: long videos; the library's default for one chat is 64 MiB)."""
    policy = RemotePolicy(concurrency=max(1, workers), qps=qps, retries=retries, timeout=timeout,
                          storage_options=storage_options or {})  # fmt: skip
    fetch = FetchPolicy(timeout=timeout, max_bytes=max_bytes, allow_private=allow_private)
    return MediaAccess(fetch=fetch, remote=Remote(policy), max_bytes=max_bytes)


class Prefetcher:
    """Steps in order, each with its samples loaded: up to ``ahead`` steps are being loaded on ``workers`` threads
    while the caller computes (0 workers: each sample loaded when its step comes, in the caller's thread)."""

    def __init__(self, data, workers: int, ahead: int = 2):
        self.data, self.workers, self.ahead = data, workers, max(1, ahead)

    def _load(self, i: int) -> Sample | Skipped:
        try:
            return self.data.get(i)
        except DataError as e:  # media that could not be fetched or decoded; a bug still raises
            return Skipped(i, self.data.where(i), str(e))

    @staticmethod
    def _ready(item: tuple[object, dict[int, Future]]) -> tuple[object, dict]:
        step, futures = item
        return step, {i: f.result() for i, f in futures.items()}

    def steps(self, steps: Iterator, mine: Callable[[object], list[int]]) -> Iterator[tuple[object, dict]]:
        """(step, {sample index: Sample | Skipped}) for each of ``steps``; ``mine(step)``: the samples to load."""
        if not self.workers:
            for step in steps:
                yield step, {i: self._load(i) for i in mine(step)}
            return
        pending: deque[tuple[object, dict[int, Future]]] = deque()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="qwen2vl-fetch") as pool:
            try:
                for step in steps:
                    pending.append((step, {i: pool.submit(self._load, i) for i in mine(step)}))
                    if len(pending) > self.ahead:
                        yield self._ready(pending.popleft())
                while pending:
                    yield self._ready(pending.popleft())
            finally:  # the caller stopped (the run ended or failed): drop what was loading ahead
                for _, futures in pending:
                    for f in futures.values():
                        f.cancel()
