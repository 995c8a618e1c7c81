"""qwen2vl: a readable, fast, weight-compatible implementation of Qwen2-VL in plain PyTorch."""

from .assistant import Assistant, load
from .config import ConfigError, Qwen2VLConfig, TextConfig, VisionConfig, qwen2vl_2b, qwen2vl_7b, qwen2vl_72b, tiny
from .pretrained import Qwen2VL
from .positions import PlaceholderError, mrope_positions
from .processing import MediaError, Processor
from .weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "Assistant",
    "MediaError",
    "Processor",
    "load",
    "CheckpointError",
    "ConfigError",
    "PlaceholderError",
    "Qwen2VL",
    "Qwen2VLConfig",
    "TextConfig",
    "VisionConfig",
    "mrope_positions",
    "qwen2vl_2b",
    "qwen2vl_72b",
    "qwen2vl_7b",
    "tiny",
]
