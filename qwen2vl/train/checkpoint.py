"""Checkpoints that survive a crash: ``OUT/checkpoint-<step>/`` holds the model in the hub layout (loadable by
``Qwen2VL.from_pretrained`` and transformers), the optimizer, and the trainer state (step, data position, RNG).
Each is written atomically (atomic.py), then ``OUT/latest`` names it: a run killed at any moment leaves
``latest`` pointing at a complete checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..atomic import new_directory, write_text


def save_checkpoint(out: Path, step: int, model, optimizer_state: dict, state: dict, keep: int = 2) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    # replace: a checkpoint of this step is a leftover from a run that died after its rename but before `latest`
    with new_directory(final, replace=True) as tmp:
        model.save_pretrained(tmp)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    write_text(out / "latest", final.name)
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
