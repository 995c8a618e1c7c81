"""Writing outputs so that nobody ever sees one half-written: weights, checkpoints, exported models, reports and
pictures go into a temporary beside the target, are fsynced, given the mode a plain ``open``/``mkdir`` would give
them (``tempfile`` makes 0600 files and 0700 directories, which another user, a server's say, could not read),
renamed into place, and the parent directory synced so that the rename survives a power cut. A crash or an
exception (KeyboardInterrupt included) leaves the previous output as it was and no temporary behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it: ``os.umask`` can only be read by setting it, which for a
    moment applies to every thread. Linux reports it in /proc; elsewhere it is set to 0o077 for that moment, so a
    file another thread creates then is more private than asked, never less."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o077)
    os.umask(old)
    return old


def as_created(path: str | os.PathLike) -> None:
    """Give ``path`` (from ``tempfile``) the mode ``open``/``mkdir`` would have given it under the umask."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~umask())


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's content, or a directory's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(target: str | os.PathLike, write: Callable[[Path], object], durable: bool = True) -> Path:
    """``write(tmp)`` writes the content to the path it is given; that file then replaces ``target`` atomically.
    ``durable=False`` skips the fsyncs: still all or nothing, but a crash of the machine may lose the new file
    (for caches, where a lost entry costs a recomputation, not data)."""
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if durable:
            fsync(tmp)
        as_created(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync(target.parent)
    return target


def write_text(target: str | os.PathLike, text: str) -> Path:
    """``text`` exactly as given (UTF-8), no newline added."""
    return write_file(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def new_directory(dest: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """An empty temporary directory beside ``dest`` to fill; when the block ends without an exception it becomes
    ``dest``. An existing ``dest`` is an error (``FileExistsError``, before anything is written) unless
    ``replace``, which removes it just before the rename. On an exception the temporary is removed."""
    dest = Path(dest)
    if dest.exists() and not replace:
        raise FileExistsError(f"{dest} exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        yield tmp
        for f in [*tmp.rglob("*"), tmp]:  # what the block wrote with a plain open is synced here
            fsync(f)
        as_created(tmp)
        if replace and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(dest.parent)
