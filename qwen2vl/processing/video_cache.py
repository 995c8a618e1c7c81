"""Decoded clips kept on disk, so that a video read again (by the next stage of a curriculum, another epoch's
process, another run on the same data) is decoded once.

Decoding is most of what loading a short clip costs; reading its kept frames back is about a hundred times
cheaper.

An entry is the sampled, resized frames (uint8) and what ``Video`` says about them, stored under a key made of
the file's resolved path, size and modification time and every sampling and sizing option: a file that changes,
or a load with other options, never meets an old entry. Only local files are cached (a URL or bytes are not).
Entries are written atomically (``atomic.write_file``) but not fsynced: losing one costs a decode, not data. One
that cannot be read back whole (the zip's CRC, a torn write, a foreign file) is treated as absent and written
again.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import write_file

if TYPE_CHECKING:
    from .video import Video

FORMAT = 1  # part of every key: a change to what an entry holds leaves the old entries unread


class VideoCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def key(self, path: Path, settings: dict[str, Any]) -> str:
        stat = path.stat()
        ident = [FORMAT, str(path.resolve()), stat.st_size, stat.st_mtime_ns, sorted(settings.items())]
        return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str):
        """The cached ``Video`` for ``key``, or None."""
        from .video import Video

        try:
            with np.load(self._path(key), allow_pickle=False) as entry:
                meta = json.loads(str(entry["meta"]))
                frames = entry["frames"]
            return Video(frames, meta["indices"], meta["sample_fps"], meta["source_fps"], meta["total_frames"],
                         tuple(meta["original_size"]))  # fmt: skip
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent, torn or not ours
            return None

    def put(self, key: str, video) -> None:
        meta = {"indices": [int(i) for i in video.indices], "sample_fps": float(video.sample_fps),
                "source_fps": float(video.source_fps), "total_frames": int(video.total_frames),
                "original_size": [int(s) for s in video.original_size]}  # fmt: skip
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                np.savez(f, frames=video.frames, meta=np.array(json.dumps(meta)))

        write_file(target, write, durable=False)

    def load(self, path: Path, settings: dict[str, Any], decode: Callable[[], Video]) -> Video:
        """The clip of ``path`` loaded with ``settings``: read back when cached, else ``decode()``d and kept."""
        key = self.key(path, settings)
        if (video := self.get(key)) is None:
            video = decode()
            self.put(key, video)
        return video
