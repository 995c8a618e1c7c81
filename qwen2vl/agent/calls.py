"""Function calls as Qwen2-VL writes them: tools declared as OpenAI function schemas, rendered into the system
prompt, calls and results rendered into turns, and a model's answer parsed back into calls.

Two formats, each rendered exactly as qwen-agent 0.0.34's prompt builders render it (tests/test_agent_calls.py
compares them byte for byte):
- ``qwen`` (Qwen-Agent's own, the default for Qwen2-VL): a call is ``✿FUNCTION✿: name`` then ``✿ARGS✿: {...}``;
  its results follow in the same assistant turn as ``✿RESULT✿: ...``, and ``✿RETURN✿`` opens the reply, so a turn
  with results is continued, not closed.
- ``hermes`` (vLLM's hermes parser, Qwen2.5-VL's template): ``<tool_call>\\n{"name": ..., "arguments": {...}}
  \\n</tool_call>``; results come back as a user turn of ``<tool_response>`` blocks.

A call that cannot be used (malformed, unknown, arguments that break the schema) is not an exception for the
caller to catch: :func:`check` names what is wrong, so that the model can read it as the next observation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

FORMATS = ("qwen", "hermes")
FN_NAME, FN_ARGS, FN_RESULT, FN_EXIT = "✿FUNCTION✿", "✿ARGS✿", "✿RESULT✿", "✿RETURN✿"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
STOP_WORDS = {"qwen": [FN_RESULT, FN_EXIT], "hermes": []}  # qwen: the model must not write the results itself
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOO_DEEP = "the JSON nests too deep to read"  # a model's answer is not bounded as a request body is

# The prompt texts are a format, like a chat template: a model trained on them expects these exact bytes.
_QWEN_INFO = {
    "en": "# Tools\n\n## You have access to the following tools:\n\n{tool_descs}",
    "zh": "# 工具\n\n## 你拥有如下工具：\n\n{tool_descs}",
}
_QWEN_HOW = {
    "en": "## When you need to call a tool, please insert the following command in your reply, which can be called "
          f"zero or multiple times according to your needs:\n\n{FN_NAME}: The tool to use, should be one of "
          f"[{{tool_names}}]\n{FN_ARGS}: The input of the tool\n{FN_RESULT}: Tool results\n{FN_EXIT}: Reply based "
          "on tool results. Images need to be rendered as ![](url)",
    "zh": f"## 你可以在回复中插入零次、一次或多次以下命令以调用工具：\n\n{FN_NAME}: 工具名称，必须是[{{tool_names}}]之一。\n"
          f"{FN_ARGS}: 工具输入\n{FN_RESULT}: 工具结果\n{FN_EXIT}: 根据工具结果进行回复，需将图片用![](url)渲染出来",
}
_QWEN_HOW_PARALLEL = {
    "en": ("## Insert the following command in your reply when you need to call N tools in parallel:\n\n"
           f"{FN_NAME}: The name of tool 1, should be one of [{{tool_names}}]\n{FN_ARGS}: The input of tool 1\n"
           f"{FN_NAME}: The name of tool 2\n{FN_ARGS}: The input of tool 2\n...\n{FN_NAME}: The name of tool N\n"
           f"{FN_ARGS}: The input of tool N\n{FN_RESULT}: The result of tool 1\n{FN_RESULT}: The result of tool 2\n"
           f"...\n{FN_RESULT}: The result of tool N\n{FN_EXIT}: Reply based on tool results. Images need to be "
           "rendered as ![](url)"),
    "zh": (f"## 你可以在回复中插入以下命令以并行调用N个工具：\n\n{FN_NAME}: 工具1的名称，必须是[{{tool_names}}]之一\n"
           f"{FN_ARGS}: 工具1的输入\n{FN_NAME}: 工具2的名称\n{FN_ARGS}: 工具2的输入\n...\n{FN_NAME}: 工具N的名称\n"
           f"{FN_ARGS}: 工具N的输入\n{FN_RESULT}: 工具1的结果\n{FN_RESULT}: 工具2的结果\n...\n{FN_RESULT}: 工具N的结果\n"
           f"{FN_EXIT}: 根据工具结果进行回复，需将图片用![](url)渲染出来"),
}
_QWEN_TOOL = {
    "en": "### {human}\n\n{name}: {description} Parameters: {parameters} {args_format}",
    "zh": "### {human}\n\n{name}: {description} 输入参数：{parameters} {args_format}",
}
_QWEN_ARGS_FORMAT = {"en": "Format the arguments as a JSON object.", "zh": "此工具的输入应为JSON对象。"}
_HERMES = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>\n{tool_descs}\n</tools>\n\nFor each function call, return "
    "a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class ToolError(ValueError):
    """A tool declaration that cannot be used, named."""


@dataclass
class Call:
    """One function call as the model wrote it; ``error`` says why it cannot be run (None: it can)."""

    name: str
    arguments: str  # JSON text
    id: str = ""
    error: str | None = None
    parsed: dict = field(default_factory=dict)  # the arguments once checked


def functions_of(tools: list) -> list[dict]:
    """OpenAI ``tools`` (``{"type": "function", "function": {...}}``, or bare function dicts) -> the function
    dicts, checked: a name of letters, digits, ``_`` or ``-``; a description string; parameters a JSON schema."""
    import jsonschema

    if not isinstance(tools, list):
        raise ToolError("tools: expected a list")
    functions, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if isinstance(tool, dict) and tool.get("type", "function") != "function":
            raise ToolError(f"{where}.type: only 'function' tools exist, not {tool.get('type')!r}")
        if isinstance(tool, dict) and "function" in tool:
            tool, where = tool["function"], f"{where}.function"
        if not isinstance(tool, dict):
            raise ToolError(f"{where}: expected an object")
        name = tool.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{where}.name: {name!r} is not 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise ToolError(f"{where}.name: {name!r} is declared twice")
        seen.add(name)
        if not isinstance(tool.get("description", ""), str):
            raise ToolError(f"{where}.description: expected a string")
        parameters = tool.get("parameters", {"type": "object", "properties": {}})
        try:
            jsonschema.validators.validator_for(parameters).check_schema(parameters)
        except jsonschema.SchemaError as e:
            raise ToolError(f"{where}.parameters: not a JSON schema ({e.message})") from None
        except TypeError:
            raise ToolError(f"{where}.parameters: not a JSON schema (expected an object)") from None
        functions.append({**tool, "parameters": parameters})
    return functions


def system_prompt(functions: list[dict], fmt: str = "qwen", lang: str = "en", parallel: bool = False) -> str:
    """The tools' part of the system prompt (appended to a system message after a blank line)."""
    if fmt == "hermes":
        descs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
        return _HERMES.format(tool_descs=descs)
    if fmt != "qwen":
        raise ValueError(f"function-call format {fmt!r}: expected one of {FORMATS}")
    descs = "\n\n".join(_describe(f, lang) for f in functions)
    names = ",".join(f.get("name_for_model", f["name"]) for f in functions)
    how = (_QWEN_HOW_PARALLEL if parallel else _QWEN_HOW)[lang]
    return _QWEN_INFO[lang].format(tool_descs=descs) + "\n\n" + how.format(tool_names=names)


def _describe(function: dict, lang: str) -> str:
    name = function.get("name_for_model", function["name"])
    return _QWEN_TOOL[lang].format(
        human=function.get("name_for_human", function["name"]), name=name,
        description=function.get("description", ""),
        parameters=json.dumps(function["parameters"], ensure_ascii=False),
        args_format=function.get("args_format", _QWEN_ARGS_FORMAT[lang]),
    ).rstrip()  # fmt: skip


def _parts(content) -> list[dict]:
    if content is None:
        return []
    return [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]


def _text_of(parts: list[dict]) -> str:
    return "".join(p.get("text", "") for p in parts if p.get("type", "text") == "text")


def render(messages: list[dict], functions: list[dict], fmt: str = "qwen", lang: str = "en",
           parallel: bool = False) -> list[dict]:
    """OpenAI chat messages (assistant ``tool_calls``, ``role: "tool"`` results) -> plain turns with the tools in
    the system prompt, as the model reads them. With the ``qwen`` format, a conversation whose last turn holds
    results ends in an open assistant turn (``...✿RETURN✿``) that the model continues."""
    out: list[dict] = []
    for m in messages:
        role, parts = m["role"], _parts(m.get("content"))
        if role in ("system", "user"):
            out.append({"role": role, "content": parts})
        elif role == "assistant":  # as qwen-agent splits it: the text, then each call, one message each
            pieces = [parts] if any(p.get("type", "text") != "text" or p.get("text") for p in parts) else []
            pieces += [call for call in m.get("tool_calls") or []]
            for piece in pieces:
                last = out[-1]["content"] if out and out[-1]["role"] == "assistant" else None
                if isinstance(piece, dict):
                    piece = [{"type": "text", "text": render_call(piece, fmt, after=last is not None)}]
                if last is None:
                    out.append({"role": "assistant", "content": piece})
                else:
                    _extend(last, piece, fmt)
        elif role == "tool":
            _add_result(out, parts, fmt)
        else:
            raise ValueError(f"role {role!r}: expected system, user, assistant or tool")
    tools = {"type": "text", "text": system_prompt(functions, fmt, lang, parallel)}
    if out and out[0]["role"] == "system":
        out[0]["content"].append({**tools, "text": "\n\n" + tools["text"]})
    else:
        out.insert(0, {"role": "system", "content": [tools]})
    if fmt == "qwen" and out[-1]["role"] == "assistant":  # ': ' may merge with the reply's first word: drop it
        texts = [p for p in out[-1]["content"] if p.get("type", "text") == "text"]
        if texts and texts[-1]["text"].endswith(f"{FN_EXIT}: "):
            texts[-1]["text"] = texts[-1]["text"][:-2]
    return out


def render_call(call: dict, fmt: str, after: bool = False) -> str:
    """One call (OpenAI's ``{"function": {"name", "arguments"}}`` or the bare function) as the model writes it;
    ``after``: a ``qwen`` call that follows other text of the same turn, on a line of its own."""
    fn = call["function"] if "function" in call else call
    name, arguments = fn["name"], fn.get("arguments") or ""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if fmt == "qwen":
        if arguments.startswith("```"):
            arguments = "\n" + arguments
        return ("\n" if after else "") + f"{FN_NAME}: {name}\n{FN_ARGS}: {arguments}"
    try:
        arguments = json.loads(arguments)
    except json.JSONDecodeError:
        pass  # written as the text it was
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_START}\n{body}\n{CALL_END}"


def _extend(content: list[dict], parts: list[dict], fmt: str) -> None:
    """Another assistant message continuing the previous one (a thought, then its calls)."""
    if fmt == "hermes" and content and (text := content[-1].get("text")) and not text.endswith("\n"):
        content.append({"type": "text", "text": "\n"})
    content.extend(parts)


def _add_result(out: list[dict], parts: list[dict], fmt: str) -> None:
    parts = parts or [{"type": "text", "text": ""}]
    if fmt == "hermes":
        block = [{"type": "text", "text": "<tool_response>\n"}, *parts, {"type": "text", "text": "\n</tool_response>"}]
        if out and out[-1]["role"] == "user":
            out[-1]["content"] += [{"type": "text", "text": "\n"}, *block]
        else:
            out.append({"role": "user", "content": block})
        return
    if not out or out[-1]["role"] != "assistant":
        raise ValueError("a tool result must follow the assistant message that called it")
    content = out[-1]["content"]
    exit_ = f"\n{FN_EXIT}: "
    if content and content[-1].get("text", "").endswith(exit_):  # several results: one reply after the last
        content[-1]["text"] = content[-1]["text"][: -len(exit_)]
    content += [{"type": "text", "text": f"\n{FN_RESULT}: "}, *parts, {"type": "text", "text": exit_}]


def parse(text: str, fmt: str = "qwen") -> tuple[str, list[Call]]:
    """An answer -> (the text before the first call, the calls). Text after the calls is dropped (the model was
    stopped to wait for their results); a call that cannot be read still comes back, with its ``error``."""
    if fmt == "hermes":
        head, *blocks = text.split(CALL_START)
        calls = [_hermes_call(b) for b in blocks if b.strip()]
    elif fmt == "qwen":
        head, *blocks = text.split(f"{FN_NAME}:")
        calls = [c for b in blocks if b.strip() for c in _qwen_calls(b)]
        head = _drop_partial_marker(head)
    else:
        raise ValueError(f"function-call format {fmt!r}: expected one of {FORMATS}")
    for i, call in enumerate(calls):
        call.id = f"call_{i}"
    return head.strip(), calls


def _qwen_calls(block: str) -> list[Call]:
    """``name\\n✿ARGS✿: {...}``: one call, or one for each ``✿ARGS✿`` (qwen-agent reads repeats so)."""
    name, *args = block.split(f"{FN_ARGS}:")
    name = _drop_partial_marker(name).strip()
    if not args:
        return [Call(name, "", error=f"the call of {name!r} has no {FN_ARGS} line")]
    calls = []
    for a in args:
        a = _drop_partial_marker(a).strip()
        if a.startswith("{") and (end := a.rfind("}")) > 0:
            a = a[: end + 1]  # a trailing remark after the object is not part of it
        calls.append(Call(name, a))
    return calls


def _hermes_call(block: str) -> Call:
    body, closed, _ = block.partition(CALL_END)
    if not closed:
        return Call("", body.strip(), error=f"a {CALL_START} without its {CALL_END}")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return Call("", body.strip(), error=f"the call is not valid JSON ({e.msg} at character {e.pos})")
    except RecursionError:
        return Call("", body.strip(), error=TOO_DEEP)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return Call("", body.strip(), error='a call is a JSON object with "name" and "arguments"')
    arguments = obj["arguments"]
    return Call(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))


def _drop_partial_marker(text: str) -> str:
    """Text without a marker (or the start of one) that a stop word or the token limit cut off at its end."""
    stripped = text.rstrip()
    for marker in (FN_NAME, FN_ARGS, FN_RESULT, FN_EXIT):
        if stripped.endswith(marker):
            return stripped[: -len(marker)]
    tail = stripped[stripped.rfind("✿"):] if "✿" in stripped else ""
    if tail and any(m.startswith(tail) for m in (FN_NAME, FN_ARGS, FN_RESULT, FN_EXIT)):
        return stripped[: -len(tail)]
    return text


def check(call: Call, functions: list[dict]) -> Call:
    """Fill ``call.error`` (unknown function, arguments not a JSON object, arguments against the schema) or
    ``call.parsed``; returns the call."""
    import jsonschema

    if call.error:
        return call
    by_name = {f["name"]: f for f in functions}
    if call.name not in by_name:
        call.error = f"there is no function {call.name!r}; the functions are {', '.join(by_name) or 'none'}"
        return call
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as e:
        call.error = f"the arguments of {call.name} are not valid JSON ({e.msg} at character {e.pos})"
        return call
    except RecursionError:
        call.error = f"the arguments of {call.name}: {TOO_DEEP}"
        return call
    if not isinstance(arguments, dict):
        call.error = f"the arguments of {call.name} must be a JSON object, not {type(arguments).__name__}"
        return call
    problem = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(by_name[call.name]["parameters"])(
            by_name[call.name]["parameters"]).iter_errors(arguments))
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path)
        call.error = f"the arguments of {call.name} do not fit its parameters: {problem.message}" + (
            f" (at {where})" if where else "")
        return call
    call.parsed = arguments
    return call


class CallStream:
    """Parses an answer as it streams: ``feed(delta)`` returns the text that is surely not part of a call (held
    back while it could still be the start of a marker); ``calls(final)`` parses what followed the first
    marker. Calls are whole only at the end (a ``qwen`` call's arguments end where the model stops)."""

    def __init__(self, fmt: str = "qwen"):
        self.fmt, self.text, self.sent, self.in_call = fmt, "", 0, False
        self.marker = CALL_START if fmt == "hermes" else f"{FN_NAME}:"

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        if (i := self.text.find(self.marker, self.sent)) >= 0:
            self.in_call = True
            out, self.sent = self.text[self.sent:i].rstrip(), i
            return out
        hold = next((k for k in range(min(len(self.marker), len(self.text) - self.sent), 0, -1)
                     if self.marker.startswith(self.text[-k:])), 0)
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out

    def close(self) -> tuple[str, list[Call]]:
        """(the held-back text, the calls) once the answer is complete."""
        _, calls = parse(self.text, self.fmt)
        rest = "" if self.in_call else self.text[self.sent:]
        return (_drop_partial_marker(rest) if self.fmt == "qwen" else rest), calls
