"""Checkpoints that survive a crash: ``OUT/checkpoint-<step>/`` holds the model in the hub layout (loadable by
``Qwen2VL.from_pretrained`` and transformers), the optimizer, and the trainer state (step, data position, RNG).
Everything is written into a temporary directory, fsynced, and renamed into place; ``OUT/latest`` (the name of
the newest complete checkpoint) is replaced atomically last. A run killed at any moment leaves the previous
checkpoint intact and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..modes import as_created


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    as_created(f.name)
    os.replace(f.name, path)
    _fsync_dir(path.parent)


def save_checkpoint(out: Path, step: int, model, optimizer_state: dict, state: dict, keep: int = 2) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".checkpoint-{step}."))
    try:
        model.save_pretrained(tmp)
        with open(tmp / "optimizer.pt", "wb") as f:
            torch.save(optimizer_state, f)
            f.flush()
            os.fsync(f.fileno())
        _write_atomic(tmp / "trainer_state.json", json.dumps(state, indent=1).encode())
        _fsync_dir(tmp)
        as_created(tmp)
        if final.exists():  # a leftover from a run that died after this rename but before `latest`
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(out / "latest", final.name.encode())
    for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    path = out / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def load_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())
