"""From messages to model inputs: images, video, tokenizer, chat template, the processor (REFERENCE §4-7)."""

from .errors import MediaError
from .processor import BatchInputs, MediaInfo, Processor
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["BatchInputs", "IncrementalDecoder", "MediaError", "MediaInfo", "Processor", "Tokenizer"]
