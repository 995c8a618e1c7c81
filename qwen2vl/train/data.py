"""Training records -> samples: token ids, labels (what is supervised) and the media's patches.

Two record formats, one JSON object per line:
  - ``{"messages": [...]}``: the Qwen message format (content parts with ``image``/``video`` paths or URLs).
  - ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "... <image> ..."}], "images": [...],
    "videos": [...]}``: LLaVA/ShareGPT, with one ``<image>``/``<video>`` placeholder per listed file, in order.
Either may say ``"type": "pretrain"`` (stages 1-2: captions, interleaved image-text) or ``"chat"`` (stage 3,
the default when there is an assistant turn).

Labels (the paper: loss on text tokens only): in chat, the official ChatML template, only the assistant replies
and their ``<|im_end|>`` are supervised; in pretrain, the content parts in order with no template, then
``<|endoftext|>``, all text is. Vision tokens never are, nor a sample's first token (nothing in the sample predicts
it). Supervision is decided on the rendered text's characters and mapped to tokens by their offsets, so the ids
are exactly those inference produces.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..processing.chat import bodies, check_messages, media_parts, turns
from ..processing.errors import MediaError
from ..processing.processor import Processor, placeholder_repeats
from ..records import DataError, with_root

IGNORE = -100  # label of a token that is not supervised
KINDS = ("image", "video")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, IGNORE where not supervised
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    # set when the media are held as uint8 levels (``encode(..., levels=True)``): turns them into the patches
    normalise: Callable[[np.ndarray], np.ndarray] | None = None
    # [L] float32 loss weight of each token (0 where not supervised); None: 1 for every supervised token
    weights: torch.Tensor | None = None

    def patches(self, key: str) -> torch.Tensor | None:
        """The float32 patches of ``pixel_values`` or ``pixel_values_videos`` (None when there are none)."""
        values = getattr(self, key)
        if values is None or self.normalise is None:
            return values
        return torch.from_numpy(self.normalise(values.numpy()))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def supervised(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def weight(self) -> float:
        """What the sample adds to a window's loss normaliser: its supervised tokens, or the sum of its weights."""
        return float(self.supervised) if self.weights is None else float(self.weights.sum())


def to_messages(record: dict, where: str = "record", root: Path | None = None) -> tuple[list[dict], str]:
    """A record in either format -> (Qwen messages, "chat" | "pretrain"). Relative media paths are taken
    relative to ``root`` (the data file's directory)."""
    if "messages" in record:
        messages = record["messages"]
    elif "conversations" in record:
        messages = _from_sharegpt(record, where)
    else:
        raise DataError(f"{where}: expected a 'messages' or 'conversations' key")
    try:
        messages = check_messages(messages, where)
    except MediaError as e:
        raise DataError(str(e)) from None
    if root is not None:
        messages = with_root(messages, root)
    kind = record.get("type") or ("chat" if any(m["role"] == "assistant" for m in messages) else "pretrain")
    if kind not in ("chat", "pretrain"):
        raise DataError(f"{where}: type must be 'chat' or 'pretrain', got {kind!r}")
    if kind == "chat" and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: a chat record needs an assistant turn to learn from")
    return messages, kind


def _from_sharegpt(record: dict, where: str) -> list[dict]:
    media = {kind: list(record.get(f"{kind}s") or ([record[kind]] if kind in record else [])) for kind in KINDS}
    used = dict.fromkeys(KINDS, 0)
    messages = []
    for i, turn in enumerate(record["conversations"]):
        role = ROLES.get(turn.get("from") or turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise DataError(f"{where}.conversations[{i}]: needs 'from' (human/gpt/system) and a string 'value'")
        parts = []
        for piece in re.split(r"(<image>|<video>)", value):
            if piece in ("<image>", "<video>"):
                kind = piece[1:-1]
                if used[kind] >= len(media[kind]):
                    raise DataError(f"{where}: more <{kind}> placeholders than the {len(media[kind])} {kind}s listed")
                parts.append({"type": kind, kind: media[kind][used[kind]]})
                used[kind] += 1
            elif piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    for kind in KINDS:
        if used[kind] != len(media[kind]):
            raise DataError(f"{where}: {len(media[kind])} {kind}s listed but {used[kind]} <{kind}> placeholders")
    return messages


# In the ``qwen`` function-call format the results of a call sit inside the assistant's turn: ``...✿RESULT✿: what
# the tool returned\n✿RETURN✿: the reply``. The model writes the marker that stops it, the tool the rest.
_RESULT = re.compile(r"✿RESULT✿(.*?)(?:✿RETURN✿|$)", re.S)


def _own_text(body: str, start: int, end: int) -> list[tuple[int, int]]:
    """The spans of an assistant turn (``body`` at ``start``, its ``<|im_end|>`` up to ``end``) that the model
    wrote: all of it but function results; a turn that ends on a result has no reply, so no ``<|im_end|>``."""
    spans, at = [], start
    for m in _RESULT.finditer(body):
        spans.append((at, start + m.start(1)))
        at = start + m.end()
    if at == start + len(body) and at != start:  # ended on a result
        end = at
    spans.append((at, end))
    return [(a, b) for a, b in spans if b > a]


@dataclass
class Text:
    """A sample before its media are loaded: what ``data prepare`` stores. ``turns`` says which reply each token
    is supervised for (-1: not supervised); every image and video placeholder is still one token."""

    ids: np.ndarray  # [L] int64
    turns: np.ndarray  # [L] int64


def tokenize(messages: list[dict], kind: str, processor: Processor) -> Text:
    """The text part of a sample: ids exactly as inference tokenizes the rendered text, and what is supervised."""
    tok = processor.tokenizer
    if kind == "chat":
        text, spans = "", []
        for role, header, body in turns(messages):
            turn = header + body + "<|im_end|>\n"
            if role == "assistant":  # the reply and its <|im_end|>, not the header or the newline after
                start = len(text) + len(header)
                spans += _own_text(body, start, start + len(body) + len("<|im_end|>"))
            text += turn
    else:  # the content parts in order, no template, then <|endoftext|>
        text = "".join(bodies(messages)) + "<|endoftext|>"
        spans = [(0, len(text))]
    ids, offsets = tok.encode_with_offsets(text)
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    turn = np.full(len(ids), -1, dtype=np.int64)  # which span (reply) each token lies in; -1: none
    for k, (a, b) in enumerate(spans):
        turn[(starts >= a) & (starts < b)] = k
    vision = [tok.token_id(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")]
    ids_np = np.array(ids, dtype=np.int64)
    turn[np.isin(ids_np, vision)] = -1
    turn[:1] = -1  # nothing in the sample predicts its first token
    return Text(ids_np, turn)


def placeholders(processor: Processor) -> dict[str, int]:
    return {"image": processor.image_token_id, "video": processor.video_token_id}


def with_media(text: Text, tokens: dict[str, list[int]], processor: Processor, where: str = "record") -> np.ndarray:
    """How many times each token of ``text`` repeats once each placeholder is expanded to its media's ``tokens``
    (per kind, in order); a DataError when the placeholders and the media do not match."""
    ids = placeholders(processor)
    try:
        return np.asarray(placeholder_repeats(text.ids.tolist(), {k: (ids[k], tokens[k]) for k in KINDS}, where))
    except MediaError as e:
        raise DataError(str(e)) from None


def assemble(text: Text, loaded: dict[str, list], processor: Processor, where: str = "record", *,
             levels: bool = False, turn_weights: bool = False) -> Sample:  # fmt: skip
    """A Sample from its text part and its loaded media (``MediaLoader.load`` results, per kind, in order)."""
    repeats = with_media(text, {k: [info.tokens for info, _ in loaded[k]] for k in KINDS}, processor, where)
    out_ids = np.repeat(text.ids, repeats)
    out_turn = np.repeat(text.turns, repeats)  # placeholders are never supervised
    labels = np.where(out_turn >= 0, out_ids, IGNORE)
    sample = Sample(torch.from_numpy(out_ids), torch.from_numpy(labels),
                    normalise=processor.media.normalise if levels else None)  # fmt: skip
    if turn_weights:
        sample.weights = torch.from_numpy(reply_weights(out_turn))
    for k, key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                             ("video", "pixel_values_videos", "video_grid_thw")):
        if loaded[k]:
            setattr(sample, key, torch.from_numpy(np.concatenate([values for _, values in loaded[k]])))
            setattr(sample, grid_key, torch.tensor([info.grid for info, _ in loaded[k]]))
    return sample


def reply_weights(turns: np.ndarray) -> np.ndarray:
    """float32 weight of each token when every reply weighs 1: 1 / (its reply's supervised tokens), 0 elsewhere."""
    sizes = np.bincount(turns[turns >= 0], minlength=1)
    return np.where(turns >= 0, 1.0 / np.maximum(sizes[np.maximum(turns, 0)], 1), 0.0).astype(np.float32)


def load_media(messages: list[dict], processor: Processor, where: str = "record", *, levels: bool = False,
               **media_options) -> dict[str, list]:  # fmt: skip
    """Every image and video of the messages loaded, per kind, in order; a DataError naming the item when one
    cannot be."""
    loaded = {kind: [] for kind in KINDS}
    try:
        for k, part in media_parts(messages):
            name = f"{where} {k} {len(loaded[k]) + 1}"
            loaded[k].append(processor.media.load(k, part, name, media_options, levels=levels))
    except MediaError as e:
        raise DataError(str(e)) from None
    return loaded


def encode(messages: list[dict], kind: str, processor: Processor, where: str = "record", *, levels: bool = False,
           turn_weights: bool = False, **media_options) -> Sample:  # fmt: skip
    """Messages -> a Sample: ids as inference tokenizes them, labels, and the media's patches (``levels``: as uint8
    levels that ``Sample.patches`` normalises at packing, an eighth of the memory for images, a quarter for videos).
    ``turn_weights``: each supervised token also weighs 1 / (its reply's supervised tokens), so every reply (a
    caption is one) weighs the same, whether it is "4" or a 20-token box."""
    text = tokenize(messages, kind, processor)
    loaded = load_media(messages, processor, where, levels=levels, **media_options)
    return assemble(text, loaded, processor, where, levels=levels, turn_weights=turn_weights)
