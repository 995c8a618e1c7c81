"""Decoded clips kept on disk, so that a video read again (the next curriculum stage, another epoch's process,
another run on the same data) is decoded once: reading kept frames back is about a hundred times cheaper.

An entry holds the sampled, resized uint8 frames and the rest of ``Video``, under a key made of the file's resolved
path, size and modification time and every sampling and sizing option: a changed file, or other options, never
meets an old entry. Only local files are cached. Entries are written atomically but not fsynced (losing one costs
a decode); one that cannot be read back whole (torn, foreign) is treated as absent and written again.
"""

from __future__ import annotations

import dataclasses
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

    def load(self, path: Path, settings: dict[str, Any], decode: Callable[[], Video]) -> Video:
        """The clip of ``path`` loaded with ``settings``: read back when cached, else ``decode()``d and kept."""
        from .video import Video

        stat = path.stat()
        ident = [FORMAT, str(path.resolve()), stat.st_size, stat.st_mtime_ns, sorted(settings.items())]
        key = hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()
        entry = self.directory / key[:2] / f"{key}.npz"
        try:
            with np.load(entry, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                return Video(stored["frames"], **{**meta, "original_size": tuple(meta["original_size"])})
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):  # absent, torn or not ours
            pass
        video = decode()
        meta = {f.name: getattr(video, f.name) for f in dataclasses.fields(video) if f.name != "frames"}
        entry.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                np.savez(f, frames=video.frames, meta=np.array(json.dumps(meta)))

        write_file(entry, write, durable=False)
        return video
