"""ChatML conversations (REFERENCE §6): the official Qwen2-VL-Instruct chat template rendered in code, and the
media parts of a conversation in order.

``render`` is byte for byte the official template for every conversation it accepts, with one deliberate extension:
a part with a ``video_url`` key (OpenAI style) is a video, where the official template silently drops it. A checkpoint
with another template in ``chat_template.json`` is rendered by it in sandboxed jinja2 (:class:`ChatTemplate`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import MediaError

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

# The official template (data: used to recognise it in chat_template.json; rendering is done in code).
OFFICIAL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def part_kind(part: Mapping) -> str:
    """'image', 'video', 'text' or 'other' for one content part, by the official template's rules."""
    kind = part.get("type")
    if kind == "image" or "image" in part or "image_url" in part:
        return "image"
    if kind in ("video", "video_url") or "video" in part or "video_url" in part:
        return "video"
    if "text" in part:
        return "text"
    return "other"


def media_source(part: Mapping) -> object:
    """Where an image/video part's data is: the ``image``/``video`` key, an OpenAI ``image_url``/``video_url``
    (a string or ``{"url": ...}``), or transformers' ``url``/``path`` keys."""
    for key in ("image", "video", "image_url", "video_url", "url", "path"):
        if key in part and part[key] is not None:
            value = part[key]
            return value.get("url") if isinstance(value, Mapping) else value
    return None


def check_messages(messages: object, name: str = "messages") -> list[Mapping]:
    """One conversation, checked: a list of {role: str, content: str | list of dict parts}."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise MediaError(f"{name}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise MediaError(f"{name}[{i}]: a message is a dict with a string 'role'")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, Sequence) or isinstance(content, bytes):
            raise MediaError(f"{name}[{i}] ({m['role']}): content must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise MediaError(f"{name}[{i}].content[{j}]: a content part is a dict, got {type(part).__name__}")
            kind = part_kind(part)
            if kind == "other":
                raise MediaError(f"{name}[{i}].content[{j}]: unknown content part type {part.get('type')!r}")
            if kind == "text" and not isinstance(part["text"], str):
                raise MediaError(f"{name}[{i}].content[{j}]: 'text' must be a string")
            if kind in ("image", "video") and media_source(part) is None:
                raise MediaError(f"{name}[{i}].content[{j}]: the {kind} part has no {kind} data")
    return list(messages)


def media_parts(messages: Sequence[Mapping]) -> list[tuple[str, Mapping]]:
    """The (kind, part) of every image and video part, in the order their placeholders appear."""
    out = []
    for m in messages:
        if not isinstance(m["content"], str):
            out += [(k, p) for p in m["content"] if (k := part_kind(p)) in ("image", "video")]
    return out


def bodies(messages: Sequence[Mapping], *, add_vision_id: bool = False) -> list[str]:
    """Each message's content as the template writes it: text as is, an image or video part as its placeholder
    (prefixed ``Picture N: ``/``Video N: `` with ``add_vision_id``, counted over the whole conversation)."""
    seen = {"image": 0, "video": 0}

    def write(part: Mapping) -> str:
        kind = part_kind(part)
        if kind not in seen:
            return part["text"] if kind == "text" else ""
        seen[kind] += 1
        name, placeholder = ("Picture", IMAGE_PLACEHOLDER) if kind == "image" else ("Video", VIDEO_PLACEHOLDER)
        return (f"{name} {seen[kind]}: " if add_vision_id else "") + placeholder

    return [m["content"] if isinstance(m["content"], str) else "".join(map(write, m["content"]))
            for m in messages]


def turns(messages: Sequence[Mapping], *, add_vision_id: bool = False) -> list[tuple[str, str, str]]:
    """(role, header, body) of every turn the template writes, the default system turn included; a turn is
    ``header + body + "<|im_end|>\n"``. Training marks what to supervise by these pieces."""
    out: list[tuple[str, str, str]] = []
    if messages and messages[0]["role"] != "system":
        out.append(("system", "<|im_start|>system\n", DEFAULT_SYSTEM))
    for m, body in zip(messages, bodies(messages, add_vision_id=add_vision_id)):
        out.append((m["role"], f"<|im_start|>{m['role']}\n", body))
    return out


def render(messages: Sequence[Mapping], *, add_generation_prompt: bool = False, add_vision_id: bool = False) -> str:
    """The conversation as the official template writes it (byte-identical)."""
    text = "".join(header + body + "<|im_end|>\n" for _, header, body in turns(messages, add_vision_id=add_vision_id))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class ChatTemplate:
    """The official template rendered in code, or a checkpoint's own (a base model's, a fine-tune's) in jinja2."""

    def __init__(self, source: str | None = None):
        self.source = source
        self._jinja = None
        if source is not None and source.strip() != OFFICIAL_TEMPLATE:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise MediaError(f"chat template: {message}")

            # the environment transformers renders chat templates in
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            self._jinja = env.from_string(source)

    @property
    def is_official(self) -> bool:
        return self._jinja is None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChatTemplate:
        """chat_template.json (or .jinja) of a checkpoint directory; the official template when there is none."""
        path = Path(path)
        if (path / "chat_template.jinja").is_file():
            return cls((path / "chat_template.jinja").read_text())
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (path / name).is_file():
                template = json.loads((path / name).read_text()).get("chat_template")
                if isinstance(template, str):
                    return cls(template)
        return cls(None)

    def __call__(self, messages, *, add_generation_prompt: bool = False, add_vision_id: bool = False,
                 continue_final_message: bool = False) -> str:
        """``continue_final_message`` (transformers' name): the text ends inside the last message, an assistant's,
        without its ``<|im_end|>``, so that the model goes on writing it (a ``qwen`` function result's reply)."""
        if continue_final_message:
            if not messages or messages[-1].get("role") != "assistant":
                raise MediaError("continue_final_message: the last message must be the assistant's")
            add_generation_prompt = False
        options = {"add_generation_prompt": add_generation_prompt, "add_vision_id": add_vision_id}
        text = render(messages, **options) if self._jinja is None else self._jinja.render(messages=messages, **options)
        if continue_final_message:
            end = text.rstrip().rfind("<|im_end|>")
            if end < 0:
                raise MediaError("continue_final_message: the chat template closes no message with <|im_end|>")
            text = text[:end]
        return text
