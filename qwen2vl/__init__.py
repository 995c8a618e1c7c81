"""qwen2vl: a readable, fast, weight-compatible implementation of Qwen2-VL in plain PyTorch.

The names below load on first use, so that ``import qwen2vl`` (and ``qwen2vl --help``) costs nothing until a
model, a processor or a config is asked for."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Assistant": "assistant", "load": "assistant", "Qwen2VL": "pretrained", "MediaError": "processing",
    "Processor": "processing", "CheckpointError": "weights", "PlaceholderError": "positions",
    "mrope_positions": "positions",
    **{name: "config" for name in ("ConfigError", "Qwen2VLConfig", "TextConfig", "VisionConfig", "qwen2vl_2b",
                                   "qwen2vl_7b", "qwen2vl_72b", "tiny")},
}  # fmt: skip
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:  # a submodule (qwen2vl.processing, ...) or nothing
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
