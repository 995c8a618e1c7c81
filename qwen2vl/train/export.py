"""A training checkpoint -> a complete model directory in the hub layout, written atomically: the checkpoint's
weights and config plus the tokenizer, preprocessor and chat template of the model the run started from. With
``dtype`` the weights are stored in that type (bfloat16 halves a model that ships in the repository)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..atomic import new_directory
from ..weights import resolve_dtype
from .checkpoint import latest_checkpoint, load_state

PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "chat_template.json", "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt",
)
MODEL_FILES = ("config.json", "generation_config.json")


def export(checkpoint: str | Path, dest: str | Path, base: str | Path | None = None, dtype: str | None = None
           ) -> Path:  # fmt: skip
    checkpoint, dest = Path(checkpoint), Path(dest)
    dtype = resolve_dtype(dtype)  # a ValueError naming the known ones
    if not (checkpoint / "trainer_state.json").is_file():  # OUT itself: its latest checkpoint
        if (latest := latest_checkpoint(checkpoint)) is None:
            raise ValueError(f"{checkpoint}: neither a checkpoint nor a training output with one")
        checkpoint = latest
    base = Path(base or load_state(checkpoint)["config"]["model"])
    if not (base / "tokenizer.json").is_file():
        raise ValueError(f"{base}: no tokenizer.json to ship with the model (give --base)")
    if dest.exists():
        raise ValueError(f"{dest} exists; export writes a new directory")
    with new_directory(dest) as tmp:
        if dtype is None:
            for f in checkpoint.iterdir():
                if f.name in MODEL_FILES or f.name.startswith("model") and f.suffix in (".safetensors", ".json"):
                    shutil.copy2(f, tmp / f.name)
        else:
            from ..pretrained import Qwen2VL

            Qwen2VL.from_pretrained(checkpoint, dtype=dtype).save_pretrained(tmp)
        for name in PROCESSOR_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
    return dest
