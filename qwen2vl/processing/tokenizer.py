"""The Qwen2 byte-level BPE tokenizer (REFERENCE §1.3) through the ``tokenizers`` library, and incremental
decoding for streaming.

``decode`` drops the control tokens (``<|im_end|>``, vision placeholders, ...) but by default keeps the grounding
markup (``<|object_ref_start|>``, ``<|box_start|>``, ...), which is part of the answer: without it a box is just
"(12,34),(56,78)" in the text. ``keep_grounding=False`` gives transformers' ``skip_special_tokens=True`` output.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
GROUNDING_TOKENS = SPECIAL_TOKENS[3:9]
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def qwen2_pipeline(tok: _HFTokenizer) -> None:
    """Give a byte-level BPE Qwen2's normaliser (NFC), pre-tokenizer (its split regex, digits one by one), decoder."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Text <-> token ids. Special tokens written in the text are recognised as such (as in transformers,
    ``split_special_tokens=False``), so rendered chat templates tokenize to their control tokens."""

    def __init__(self, tokenizer: _HFTokenizer, *, eos_token: str = "<|im_end|>", pad_token: str = "<|endoftext|>"):
        self._tok = tokenizer
        self.eos_token, self.pad_token = eos_token, pad_token
        if missing := [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]:
            raise TokenizerError(f"the tokenizer lacks the Qwen2-VL special tokens {missing}")
        special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.grounding_ids = frozenset(self.token_id(t) for t in GROUNDING_TOKENS)
        self.control_ids = frozenset(special - self.grounding_ids)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> Tokenizer:
        try:
            return cls(_HFTokenizer.from_file(str(path)), **kwargs)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """From a checkpoint directory: ``tokenizer.json``, with eos/pad from ``tokenizer_config.json``."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path}: no tokenizer.json")
        kwargs = {}
        config = path / "tokenizer_config.json"
        if config.is_file():
            cfg = json.loads(config.read_text())
            for key in ("eos_token", "pad_token"):
                value = cfg.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    kwargs[key] = value
        return cls.from_file(path / "tokenizer.json", **kwargs)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.pad_token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in ``text``."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, *, skip_special_tokens: bool = True, keep_grounding: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            drop = self.control_ids if keep_grounding else self.control_ids | self.grounding_ids
            ids = [i for i in ids if i not in drop]
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)


class IncrementalDecoder:
    """Token ids in, text pieces out, never half a UTF-8 character: a byte-level BPE token can end inside a
    multi-byte character, which decodes to U+FFFD until the next token completes it. Only a window of recent
    tokens is decoded at each step, so the cost per token stays constant."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True, keep_grounding: bool = True):
        self.tokenizer = tokenizer
        self.options = dict(skip_special_tokens=skip_special_tokens, keep_grounding=keep_grounding)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded already (context for the next piece)
        self.read = 0

    def _texts(self) -> tuple[str, ...]:  # the text of ids[prefix:read] and of ids[prefix:]
        return tuple(self.tokenizer.decode(self.ids[self.prefix : end], **self.options) for end in (self.read, None))

    def push(self, token_id: int) -> str:
        """The new text that ``token_id`` completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        before, after = self._texts()
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        before, after = self._texts()
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class TextStream:
    """The one token loop from ids to answer text (the assistant's and each server sequence's): incremental
    decoding, the end at an eos id, and stop strings. Text that could start a stop string is held back until it is
    known not to; once a stop string or an eos id appears, ``stopped`` is set and nothing after it is returned."""

    def __init__(self, tokenizer: Tokenizer, stop: str | list[str] | tuple[str, ...] | None = None,
                 eos_ids: frozenset[int] | set[int] = frozenset()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self.eos_ids = eos_ids
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of it returned
        self.stopped = False

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if hits := [i for s in self.stops if (i := self.text.find(s, max(0, self.sent - len(s)))) >= 0]:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self.text) if final else len(self.text) - _stop_prefix(self.text, self.stops)
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def push(self, token_id: int) -> str:
        """The text ``token_id`` releases; an eos id ends the answer with what is still held back."""
        if token_id in self.eos_ids:
            piece = self.finish()
            self.stopped = True
            return piece
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)


def _stop_prefix(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held
