"""The wire format of OpenAI's ``/v1/chat/completions``: the request checked field by field, its messages turned
into the Qwen message format the processor takes, and the response/chunk bodies. No model logic here."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ROLES = ("system", "user", "assistant", "tool")
MAX_STOPS = 4
StopText = Annotated[str, Field(min_length=1, max_length=256)]
PART_TYPES = ("text", "image_url", "video_url")


# OpenAI's error scheme: a ``type`` per kind of status and a semantic ``code``; these are the defaults
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
ERROR_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
               413: "body_too_large", 429: "overloaded", 500: "internal_error", 503: "engine_stopped"}  # fmt: skip


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "code"}}``; ``code`` is a word."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.code = code or ERROR_CODES.get(status, "server_error" if status >= 500 else "invalid_request")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


MAX_DEPTH = 16  # a chat body nests about 6 deep (messages, parts, image_url); more is an attack or a bug
MAX_NUMBER_CHARS = 64  # no field needs a longer number; Python's int() is quadratic in the digits


def _invalid_json(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_json")


def parse_body(raw: bytes) -> object:
    """The request body as JSON, or an ApiError naming what is wrong (also: NaN/Infinity, over-long numbers, nesting
    deeper than MAX_DEPTH, lone surrogates)."""

    def number(literal: str, kind=int):
        if len(literal) > MAX_NUMBER_CHARS:
            raise _invalid_json(f"a number of {len(literal)} characters (at most {MAX_NUMBER_CHARS})")
        return kind(literal)

    def constant(name: str):
        raise _invalid_json(f"{name} is not JSON")

    try:
        text = raw.decode("utf-8")
        body = json.loads(text, parse_int=number, parse_float=lambda x: number(x, float), parse_constant=constant)
    except UnicodeDecodeError as e:
        raise _invalid_json(f"the body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _invalid_json(f"invalid JSON body: {e}") from None
    except RecursionError:
        raise _invalid_json(f"the body nests deeper than {MAX_DEPTH} levels") from None
    _check_values(body)
    return body


def _check_values(body: object) -> None:
    """Depth and strings (keys too), walked without recursion so that no body can exhaust the stack."""
    todo = [(body, "body", 0)]
    while todo:
        value, where, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise _invalid_json(f"{where}: nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where}: holds a lone surrogate (not valid Unicode text)",
                               code="invalid_value") from None  # fmt: skip
        elif isinstance(value, dict):
            for k, v in value.items():
                todo += [(k, f"{where} key", depth + 1), (v, f"{where}.{k}" if where != "body" else k, depth + 1)]
        elif isinstance(value, list):
            todo += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


MAX_PIXELS = 16384 * 28 * 28  # a picture of 16384 visual tokens, the most a video may take


class MediaKwargs(BaseModel):
    """Per-request preprocessing (vLLM's ``mm_processor_kwargs``): honoured, not ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    min_pixels: int | None = Field(None, gt=0, le=MAX_PIXELS)
    max_pixels: int | None = Field(None, gt=0, le=MAX_PIXELS)
    fps: float | None = Field(None, gt=0, le=60)
    max_frames: int | None = Field(None, ge=2, le=768)

    @model_validator(mode="after")
    def _order(self):
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")
        return self


# Fields that do not change the answer: accepted and unused. Fields that would, given at their "off" value, are
# accepted too; at any other value, and any field not named here or below, the request is refused by name.
HARMLESS = ("user", "metadata", "store", "service_tier")
OFF_VALUES = {"logit_bias": (None, {}), "functions": (None, []), "function_call": (None, "none"),
              "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "modalities": (None, ["text"]),
              "best_of": (None, 1)}  # fmt: skip
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class ResponseFormat(BaseModel):
    """``text`` (the default) or ``json_object``: the answer constrained to one JSON object (generate/json_mode.py).
    ``json_schema`` is refused by name: a schema-guided grammar is not implemented."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object"]


MAX_TOOLS = 128


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)


class NamedChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: that function must be called."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class ChatRequest(BaseModel):
    # Every value we use has a bounded domain (as OpenAI's): what passes here is numerically safe in the sampler.
    # top_k: 0 and -1 mean off (vLLM's values).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = Field(None, max_length=256)
    messages: list[dict] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, lt=2**31)  # and at most the model length, checked by the server
    max_completion_tokens: int | None = Field(None, ge=1, lt=2**31)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, lt=2**31)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    mm_processor_kwargs: MediaKwargs | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    # OpenAI's function calling (serve/tools.py); each tool is checked there, as a JSON schema
    tools: list[dict] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if self.tools and self.response_format is not None and self.response_format.type == "json_object":
            raise ValueError("response_format json_object cannot be combined with tools")
        return self

    @classmethod
    def parse(cls, body: object) -> ChatRequest:
        if not isinstance(body, Mapping):
            raise _invalid_json("the request body must be a JSON object")
        for name, value in body.items():
            offs = OFF_VALUES.get(name, ())
            if offs and not any(value == off and isinstance(value, bool) == isinstance(off, bool) for off in offs):
                allowed = " or ".join(json.dumps(off) for off in offs)
                raise ApiError(400, f"{name}: not supported by this server (accepted only as {allowed})",
                               code="unsupported_parameter")  # fmt: skip
            if name not in cls.model_fields and name not in OFF_VALUES and name not in HARMLESS:
                raise ApiError(400, f"{name}: unknown or unsupported parameter", code="unsupported_parameter")
        body = {k: v for k, v in body.items() if k in cls.model_fields}
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


def to_qwen_messages(messages: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """OpenAI messages -> Qwen messages (content parts text / image / video), and the media counts."""
    out, counts = [], {"image": 0, "video": 0}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            message = f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}"
            raise ApiError(400, message, code="invalid_messages")
        calls = _tool_calls(m, where) if role == "assistant" else None
        extra = {"tool_calls": calls} if calls else {}
        if (content is None and calls) or isinstance(content, str):  # None: an assistant message that only calls
            out.append({"role": role, "content": content, **extra})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content: must be a string or a list of content parts",
                           code="invalid_messages")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in PART_TYPES:
                raise ApiError(400, f"{at}: unknown content type {kind!r} (use {', '.join(PART_TYPES)})",
                               code="invalid_messages")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{at}: a text part needs a 'text' string", code="invalid_messages")
                parts.append({"type": "text", "text": part["text"]})
            else:
                value = part.get(kind)
                url = value.get("url") if isinstance(value, Mapping) else value
                if not isinstance(url, str) or not url:
                    raise ApiError(400, f"{at}: {kind} needs a 'url' string", code="invalid_messages")
                media = "image" if kind == "image_url" else "video"
                counts[media] += 1
                parts.append({"type": media, media: url})
        out.append({"role": role, "content": parts, **extra})
    return out, counts


def _tool_calls(message: Mapping, where: str) -> list[dict] | None:
    """An assistant message's ``tool_calls``, checked: each ``{"id", "type": "function", "function": {"name",
    "arguments"}}`` with the arguments a string (of JSON)."""
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise ApiError(400, f"{where}.tool_calls: must be a list", code="invalid_messages")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments", ""), str) or call.get("type", "function") != "function":
            raise ApiError(400, f"{where}.tool_calls[{k}]: expected {{\"type\": \"function\", \"function\": "
                                "{\"name\": str, \"arguments\": str}}", code="invalid_messages")
    return [{"id": c.get("id", ""), "type": "function", "function": {"name": c["function"]["name"],
             "arguments": c["function"].get("arguments", "")}} for c in calls]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(id: str, model: str, choices: list[dict], usage: dict) -> dict:
    """``choices``: per answer its ``text``, ``finish_reason``, ``logprobs`` (None or a list of token entries) and
    ``tool_calls`` (none, or OpenAI's call objects)."""
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"],
                                             **({"tool_calls": c["tool_calls"]} if c.get("tool_calls") else {})},
                     "finish_reason": c["finish_reason"], "logprobs": _logprobs(c["logprobs"])}
                    for i, c in enumerate(choices)],
        "usage": usage,
    }  # fmt: skip


def _logprobs(entries: list[dict] | None) -> dict | None:
    return None if entries is None else {"content": entries}


def chunk(id: str, model: str, delta: dict, finish_reason: str | None = None, usage: dict | None = None,
          index: int = 0, logprobs: list[dict] | None = None) -> dict:  # fmt: skip
    body = {
        "id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [] if usage is not None else [{"index": index, "delta": delta, "finish_reason": finish_reason,
                                                  "logprobs": _logprobs(logprobs)}],
    }  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return body
