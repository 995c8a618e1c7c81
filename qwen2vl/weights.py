"""Checkpoint loading and saving: strict, lazy, built on the meta device (REFERENCE §8).

Our parameter names are the hub names (``visual.*``, ``model.*``, ``lm_head.weight``); ``LAYOUT`` maps the layout
transformers >= 4.52 writes (``model.visual.*``, ``model.language_model.*``) to them, and read backwards the
other way, so the two directions cannot drift.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import write_file, write_text
from .config import ConfigError, Qwen2VLConfig

if TYPE_CHECKING:
    from .model.qwen2vl import Qwen2VLModel

M = TypeVar("M", bound="Qwen2VLModel")
log = logging.getLogger(__name__)

# transformers >= 4.52 prefix -> hub prefix (ours). Order matters: most specific first.
LAYOUT: tuple[tuple[str, str], ...] = (
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPES |= {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold a loadable Qwen2-VL model; the message names why."""


def to_hub_name(name: str) -> str:
    return next((hub + name[len(new) :] for new, hub in LAYOUT if name.startswith(new)), name)


def from_hub_name(name: str) -> str:
    """Hub name -> transformers >= 4.52 name (``lm_head`` is the same in both)."""
    return next((new + name[len(hub) :] for new, hub in LAYOUT if name.startswith(hub)), name)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map of tensor name (as stored) -> safetensors file: one file, or shards listed in an index."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"shard {shard.name} listed in {index.name} is missing from {path}")
        return files
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_pretrained(
    cls: type[M],
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    hf5_compat: bool = False,
) -> M:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        config = Qwen2VLConfig.from_pretrained(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    dtype = resolve_dtype(dtype)
    device = torch.device(device or "cpu")
    if dtype == torch.float16:
        log.warning("Qwen2-VL was trained in bf16; fp16 can overflow (REFERENCE §9.6). Prefer bfloat16.")

    files = checkpoint_files(path)
    with torch.device("meta"):
        model = cls(config, hf5_compat=hf5_compat)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    names = {stored: to_hub_name(stored) for stored in files}
    if twice := sorted(name for name, count in Counter(names.values()).items() if count > 1):
        raise CheckpointError(f"tensor(s) {_few(twice)} appear twice in {path} (both layouts mixed?)")
    if unexpected := sorted(stored for stored, name in names.items() if name not in expected):
        raise CheckpointError(f"unexpected tensor(s) in {path}: {_few(unexpected)}")
    tied = config.tie_word_embeddings  # a tied head need not be stored; where it is, it must equal the embedding
    if missing := sorted(set(expected) - set(names.values()) - ({"lm_head.weight"} if tied else set())):
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s): {_few(missing)}")

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}  # each file opened once, in the order first listed
    for stored, file in files.items():
        by_file.setdefault(file, []).append(stored)
    for file, stored_names in by_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for stored in stored_names:
                    t = f.get_tensor(stored)
                    need = expected[names[stored]]
                    if tuple(t.shape) != need:
                        raise CheckpointError(f"tensor {stored} has shape {tuple(t.shape)} but the config needs {need}")
                    dtype = dtype or t.dtype
                    state[names[stored]] = t.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if tied:
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state["model.embed_tokens.weight"]):
            raise CheckpointError("config ties lm_head to embed_tokens but the checkpoint's lm_head.weight differs")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True made two Parameters of one tensor: make them one
    return model.eval()


def save_pretrained(model: Qwen2VLModel, path: str | Path, max_shard_size: int = 5 * 2**30) -> None:
    """Hub layout: config.json (flat form), generation_config.json, model.safetensors or shards with an index.
    Each file is written atomically (atomic.py), the index and config last, so a crash mid-save never leaves a
    directory that looks complete but is not."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0  # bytes in the last shard
    for name in sorted(state):
        if shards[-1] and size + state[name].nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += state[name].nbytes
    n = len(shards)
    fnames = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for fname, shard in zip(fnames, shards):
        write_file(path / fname, lambda tmp, s=shard: save_file(s, str(tmp), metadata={"format": "pt"}))
    if n == 1:
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        weight_map = {name: fname for fname, shard in zip(fnames, shards) for name in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
        write_text(path / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        (path / "model.safetensors").unlink(missing_ok=True)
    dtype_name = str(model.dtype).removeprefix("torch.")
    write_text(path / "generation_config.json", json.dumps(model.config.generation_dict(), indent=2) + "\n")
    write_text(path / "config.json", json.dumps({**model.config.to_dict(), "torch_dtype": dtype_name}, indent=2) + "\n")


def _few(names: list[str], n: int = 5) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
