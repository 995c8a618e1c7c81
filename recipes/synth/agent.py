"""GUI episodes for the agent stage, and the success rate that scores it.

An episode is what ``qwen2vl.agent.run`` records when the oracle policy (which reads the environment's truth) acts
in the synthetic GUI: the screenshot and the task, then each call and its result, in the ``qwen`` function-call
format, rendered by ``qwen2vl.agent.calls.render`` exactly as the loop renders it for a model, and a last reply
"Done.". The training library supervises the assistant's calls and reply and leaves the results out of the loss. Training seeds count up from 0;
held-out seeds from ``HELD_OUT`` up, so that no held-out screen was ever trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qwen2vl.agent import GuiEnv, oracle, run
from qwen2vl.agent.calls import functions_of, render
from qwen2vl.agent.gui import TEMPLATES

HELD_OUT = 10**6
# click and tick_then_press ask which button carries a word: the only templates that need reading the screen
TRAIN_MIX = {"click": 2, "tick_then_press": 2, "type_and_enter": 2, "menu": 1.5, "scroll_and_click": 1.5}
ONE_STEP = ("click",)
DONE = "Done."


def episode_record(env: GuiEnv, seed: int, template: str, screens: Path) -> dict:
    """One oracle episode as a training record; its screenshots are written as PNG files to ``screens``."""
    trajectory = run(oracle(env), env, template, seed=seed)
    assert trajectory.success, (seed, template)
    messages = trajectory.messages
    last = messages[-1]  # the screen after the last action is never shown to the model: its words are enough
    messages[-1] = {**last, "content": [p for p in last["content"] if p.get("type") != "image"]}
    # and, as a Qwen-Agent conversation ends, a reply once the results say the task is done (run() stops at the
    # success before asking; a client that asks, such as Qwen-Agent's own loop, gets this and ends there)
    messages.append({"role": "assistant", "content": DONE})
    plain, k = render(messages, functions_of(env.tools), "qwen"), 0
    for m in plain:
        for p in m["content"]:
            if p.get("type") == "image":
                name = f"{seed}_{k}.png"
                p["image"].save(screens / name)
                p["image"], k = f"{screens.name}/{name}", k + 1
    return {"task": f"agent-{template}", "messages": plain}


def episodes(dest: Path, count: int, seed: int = 0, mix: dict | None = None) -> Path:
    """``count`` training episodes (seeds ``seed`` .. ``seed + count - 1``, templates drawn by ``mix``) to
    ``dest``/agent.jsonl, screenshots in ``dest``/screens."""
    mix = mix or TRAIN_MIX
    screens = dest / "screens"
    screens.mkdir(parents=True, exist_ok=True)
    rng, env, lines = random.Random(seed), GuiEnv(), []
    names = list(mix)
    for s in range(seed, seed + count):
        template = rng.choices(names, weights=[mix[n] for n in names])[0]
        lines.append(json.dumps(episode_record(env, s, template, screens)))
    path = dest / "agent.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def success_rates(model, count: int = 200, start: int = HELD_OUT, max_steps: int = 6, env=None) -> dict:
    """The model's success on ``count`` held-out episodes (templates in turn) in ``env`` (default: the synthetic
    GUI): per template, and for one-step and for multi-step tasks."""
    env, wins = env or GuiEnv(), {t: [] for t in TEMPLATES}
    for i in range(count):
        template = TEMPLATES[i % len(TEMPLATES)]
        wins[template].append(run(model, env, template, seed=start + i, max_steps=max_steps).success)
    rate = lambda xs: round(sum(xs) / max(len(xs), 1), 4)  # noqa: E731
    one = [w for t in ONE_STEP for w in wins[t]]
    multi = [w for t in TEMPLATES if t not in ONE_STEP for w in wins[t]]
    return {"episodes": count, "one_step": rate(one), "multi_step": rate(multi),
            "templates": {t: rate(w) for t, w in wins.items()}}
