"""The server's function calling (OpenAI ``tools``, ``tool_choice``, ``tool_calls``), live on 127.0.0.1 and driven by
the official openai client. The model is the tiny random checkpoint made to write a scripted answer (its logits
replaced, token by token), so that every path of the parser and the stream is reached on purpose; the prompt it
reads is checked against qwen2vl.agent.calls.render, whose bytes tests/test_agent_calls.py checks against
qwen-agent."""

import json

import pytest
import torch

import qwen2vl
from qwen2vl.agent.calls import functions_of, render
from qwen2vl.serve.app import ServerConfig
from test_serve import KEY, Live, error_of

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Paris"}'


class Scripted:
    """Makes the model write ``self.text`` (then its eos), whatever the prompt: one request at a time."""

    def __init__(self, assistant):
        self.assistant, self.tokenizer = assistant, assistant.processor.tokenizer
        self.eos = assistant.model.config.eos_token_ids[0]
        self.ids, self.answers, self.k, self.prompts = [], [[]], 0, []
        model = assistant.model
        model.prefill, model.decode = self._wrap(model.prefill, True), self._wrap(model.decode, False)

    def say(self, *texts: str) -> None:
        """The answer to the next request; several: one per request, in turn (the last one from then on)."""
        self.answers = [self.tokenizer.encode(t) for t in texts]
        self.ids = self.answers[0]

    def _wrap(self, run, first: bool):
        def call(*args, **kwargs):
            logits, cache = run(*args, **kwargs)
            if first:
                self.ids = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                self.k = 0
                self.prompts.append(args[0].tolist() if torch.is_tensor(args[0]) else None)
            token = self.ids[self.k] if self.k < len(self.ids) else self.eos
            self.k += 1
            logits = torch.full_like(logits, -100.0)
            logits[:, token] = 100.0
            return logits, cache
        return call


@pytest.fixture(scope="module")
def script(small_checkpoint):
    return Scripted(qwen2vl.load(small_checkpoint))


def server(script, fmt):
    config = ServerConfig(model_name="tiny", api_key=KEY, max_model_len=2048, max_batch_size=1, tool_format=fmt)
    return Live(script.assistant, config)


@pytest.fixture(scope="module")
def live(script):
    s = server(script, "qwen")
    yield s
    s.close()


@pytest.fixture(scope="module")
def hermes(script):
    s = server(script, "hermes")
    yield s
    s.close()


def ask(live, script, answer, stream=False, **kw):
    script.say(answer)
    body = {"model": "tiny", "messages": kw.pop("messages", ASK), "tools": kw.pop("tools", WEATHER),
            "max_tokens": kw.pop("max_tokens", 200), "temperature": 0, **kw}
    if stream:
        return list(live.client.chat.completions.create(stream=True, **body))
    return live.client.chat.completions.create(**body)


def streamed(chunks):
    """(content, [(name, arguments)], finish_reason) put together from the deltas, as a client does."""
    content, calls, finish = "", {}, None
    for c in chunks:
        d = c.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:
            calls.setdefault(t.index, ["", ""])
            calls[t.index][0] += t.function.name or ""
            calls[t.index][1] += t.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return content, [tuple(calls[k]) for k in sorted(calls)], finish


def test_a_call_comes_back_as_tool_calls_plain_and_streamed(live, script):
    answer = "I will look it up.\n" + CALL + "\n✿RESULT✿: the model must not write this"
    r = ask(live, script, answer)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert m.content == "I will look it up."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == \
        [("get_weather", {"city": "Paris"})]
    assert m.tool_calls[0].id.startswith("call_") and m.tool_calls[0].type == "function"
    content, calls, finish = streamed(ask(live, script, answer, stream=True))
    assert (content, calls, finish) == ("I will look it up.", [("get_weather", '{"city": "Paris"}')], "tool_calls")


def test_the_prompt_is_the_tools_rendered_into_the_system_turn(live, script):
    ask(live, script, "Sunny.")
    plain = render(ASK, functions_of(WEATHER), "qwen")
    expected = script.assistant.processor(plain)["input_ids"][0].tolist()
    assert script.prompts[-1][0][-len(expected):] == expected


def test_several_calls_and_parallel_tool_calls_false(live, script):
    two = CALL + '\n✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Rome"}'
    r = ask(live, script, two)
    assert [json.loads(c.function.arguments)["city"] for c in r.choices[0].message.tool_calls] == ["Paris", "Rome"]
    r = ask(live, script, two, parallel_tool_calls=False)
    assert [json.loads(c.function.arguments)["city"] for c in r.choices[0].message.tool_calls] == ["Paris"]
    content, calls, _ = streamed(ask(live, script, two, stream=True))
    assert content == "" and [json.loads(a)["city"] for _, a in calls] == ["Paris", "Rome"]


def test_plain_answers_and_malformed_calls_stay_text(live, script):
    r = ask(live, script, "It is sunny in Paris.")
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == ("It is sunny in Paris.", None)
    assert r.choices[0].finish_reason == "stop"
    broken = "Hmm.\n✿FUNCTION✿: get_weather\nno arguments"
    r = ask(live, script, broken)
    assert r.choices[0].message.content == broken and r.choices[0].finish_reason == "stop"
    content, calls, finish = streamed(ask(live, script, broken, stream=True))
    assert (content, calls, finish) == (broken, [], "stop")
    r = ask(live, script, CALL, max_tokens=8)  # cut off inside the call: no call, the text as it stands
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None


def test_tool_choice_none_required_and_named(live, script):
    r = ask(live, script, "Let me see.\n" + CALL, tool_choice="none")
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == ("Let me see.", None)
    # required: the answer is opened with the marker; the model writes the rest of the call
    r = ask(live, script, 'get_weather\n✿ARGS✿: {"city": "Oslo"}', tool_choice="required")
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    # named: opened with the call of that function; the arguments are held to one JSON object
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = ask(live, script, '{"city": "Bergen"} and then some', tool_choice=named)
    assert r.choices[0].finish_reason == "tool_calls"
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Bergen"}
    content, calls, finish = streamed(ask(live, script, '{"city": "Bergen"}', stream=True, tool_choice=named))
    assert (content, calls, finish) == ("", [("get_weather", '{"city": "Bergen"}')], "tool_calls")


def test_a_history_of_calls_and_results_continues_the_assistant_turn(live, script):
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = ask(live, script, ": It is sunny.", messages=history)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    plain = render(history, functions_of(WEATHER), "qwen")
    expected = script.assistant.processor(plain, False, continue_final_message=True)["input_ids"][0].tolist()
    assert script.assistant.processor.tokenizer.decode(expected).endswith("✿RESULT✿: sunny, 21 C\n✿RETURN✿")
    assert script.prompts[-1][0][-len(expected):] == expected
    content, _, _ = streamed(ask(live, script, ": It is sunny.", stream=True, messages=history))
    assert content == "It is sunny."


def test_the_hermes_format(hermes, script):
    answer = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    r = ask(hermes, script, answer)
    m = r.choices[0].message
    assert m.content == "Checking." and r.choices[0].finish_reason == "tool_calls"
    assert (m.tool_calls[0].function.name, m.tool_calls[0].function.arguments) == ("get_weather", '{"city": "Lima"}')
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = ask(hermes, script, '{"city": "Quito"}', tool_choice=named)
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Quito"}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "rain"}]
    r = ask(hermes, script, "Rain.", messages=history)
    assert r.choices[0].message.content == "Rain."
    plain = render(history, functions_of(WEATHER), "hermes")
    said = "".join(p["text"] for p in plain[-1]["content"])
    assert plain[-1]["role"] == "user" and said == "<tool_response>\nrain\n</tool_response>"


@pytest.mark.parametrize("body, where", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": WEATHER, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": WEATHER, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": WEATHER, "response_format": {"type": "json_object"}}, "json_object cannot be combined"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "need the request's tools"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"function": {"name": 3}}]}], "tools": WEATHER},
     "tool_calls[0]"),
    ({"tools": WEATHER, "messages": [{"role": "tool", "content": "x"}]}, "must follow the assistant"),
])  # fmt: skip
def test_bad_tools_and_histories_are_a_400_naming_the_field(live, body, where):
    r = live.post({"messages": ASK, "max_tokens": 4, **body})
    assert where in error_of(r, 400)
