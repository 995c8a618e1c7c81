"""Decoded clips kept on disk, shared by training and serving. Decoding long videos was the paper's bottleneck
(REFERENCE §5: up to 768 frames sampled from a file that may hold tens of thousands); reading the kept uint8 frames
back is about a hundred times cheaper, so a video seen again (the next curriculum stage, another epoch, another
process or run, a client posting the same clip) is decoded once.

The key is the sha256 of the video's bytes (a local file streamed in chunks, or the bytes fetched from a URL or an
object store) with every sampling and sizing setting and ``FORMAT``: the same video under another name or URL
meets its entry, a changed file or other settings never meet an old one. An entry holds one uint8 array and a
JSON description with its own key (so that a file that is not ours is never taken for one): ``load`` keeps a
``Video``'s frames, ``patches`` (what ``MediaLoader`` uses) the frames already cut into patches, so that a hit
costs a read of the file to hash it and a read of the entry, nothing more.

Many processes may share a directory (training ranks, dataloader workers, server threads):
- entries are written to a temporary and renamed into place (``atomic.write_file``, not fsynced: losing one costs
  a decode), so a reader sees a whole entry or none; one that cannot be read back whole is a miss, written again;
- with ``max_bytes``, each write is followed by evicting the least recently used entries (a hit refreshes an
  entry's mtime) until the directory's entries fit. Eviction by several processes at once may delete a little more
  than needed, never fails on an entry that vanished under it, and a reader that loses the race has a miss;
- failing to write or evict (a full disk, a read-only directory) is logged; the decoded video is still returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import write_file

if TYPE_CHECKING:
    from .video import Video

log = logging.getLogger(__name__)

MAGIC = b"qwen2vl clip\n"
FORMAT = 3  # part of every key: a change to what an entry holds, or to the key, leaves the old entries unread
STALE_TEMP_SECONDS = 3600  # a temporary this old is left by a crashed writer, not a write in progress
_CHUNK = 1 << 20


def parse_size(text: str | int) -> int:
    """Bytes from ``"2G"``, ``"512MiB"``, ``"1.5T"`` or ``"1000000"``: K, M, G, T are powers of 1024."""
    if isinstance(text, int):
        number, unit = Decimal(text), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:i?B)?|B)?\s*", str(text), re.IGNORECASE)
        if match is None:
            raise ValueError(f"not a size: {text!r} (expected bytes, or a number with K, M, G or T, e.g. 10G)")
        number, unit = Decimal(match[1]), (match[2] or "").upper()
    size = number * 1024 ** ("KMGT".index(unit) + 1 if unit else 0)
    if size < 0 or size != int(size):
        raise ValueError(f"not a size: {text!r} (a whole, non-negative number of bytes)")
    return int(size)


def content_digest(data: Path | bytes) -> str:
    """sha256 of a file's bytes (read in chunks, never whole) or of the bytes given."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(data).hexdigest()


class VideoCache:
    """A directory of decoded clips; ``max_bytes`` bounds it (None: unbounded). Holds no state beyond the two, so
    one object may serve many threads."""

    def __init__(self, directory: str | Path, max_bytes: int | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be non-negative, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def key(self, data: Path | bytes, settings: dict[str, Any]) -> str:
        ident = [FORMAT, content_digest(data), sorted(settings.items())]
        return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.clip"  # 256 subdirectories: no huge directory to list

    def load(self, data: Path | bytes, settings: dict[str, Any], decode: Callable[[], Video]) -> Video:
        """The clip of ``data`` (a local file, or a video file's bytes) with ``settings``: read back when cached,
        else ``decode()``d and kept."""
        key = self.key(data, settings)
        entry = self.path(key)
        video = _read(entry, key)
        if video is not None:
            _touch(entry)
            return video
        video = decode()
        meta = {f.name: getattr(video, f.name) for f in dataclasses.fields(video) if f.name != "frames"}
        self._keep(entry, key, video.frames, meta)
        return video

    def patches(self, data: Path | bytes, settings: dict[str, Any],
                compute: Callable[[], tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:  # fmt: skip
        """A clip's uint8 patch levels and what describes them (a JSON-able dict), as ``MediaLoader`` uses them:
        read back when kept, else ``compute()``d and kept. A hit neither decodes nor cuts frames into patches,
        which costs as much as reading them back (a transpose of every byte)."""
        key = self.key(data, {**settings, "entry": "patches"})
        entry = self.path(key)
        if (kept := _load_entry(entry, key)) is not None:
            _touch(entry)
            return kept
        levels, meta = compute()
        self._keep(entry, key, levels, meta)
        return levels, meta

    def _keep(self, entry: Path, key: str, array: np.ndarray, meta: dict) -> None:
        if self.max_bytes is not None and array.nbytes > self.max_bytes:
            log.debug("video cache: a %d-byte clip cannot fit in %d bytes; not kept", array.nbytes, self.max_bytes)
            return

        def write(tmp: Path) -> None:
            array_ = np.ascontiguousarray(array)
            header = json.dumps({**meta, "key": key, "crc32": zlib.crc32(memoryview(array_).cast("B"))}).encode()
            with open(tmp, "wb") as f:
                f.write(MAGIC + len(header).to_bytes(8, "little") + header)
                np.lib.format.write_array(f, array_, allow_pickle=False)

        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_file(entry, write, durable=False)
            if self.max_bytes is not None:
                self.evict(keep=entry.name)
        except OSError as e:
            log.warning("video cache %s: could not keep a clip (%s); it will be decoded again", self.directory, e)

    def entries(self) -> list[tuple[int, int, Path]]:
        """(mtime_ns, bytes, path) of each entry; temporaries of writes in progress are not entries, and those
        left by a crash (older than STALE_TEMP_SECONDS) are removed."""
        found = []
        stale = time.time() - STALE_TEMP_SECONDS
        try:
            subdirectories = [d for d in os.scandir(self.directory) if len(d.name) == 2 and d.is_dir()]
        except FileNotFoundError:
            return []
        for sub in subdirectories:
            try:
                files = list(os.scandir(sub.path))
            except FileNotFoundError:
                continue
            for f in files:
                try:
                    if f.name.startswith("."):  # write_file's temporaries: .<name>.<random>.tmp
                        if f.name.endswith(".tmp") and f.stat().st_mtime < stale:
                            os.unlink(f.path)
                    elif f.name.endswith(".clip"):
                        st = f.stat()
                        found.append((st.st_mtime_ns, st.st_size, Path(f.path)))
                except FileNotFoundError:  # removed by another process since the listing
                    continue
        return found

    def evict(self, keep: str | None = None) -> None:
        """Delete the least recently used entries until the entries fit ``max_bytes``; the entry named ``keep``
        (the one just written) goes last, and only if it alone is too big."""
        if self.max_bytes is None:
            return
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return
        order = sorted(e for e in entries if e[2].name != keep) + [e for e in entries if e[2].name == keep]
        for _, size, path in order:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)  # gone either way: another process may have evicted it first
            total -= size


def _load_entry(entry: Path, key: str) -> tuple[np.ndarray, dict] | None:
    """(the uint8 array, the description) kept in ``entry``, or None when it is absent, torn, or not the entry of
    ``key``. An entry is MAGIC, the description's length (8 bytes), the description (JSON, with the key), then the
    array in .npy format."""
    try:
        with open(entry, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            size = int.from_bytes(f.read(8), "little")
            if size > 2**24:
                return None
            meta = json.loads(f.read(size))
            if not isinstance(meta, dict) or meta.pop("key", None) != key:
                return None
            array = np.lib.format.read_array(f, allow_pickle=False)  # a short file fails to take its shape
            crc = meta.pop("crc32", None)
            if array.dtype != np.uint8 or f.read(1) or crc != zlib.crc32(memoryview(array).cast("B")):
                return None  # damaged in place: the checksum (a zip's, without its slow reader)
            return array, meta
    except (OSError, ValueError, TypeError, EOFError):  # vanished, torn or not ours
        return None


def _touch(entry: Path) -> None:
    try:
        os.utime(entry)  # recently used: evicted last
    except OSError:  # evicted since it was opened, or not ours to touch: the clip was read all the same
        pass


def _read(entry: Path, key: str) -> Video | None:
    """The Video kept in ``entry``, or None (see ``_load_entry``)."""
    from .video import Video

    kept = _load_entry(entry, key)
    if kept is None or kept[0].ndim != 4:
        return None
    frames, meta = kept
    try:
        return Video(frames, **{**meta, "original_size": tuple(meta["original_size"])})
    except (KeyError, TypeError):
        return None
