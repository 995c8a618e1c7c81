"""OpenAI function calling on the server: a request's ``tools`` and history rendered into the prompt in the
server's function-call format (qwen2vl.agent.calls), ``tool_choice`` turned into what the model is made to write,
and its answer parsed back into ``tool_calls``.

``tool_choice``:
- ``auto`` (the default when there are tools): the model calls or answers, as it likes;
- ``none``: the tools stay in the prompt, and the answer is cut where a call would begin;
- ``required``: the answer is opened with the call marker, so the model writes a call;
- ``{"type": "function", "function": {"name": N}}``: opened with a call of N, and its arguments are kept one
  JSON object, token by token (generate/json_mode.py), so that they always parse.
A call the model wrote but that cannot be read stays in the answer's text and is not a ``tool_call``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..agent.calls import (CALL_END, CALL_START, FN_ARGS, FN_NAME, STOP_WORDS, CallStream, ToolError, functions_of,
                           parse, render)  # fmt: skip
from .schemas import ApiError


@dataclass
class ToolPlan:
    fmt: str
    choice: str  # auto | none | required | the name of the function to call
    parallel: bool
    prefill: str = ""  # what the answer is opened with (part of the answer, not of what it returns)
    after_result: bool = False  # qwen: the prompt ends inside the assistant's turn, after a result
    stops: list[str] = field(default_factory=list)
    constrain: bool = False  # the answer (after ``prefill``) is kept one JSON object: the named call's arguments

    @property
    def marker(self) -> str:
        return CALL_START if self.fmt == "hermes" else f"{FN_NAME}:"

    @property
    def continued(self) -> bool:
        """The prompt ends inside an assistant turn: after a result, or in the opened answer."""
        return self.after_result or bool(self.prefill)

    @property
    def opened(self) -> str:
        """The prefill from its call marker on: the part of the answer's text that is the model's call."""
        return self.prefill[self.prefill.find(self.marker):] if self.prefill else ""

    def answer(self, text: str, stopped: bool = True) -> tuple[str | None, list[dict]]:
        """The model's ``text`` (what came after the prefill) -> (content, OpenAI tool calls). An answer cut off
        (``stopped`` false: the token limit) makes no calls: it is all content, the opened call included."""
        if not stopped:
            return self._content(self.opened + text), []
        if self.choice == "none":  # cut where a call would begin: the blanks before it go too
            return self._content(text).rstrip(), []
        closing = "}\n" + CALL_END if self.constrain and self.fmt == "hermes" else ""
        head, calls = parse(self.opened + text + closing, self.fmt)  # an opened answer has no head
        good = [c for c in calls if not c.error]
        if not good:  # nothing callable: the text is the answer
            return self._content(self.opened + text), []
        if not self.parallel:
            good = good[:1]
        return (self._content(head) or None), [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in good]  # fmt: skip

    def _content(self, text: str) -> str:
        if self.after_result and not self.prefill:  # the reply after a result opens with the ": " left off
            text = text.lstrip(": ")
        return text


class ToolStream:
    """An answer's deltas as they come -> content deltas (text that is surely no call) and, at the end, the rest
    of the content and the calls. Nothing of an answer opened with a call is content while it streams."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.calls = plan, CallStream(plan.fmt)
        self.text = self.safe = self.sent = ""

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.plan.prefill:
            return ""
        self.safe += piece if self.plan.choice == "none" else self.calls.feed(piece)
        content = self.plan._content(self.safe).rstrip()  # blanks wait: they may end the text before a call
        delta, self.sent = content[len(self.sent):], content
        return delta

    def close(self, stopped: bool = True) -> tuple[str, list[dict]]:
        """(the content not sent yet, the calls)."""
        content, calls = self.plan.answer(self.text, stopped)
        content = content or ""
        return (content[len(self.sent):] if content.startswith(self.sent) else ""), calls


def plan(req, messages: list[dict], fmt: str) -> tuple[list[dict], bool, ToolPlan | None]:
    """(the messages as the model reads them, whether its last turn is continued, the plan; None: no tools)."""
    uses = [i for i, m in enumerate(messages) if m["role"] == "tool" or m.get("tool_calls")]
    if not req.tools:
        if uses:
            raise ApiError(400, f"messages[{uses[0]}]: tool calls and results need the request's tools",
                           code="invalid_messages")  # fmt: skip
        return messages, False, None
    try:
        functions = functions_of(req.tools)
    except ToolError as e:
        raise ApiError(400, str(e), code="invalid_tools") from None
    if req.tool_choice is None or isinstance(req.tool_choice, str):
        choice = req.tool_choice or "auto"
    else:
        choice = req.tool_choice.function.name
        if choice not in {f["name"] for f in functions}:
            raise ApiError(400, f"tool_choice: there is no function {choice!r} in tools", code="invalid_value")
    try:
        plain = render(messages, functions, fmt, parallel=req.parallel_tool_calls is True)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_messages") from None
    p = ToolPlan(fmt, choice, parallel=req.parallel_tool_calls is not False, stops=list(STOP_WORDS[fmt]))
    p.after_result = fmt == "qwen" and plain[-1]["role"] == "assistant"
    if choice == "none":
        p.stops.append(p.marker)
    elif choice != "auto":
        opening = (": \n" if p.after_result else "") + (f"{FN_NAME}: " if fmt == "qwen" else CALL_START + "\n")
        if choice != "required":
            name = json.dumps(choice)
            opening += f"{choice}\n{FN_ARGS}: " if fmt == "qwen" else '{"name": %s, "arguments": ' % name
            p.constrain = True
        p.prefill = opening
        if p.after_result:
            plain[-1] = {**plain[-1], "content": [*plain[-1]["content"], {"type": "text", "text": opening}]}
        else:
            plain.append({"role": "assistant", "content": [{"type": "text", "text": opening}]})
    return plain, p.continued, p
