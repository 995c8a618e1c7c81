"""The agent loop and the synthetic GUI, proven apart from any model: a policy that reads the environment's truth
solves every episode; success comes from the screen's state; bad calls are errors the model sees next, within an
error budget; trajectories are written whole."""

import json

import pytest

from qwen2vl.agent import GuiEnv, oracle, run
from qwen2vl.agent.calls import Call, check, functions_of, render
from qwen2vl.agent.loop import recent_screens
from qwen2vl.agent.gui import TEMPLATES


def test_the_oracle_solves_100_of_100_episodes():
    env = GuiEnv()
    results = [run(oracle(env), env, seed=seed, max_steps=6) for seed in range(100)]
    assert all(t.success and t.reason == "success" for t in results)
    steps = {len(t.steps) for t in results}
    assert steps <= {1, 2, 3} and len(steps) == 3  # one- to three-step tasks
    assert {t.task.split()[0] for t in results} >= {"Click", "Tick", "Type", "Open", "Scroll"}


def test_success_is_read_from_the_screen_not_the_words():
    env = GuiEnv()
    claims = lambda messages, tools: '✿FUNCTION✿: done\n✿ARGS✿: {}'  # noqa: E731
    t = run(claims, env, "click", seed=1)
    assert not t.success and t.reason == "done" and len(t.steps) == 1


def test_the_wrong_order_does_not_count():
    env = GuiEnv()
    env.reset(4, "tick_then_press")
    option, button = env.goal[1], env.goal[2]
    widgets = {w.label: w for w in env.visible()}
    def click(label):
        x, y = widgets[label].center()
        return check(Call("click", json.dumps({"x": x, "y": y})), functions_of(env.tools))

    env.step(click(button))  # pressed before the tick: the task said "then"
    _, done, success = env.step(click(option))
    assert not success and not done


def test_bad_calls_are_observations_within_an_error_budget():
    env = GuiEnv()
    answers = iter(["I am not sure.", "✿FUNCTION✿: fly\n✿ARGS✿: {}", '✿FUNCTION✿: click\n✿ARGS✿: {"x": 5000, "y": 1}'])
    seen = []

    def policy(messages, tools):
        seen.append(messages[-1])
        return next(answers)

    t = run(policy, env, "click", seed=2, max_errors=3)
    assert t.reason == "errors" and len(t.steps) == 3 and not t.success
    assert "no function call" in t.steps[0].result
    assert "there is no function 'fly'" in t.steps[1].result
    assert "5000 is greater than the maximum of 999" in t.steps[2].result
    assert "no function call" in seen[1]["content"]  # the model saw its error next
    assert "there is no function 'fly'" in seen[2]["content"]


def test_every_template_is_reachable_and_the_trajectory_is_written(tmp_path):
    env = GuiEnv()
    for template in TEMPLATES:
        out = tmp_path / template
        t = run(oracle(env), env, template, seed=7, out=out)
        assert t.success
        lines = [json.loads(x) for x in (out / "trajectory.jsonl").read_text().splitlines()]
        assert lines[-1] == {"task": t.task, "success": True, "reason": "success", "steps": len(t.steps)}
        assert all((out / r["screenshot"]).is_file() for r in lines[:-1])
        page = (out / "index.html").read_text()
        assert page.count("<section>") == len(t.steps) and page.count("data:image/png;base64,") == len(t.steps)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TEMPLATES)  # no temporaries left


def test_a_conversation_ending_in_a_result_is_continued_not_closed(small_checkpoint):
    """The qwen format's results sit in the assistant's turn: the prompt ends there, open (``...✿RETURN✿``)."""
    from qwen2vl.processing.errors import MediaError
    from qwen2vl.processing.processor import Processor

    processor = Processor.from_pretrained(small_checkpoint)
    env = GuiEnv()
    t = run(oracle(env), env, "click", seed=0)
    plain = render(recent_screens(t.messages, 0), functions_of(env.tools), "qwen")
    text = processor.render(plain, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith(f"Pressed {env.goal[1]}. {env.describe()}\n✿RETURN✿") and text.count("<|im_start|>assistant") == 1
    with pytest.raises(MediaError, match="continue_final_message"):
        processor.render(plain[:2], continue_final_message=True)


def test_training_supervises_the_calls_and_never_the_results(small_checkpoint):
    from qwen2vl.processing.processor import Processor
    from qwen2vl.train.data import IGNORE, encode

    processor = Processor.from_pretrained(small_checkpoint)
    env = GuiEnv()
    t = run(oracle(env), env, "type_and_enter", seed=2)
    plain = render(recent_screens(t.messages, 1), functions_of(env.tools), "qwen")
    sample = encode(plain, "chat", processor)
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    runs, cur = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            cur.append(token)
        elif cur:
            runs.append(processor.tokenizer.decode(cur))
            cur = []
    calls = [f'✿FUNCTION✿: {s.call["name"]}\n✿ARGS✿: {s.call["arguments"]}\n✿RESULT✿' for s in t.steps]
    assert runs == [calls[0]] + [": \n" + c for c in calls[1:]]  # no result, no <|im_end|> after the last one


def test_older_screenshots_are_replaced_by_words():
    env = GuiEnv()
    t = run(oracle(env), env, "type_and_enter", seed=2)
    kept = recent_screens(t.messages, 2)
    images = [p for m in kept if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") == "image"]
    assert len(images) == 2 and images[-1] is t.messages[-1]["content"][0]
    assert sum(p.get("text") == "(an earlier screenshot)" for m in kept if isinstance(m.get("content"), list)
               for p in m["content"]) == 2


def test_the_agent_verb_runs_episodes_and_writes_their_pages(small_checkpoint, tmp_path, capsys):
    from qwen2vl.cli import main

    out = tmp_path / "episodes"
    assert main(["agent", str(small_checkpoint), "--task", "click", "--episodes", "2", "--max-steps", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert text.count("'Click ") == 2 and "success: " in text
    for k in range(2):
        lines = (out / f"episode_{k}" / "trajectory.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["task"].startswith("Click ") and (out / f"episode_{k}" / "index.html").exists()
    assert main(["agent", str(small_checkpoint), "--task", "fly"]) == 2
    assert "--task: 'fly' is not one of click" in capsys.readouterr().err
