"""Agents written by others, and our loop, through `qwen2vl serve`: qwen-agent's own FnCallAgent runs its tool loop
against the server (both through the server's ``tools`` and with qwen-agent rendering its own ✿FUNCTION✿ prompt),
its Python tools acting in the synthetic GUI; and our loop pointed at the server's URL acts exactly as it does on
the local model. The model is the tiny checkpoint: scripted (tests/test_serve_tools.py) where a client must see
a call, random where the two paths need only agree."""

import json

import pytest

import qwen2vl
from qwen2vl.agent import GuiEnv, run
from qwen2vl.agent.calls import Call, check, functions_of
from qwen2vl.agent.loop import first_message
from qwen2vl.serve.app import ServerConfig
from test_serve import KEY, Live
from test_serve_tools import Scripted


@pytest.fixture(scope="module")
def script(small_checkpoint):
    return Scripted(qwen2vl.load(small_checkpoint))


@pytest.fixture(scope="module")
def live(script):
    server = Live(script.assistant, ServerConfig(model_name="tiny", api_key=KEY, max_model_len=4096,
                                                 max_batch_size=1))  # fmt: skip
    yield server
    server.close()


def qwen_agent_tools(env, log):
    """The GUI's tools as qwen-agent tools: each call is checked, run in ``env`` and logged."""
    from qwen_agent.tools.base import BaseTool

    def make(fn):
        def call(self, params, **kwargs):
            c = check(Call(fn["name"], params if isinstance(params, str) else json.dumps(params)),
                      functions_of(env.tools))  # fmt: skip
            if c.error:
                return c.error
            obs, done, success = env.step(c)
            log.append((c.name, c.parsed, success))
            return obs.text
        return type(f"Gui_{fn['name']}", (BaseTool,), {"name": fn["name"], "description": fn["description"],
                                                       "parameters": fn.get("parameters", {}), "call": call})()
    return [make(t["function"]) for t in env.tools]


@pytest.mark.parametrize("raw", [True, False], ids=["server-tools", "qwen-agent-nous-prompt"])
def test_qwen_agents_fncall_agent_completes_a_tool_loop(live, script, tmp_path, raw, monkeypatch):
    """qwen-agent runs the loop: it asks the server, runs the Python tool the answer calls, sends the result back,
    and ends when the model replies without a call. ``server-tools``: the server renders the tools and parses the
    calls (use_raw_api); ``qwen-agent-nous-prompt``: qwen-agent renders its own (default, hermes) prompt and
    parses the text itself. (Its ``qwen`` prompt cannot stream from an OpenAI-style server in 0.0.34: the
    first chunk, the role with empty content, reaches its parser as an empty list, an IndexError.)"""
    import qwen_agent.settings
    from qwen_agent.agents import FnCallAgent

    monkeypatch.setattr(qwen_agent.settings, "MAX_LLM_CALL_PER_RUN", 4)
    env, log = GuiEnv(), []
    obs = env.reset(5, "click")
    right = env.oracle()
    obs.image.save(tmp_path / "screen.png")
    if raw:  # the server's format (qwen)
        script.say(f"✿FUNCTION✿: click\n✿ARGS✿: {right.arguments}\n✿RESULT✿", ": Done.")
    else:  # qwen-agent's default prompt, nous (hermes): qwen-agent writes the tools into the prompt and parses
        script.say('<tool_call>\n{"name": "click", "arguments": %s}\n</tool_call>' % right.arguments, "Done.")
    generate = {"use_raw_api": True} if raw else {}
    llm = {"model": "tiny", "model_type": "qwenvl_oai", "model_server": live.base + "/v1", "api_key": KEY,
           "generate_cfg": {**generate, "max_tokens": 200, "temperature": 0}}  # fmt: skip
    agent = FnCallAgent(function_list=qwen_agent_tools(env, log), llm=llm)
    question = [{"role": "user", "content": [{"image": str(tmp_path / "screen.png")},
                                             {"text": first_message(obs)["content"][1]["text"]}]}]
    *_, responses = agent.run(question)
    assert log == [("click", json.loads(right.arguments), True)]  # qwen-agent ran the call, and it did the task
    assert [m["role"] for m in responses] == ["assistant", "function", "assistant"]
    assert responses[0]["function_call"]["name"] == "click" and responses[1]["content"].startswith("Pressed ")
    assert responses[-1]["content"].lstrip(": ") == "Done."
    if raw:  # the second request carried the call and its result, which the server rendered into the prompt
        tokenizer = script.assistant.processor.tokenizer
        assert "✿RESULT✿: Pressed " in tokenizer.decode(script.prompts[-1][0])


def test_our_loop_through_the_server_acts_as_on_the_local_model(small_checkpoint):
    """The random model's own answers (no script): through the server, step for step what the local loop gets."""
    assistant = qwen2vl.load(small_checkpoint)
    server = Live(assistant, ServerConfig(model_name="tiny", api_key=KEY, max_model_len=4096))
    try:
        for template in ("click", "type_and_enter"):
            here = run(assistant, GuiEnv(), template, seed=3, max_steps=3)
            there = run(server.base, GuiEnv(), template, seed=3, max_steps=3, api_key=KEY)
            assert [(s.call, s.result) for s in there.steps] == [(s.call, s.result) for s in here.steps]
            assert (there.success, there.reason) == (here.success, here.reason)
    finally:
        server.close()
