"""The wire format of OpenAI's ``/v1/chat/completions``: the request checked field by field, its messages turned
into the Qwen message format the processor takes, and the response/chunk bodies. No model logic here."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image_url", "video_url")


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code or str(self.status)}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class MediaKwargs(BaseModel):
    """Per-request preprocessing (vLLM's ``mm_processor_kwargs``): honoured, not ignored."""

    model_config = ConfigDict(extra="forbid")
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    fps: float | None = Field(None, gt=0)
    max_frames: int | None = Field(None, ge=2)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (user, logprobs=False, ...) pass
    model: str | None = None
    messages: list[dict] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    mm_processor_kwargs: MediaKwargs | None = None
    n: int = Field(1, ge=1, le=1)

    @classmethod
    def parse(cls, body: object) -> ChatRequest:
        if not isinstance(body, Mapping):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "body"
            raise ApiError(400, f"{where}: {first['msg']}", code="invalid_value") from None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _url(part: Mapping, key: str, where: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, Mapping) else value
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: {key} needs a 'url' string")
    return url


def to_qwen_messages(messages: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """OpenAI messages -> Qwen messages (content parts text / image / video), and the media counts."""
    out, counts = [], {"image": 0, "video": 0}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content: must be a string or a list of content parts")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in PART_TYPES:
                raise ApiError(400, f"{at}: unknown content type {kind!r} (use {', '.join(PART_TYPES)})")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{at}: a text part needs a 'text' string")
                parts.append({"type": "text", "text": part["text"]})
            else:
                media = "image" if kind == "image_url" else "video"
                counts[media] += 1
                parts.append({"type": media, media: _url(part, kind, at)})
        out.append({"role": role, "content": parts})
    return out, counts


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(id: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage,
    }  # fmt: skip


def chunk(id: str, model: str, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> dict:
    body = {
        "id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                  "logprobs": None}],
    }  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return body
