"""File modes for what is written atomically.

Every output that must never be seen half-written (weights, checkpoints, exported models, reports, pictures) is
first written to a temporary file or directory beside it and then renamed into place. ``tempfile`` creates those
private (0600 files, 0700 directories), and the rename would keep that: a model exported for a server run by
another user, or a report in a shared directory, would be unreadable to everyone else. ``as_created`` gives the
temporary the mode an ordinary ``open`` or ``mkdir`` would have given it under the process's umask, before the
rename, so the atomic path and the plain one leave the same modes.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it: ``os.umask`` can only be read by setting it, which for a
    moment applies to every thread. Linux reports it in /proc; elsewhere it is set to 0o077 for that moment, so a
    file another thread creates then is more private than asked, never less."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def as_created(path: str | os.PathLike) -> None:
    """Give ``path`` (a file or a directory from ``tempfile``) the mode ``open``/``mkdir`` would have."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~umask())


__all__ = ["as_created", "umask"]
