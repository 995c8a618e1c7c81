"""Function calls: the tools, calls and results render byte for byte as qwen-agent 0.0.34's prompt builders
render them (both formats, English and Chinese, one call or several, results with images), answers parse into the
calls qwen-agent reads from them, and every malformed call becomes a named error, never an exception."""

import json

import pytest

pytest.importorskip("qwen_agent")  # a test reference, installed by make test
from qwen_agent.llm.fncall_prompts.nous_fncall_prompt import NousFnCallPrompt  # noqa: E402
from qwen_agent.llm.fncall_prompts.qwen_fncall_prompt import QwenFnCallPrompt  # noqa: E402
from qwen_agent.llm.schema import ContentItem, FunctionCall, Message  # noqa: E402

from qwen2vl.agent.calls import Call, CallStream, ToolError, check, functions_of, parse, render  # noqa: E402

CLICK = {"type": "function", "function": {
    "name": "click", "description": "Click a point of the screen, in [0, 1000) coordinates.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 999},
                                                    "y": {"type": "integer", "minimum": 0, "maximum": 999}},
                   "required": ["x", "y"]}}}
TYPE = {"type": "function", "function": {
    "name": "type_text", "description": "输入文字（中文说明）",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"},
                                                    "options": {"type": "object", "properties": {
                                                        "enter": {"type": "boolean"},
                                                        "keys": {"type": "array", "items": {"type": "string"}}}}},
                   "required": ["text"]}}}
TOOLS = [CLICK, TYPE]
SHOT = "file:///tmp/screen.png"


def call(name, args, i=0):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


CONVERSATIONS = {
    "no history": [{"role": "user", "content": "Click OK"}],
    "a system prompt": [{"role": "system", "content": "You operate a phone."}, {"role": "user", "content": "Click OK"}],
    "one call and its result": [
        {"role": "user", "content": "Click OK"},
        {"role": "assistant", "content": None, "tool_calls": [call("click", {"x": 500, "y": 300})]},
        {"role": "tool", "tool_call_id": "call_0", "content": "clicked"},
    ],
    "a thought, two calls, two results, a reply, a new question": [
        {"role": "system", "content": [{"type": "text", "text": "You operate a phone."}]},
        {"role": "user", "content": [{"type": "image", "image": SHOT}, {"type": "text", "text": "搜索猫"}]},
        {"role": "assistant", "content": "I will type it.",
         "tool_calls": [call("type_text", {"text": "猫", "options": {"enter": True, "keys": ["a", "b"]}}),
                        call("click", {"x": 1, "y": 2}, 1)]},
        {"role": "tool", "tool_call_id": "call_0", "content": "typed"},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "image", "image": SHOT},
                                                               {"type": "text", "text": "the new screen"}]},
        {"role": "assistant", "content": "Done: the search shows cats."},
        {"role": "user", "content": "Now click the first one"},
    ],
    "a result with nothing in it": [
        {"role": "user", "content": "Click OK"},
        {"role": "assistant", "content": "", "tool_calls": [call("click", {"x": 5, "y": 6})]},
        {"role": "tool", "tool_call_id": "call_0", "content": ""},
    ],
}


def as_qwen_agent(messages):
    """OpenAI messages -> qwen-agent's, as its own quick_chat_oai converts them: the text and each call of an
    assistant message become messages of their own, tool results 'function' messages."""
    def items(content):
        if isinstance(content, str):
            return [ContentItem(text=content)]
        return [ContentItem(image=p["image"]) if p["type"] == "image" else ContentItem(text=p["text"])
                for p in content or []]

    out = []
    for m in messages:
        if m["role"] in ("system", "user"):
            out.append(Message(role=m["role"], content=items(m["content"])))
        elif m["role"] == "tool":
            out.append(Message(role="function", name="f", content=items(m["content"])))
        else:
            if m.get("content"):
                out.append(Message(role="assistant", content=items(m["content"])))
            for c in m.get("tool_calls") or []:
                out.append(Message(role="assistant", content=[],
                                   function_call=FunctionCall(name=c["function"]["name"],
                                                              arguments=c["function"]["arguments"])))
    return out


def flat(content):
    """A message's content as (kind, value) runs, adjacent texts joined: the bytes the chat template writes."""
    runs = []
    for item in content:
        if isinstance(item, ContentItem):
            kind, value = item.get_type_and_value()
        else:
            kind = item.get("type", "text")
            value = item[kind]
        if kind == "text" and runs and runs[-1][0] == "text":
            runs[-1] = ("text", runs[-1][1] + value)
        elif not (kind == "text" and value == ""):
            runs.append((kind, value))
    return runs


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("fmt", ["qwen", "hermes"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_rendering_equals_qwen_agent(name, fmt, parallel, lang):
    messages = CONVERSATIONS[name]
    functions = functions_of(TOOLS)
    builder = QwenFnCallPrompt() if fmt == "qwen" else NousFnCallPrompt()
    theirs = builder.preprocess_fncall_messages(as_qwen_agent(messages), [t["function"] for t in TOOLS],
                                                lang=lang, parallel_function_calls=parallel)
    ours = render(messages, functions, fmt, lang=lang, parallel=parallel)
    assert [(m["role"], flat(m["content"])) for m in ours] == [(m.role, flat(m.content)) for m in theirs]


ANSWERS = {
    "qwen": [
        "The OK button is at the bottom.\n✿FUNCTION✿: click\n✿ARGS✿: {\"x\": 500, \"y\": 910}",
        "✿FUNCTION✿: type_text\n✿ARGS✿: {\"text\": \"猫\", \"options\": {\"enter\": true}}\n"
        "✿FUNCTION✿: click\n✿ARGS✿: {\"x\": 1, \"y\": 2}",
        "✿FUNCTION✿: click\n✿ARGS✿: {\"x\": 3, \"y\": 4} <!-- a remark -->",
        "Nothing to do here.",
        "Typing.\n✿FUNCTION✿: type_text\n✿ARGS✿: {\"text\": \"a\"}\n✿ARGS✿: {\"text\": \"b\"}",
    ],
    "hermes": [
        "The OK button is at the bottom.\n<tool_call>\n{\"name\": \"click\", \"arguments\": {\"x\": 500, \"y\": 910}}\n"
        "</tool_call>",
        "<tool_call>\n{\"name\": \"type_text\", \"arguments\": {\"text\": \"猫\", \"options\": {\"enter\": true}}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"click\", \"arguments\": {\"x\": 1, \"y\": 2}}\n</tool_call>",
        "Nothing to do here.",
    ],
}


@pytest.mark.parametrize("fmt", ["qwen", "hermes"])
def test_parsing_reads_the_calls_qwen_agent_reads(fmt):
    builder = QwenFnCallPrompt() if fmt == "qwen" else NousFnCallPrompt()
    for answer in ANSWERS[fmt]:
        theirs = builder.postprocess_fncall_messages([Message(role="assistant", content=[ContentItem(text=answer)])],
                                                     parallel_function_calls=True)
        text, calls = parse(answer, fmt)
        their_calls = [(m.function_call.name, json.loads(m.function_call.arguments)) for m in theirs
                       if m.function_call]
        assert [(c.name, json.loads(c.arguments)) for c in calls] == their_calls, answer
        their_text = "".join(item.text for m in theirs if not m.function_call for item in m.content)
        assert text == their_text.strip(), answer
        assert all(check(c, functions_of(TOOLS)).error is None for c in calls)


@pytest.mark.parametrize("fmt", ["qwen", "hermes"])
def test_streaming_gives_the_same_text_and_calls(fmt):
    for answer in ANSWERS[fmt]:
        for size in (1, 2, 5):
            stream = CallStream(fmt)
            text = "".join(stream.feed(answer[i:i + size]) for i in range(0, len(answer), size))
            rest, calls = stream.close()
            head, expected = parse(answer, fmt)
            assert (text + rest).strip() == head
            assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected]
            assert "✿" not in text and "<tool_call" not in text


def test_a_cut_marker_never_shows_as_text():
    stream = CallStream("qwen")
    assert stream.feed("Sure.\n✿FUNC") == "Sure.\n"
    assert stream.close() == ("", [])
    assert parse("Sure.\n✿FUNC", "qwen") == ("Sure.", [])


MALFORMED = {
    "qwen": {
        "✿FUNCTION✿: click": "has no ✿ARGS✿ line",
        "✿FUNCTION✿: click\n✿ARGS✿: {\"x\": 1,": "not valid JSON",
        "✿FUNCTION✿: click\n✿ARGS✿: [1, 2]": "must be a JSON object, not list",
        "✿FUNCTION✿: scroll\n✿ARGS✿: {}": "there is no function 'scroll'; the functions are click, type_text",
        "✿FUNCTION✿: click\n✿ARGS✿: {\"x\": 1}": "'y' is a required property",
        "✿FUNCTION✿: click\n✿ARGS✿: {\"x\": 1000, \"y\": 5}": "1000 is greater than the maximum of 999 (at x)",
        "✿FUNCTION✿: type_text\n✿ARGS✿: {\"text\": \"a\", \"options\": {\"keys\": [1]}}":
            "1 is not of type 'string' (at options/keys/0)",
    },
    "hermes": {
        "<tool_call>\n{\"name\": \"click\", \"arguments\": {\"x\": 1, \"y\": 2}}": "without its </tool_call>",
        "<tool_call>\n{\"name\": \"click\", \"arguments\": {\"x\": 1, }}\n</tool_call>": "not valid JSON",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>": "with \"name\" and \"arguments\"",
        "<tool_call>\n[\"click\"]\n</tool_call>": "with \"name\" and \"arguments\"",
        "<tool_call>\n{\"name\": \"scroll\", \"arguments\": {}}\n</tool_call>": "there is no function 'scroll'",
        "<tool_call>\n{\"name\": \"click\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>": "'y' is a required",
    },
}


@pytest.mark.parametrize("fmt", ["qwen", "hermes"])
def test_every_malformed_call_is_a_named_error(fmt):
    functions = functions_of(TOOLS)
    for answer, message in MALFORMED[fmt].items():
        _, calls = parse(answer, fmt)
        assert len(calls) == 1, answer
        error = check(calls[0], functions).error
        assert error is not None and message in error, (answer, error)


def test_a_good_call_has_its_arguments():
    c = check(Call("click", '{"x": 3, "y": 4}'), functions_of(TOOLS))
    assert c.error is None and c.parsed == {"x": 3, "y": 4}


@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "tools: expected a list"),
    ([{"type": "retrieval", "function": {}}], "only 'function' tools"),
    ([{"type": "function", "function": {"name": "has space"}}], "is not 1-64 letters"),
    ([CLICK, CLICK], "'click' is declared twice"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "description: expected a string"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "not a JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "not a JSON schema"),
])
def test_bad_tool_declarations_are_named(tools, message):
    with pytest.raises(ToolError, match=message):
        functions_of(tools)


def test_json_nested_past_pythons_recursion_limit_is_a_named_error_not_a_crash():
    """A model's answer is bounded by its tokens, not by the request's nesting limit: 10,000 brackets deep."""
    from qwen2vl.agent.calls import TOO_DEEP

    deep = "[" * 10000 + "]" * 10000
    _, calls = parse('<tool_call>\n{"name": "f", "arguments": %s}\n</tool_call>' % deep, "hermes")
    assert calls[0].error == TOO_DEEP
    fn = {"name": "f", "parameters": {"type": "object"}}
    assert check(Call("f", '{"a": %s}' % deep), [fn]).error == f"the arguments of f: {TOO_DEEP}"
