"""Where a model reference points: a local directory, or a Hugging Face hub id fetched with huggingface_hub
(optional) when online. Offline, a hub id fails at once with a message that says so."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


class ModelNotFound(ValueError):
    pass


def resolve_model(ref: str | Path) -> Path:
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFound(f"{ref}: not a directory (a model is a directory with config.json and safetensors)")
    if not HUB_ID.fullmatch(str(ref)):
        raise ModelNotFound(f"{ref}: no such directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFound(f"{ref}: no such directory; pip install huggingface_hub to fetch it from the hub") from None
    try:
        return Path(snapshot_download(str(ref), allow_patterns=PATTERNS))
    except Exception as e:  # offline, unknown repo, gated: the hub's own exception types vary by version
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ModelNotFound(f"{ref}: no such directory, and it could not be fetched from the Hugging Face hub "
                            f"(offline or unknown repository: {reason}); give a local directory") from None
