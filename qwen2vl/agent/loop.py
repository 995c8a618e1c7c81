"""The agent loop: observe -> model -> call -> execute -> observe, until the task succeeds, the model says it is
done, the step limit or the error budget. Each step is recorded (the model's text, the call, the result, the
time), and a trajectory is written atomically as JSONL, screenshots and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import new_directory
from .calls import Call, STOP_WORDS, check, functions_of, parse, render

Policy = Callable[[list[dict], list[dict]], str]  # (OpenAI messages, tools) -> the model's answer text


@dataclass
class Step:
    text: str  # what the model wrote
    call: dict | None  # name, arguments, error
    result: str  # the observation's text, or the error the model sees
    seconds: float
    image: object = field(default=None, repr=False)  # the screenshot the step acted on


@dataclass
class Trajectory:
    task: str
    steps: list[Step]
    success: bool
    reason: str  # success | done | max_steps | errors


def oracle(env) -> Policy:
    """A policy that reads the environment's truth and writes its calls as a model of format ``qwen`` would."""
    def policy(messages, tools):
        c = env.oracle()
        return f"✿FUNCTION✿: {c.name}\n✿ARGS✿: {c.arguments}"
    return policy


def run(model, env, task: str | None = None, *, seed: int = 0, max_steps: int = 10, max_errors: int = 3,
        fmt: str = "qwen", out: str | Path | None = None) -> Trajectory:
    """One episode of ``env`` (``task``: a template name, or the env's pick for ``seed``). ``model``: a loaded
    :class:`qwen2vl.Assistant`, the URL of an OpenAI-compatible server, or a policy function."""
    policy = _policy(model, fmt)
    functions = functions_of(env.tools)
    obs = env.reset(seed, task)
    messages = [{"role": "user", "content": [{"type": "image", "image": obs.image},
                                             {"type": "text", "text": obs.task}]}]
    steps, errors, reason, success = [], 0, "max_steps", False
    for _ in range(max_steps):
        t0, screen = time.perf_counter(), obs.image
        text = policy(messages, env.tools)
        _, calls = parse(text, fmt)
        call = check(calls[0], functions) if calls else None
        if call is None or call.error:
            errors += 1
            result = call.error if call else "no function call in the answer; call one of the tools"
            messages += [{"role": "assistant", "content": text}] if call is None else _turn(text, call, result)
            if call is None:
                messages.append({"role": "user", "content": result})
            steps.append(Step(text, _call_dict(call), result, time.perf_counter() - t0, screen))
            if errors >= max_errors:
                reason = "errors"
                break
            continue
        obs, done, success = env.step(call)
        messages += _turn(text, call, [{"type": "image", "image": obs.image}, {"type": "text", "text": obs.text}])
        steps.append(Step(text, _call_dict(call), obs.text, time.perf_counter() - t0, screen))
        if done:
            reason = "success" if success else "done"
            break
    trajectory = Trajectory(obs.task, steps, success, reason)
    if out is not None:
        write(trajectory, out)
    return trajectory


def _turn(text: str, call: Call, result) -> list[dict]:
    head = parse(text, "qwen")[0] if "✿" in text else parse(text, "hermes")[0]
    tool_call = {"id": call.id or "call_0", "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
    return [{"role": "assistant", "content": head or None, "tool_calls": [tool_call]},
            {"role": "tool", "tool_call_id": tool_call["id"], "content": result}]


def _call_dict(call: Call | None) -> dict | None:
    return None if call is None else {"name": call.name, "arguments": call.arguments, "error": call.error}


def _policy(model, fmt: str) -> Policy:
    if callable(model) and not hasattr(model, "stream"):
        return model
    if isinstance(model, str):  # an OpenAI-compatible server
        return _server_policy(model, fmt)

    def local(messages, tools):
        plain = render(messages, functions_of(tools), fmt)
        return model.chat(plain, max_new_tokens=128, stop=STOP_WORDS[fmt] or None)
    return local


def _server_policy(url: str, fmt: str) -> Policy:
    import urllib.request

    def policy(messages, tools):
        body = {"model": "default", "messages": _wire(messages), "tools": tools, "max_tokens": 128}
        req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            message = json.load(r)["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        return (message.get("content") or "") + "".join(
            f"\n✿FUNCTION✿: {c['function']['name']}\n✿ARGS✿: {c['function']['arguments']}" for c in calls)
    return policy


def _wire(messages: list[dict]) -> list[dict]:
    """Screenshots as PNG data URLs, as the OpenAI wire format carries images."""
    def part(p):
        if p.get("type") == "image" and not isinstance(p["image"], str):
            return {"type": "image_url", "image_url": {"url": _data_url(p["image"])}}
        return p
    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write(trajectory: Trajectory, out: str | Path) -> Path:
    """``out``/trajectory.jsonl (a line a step, then a summary line), step_N.png, index.html; all or nothing."""
    from ..processing.grounding import Box, draw_boxes

    with new_directory(out, replace=True) as tmp:
        lines, rows = [], []
        for i, s in enumerate(trajectory.steps):
            record = {k: v for k, v in asdict(s).items() if k != "image"}
            if s.image is not None:
                shot = s.image
                if s.call and s.call["name"] == "click" and not s.call["error"]:
                    a = json.loads(s.call["arguments"])
                    x, y = a["x"] * shot.width / 1000, a["y"] * shot.height / 1000
                    shot = draw_boxes(shot, [Box(x - 6, y - 6, x + 6, y + 6, "click")], colours=["red"])
                shot.save(tmp / f"step_{i}.png")
                record["screenshot"] = f"step_{i}.png"
            lines.append(json.dumps(record, ensure_ascii=False))
            img = f'<img src="{_data_url(shot)}">' if s.image is not None else ""
            rows.append(f"<section><h2>Step {i + 1} ({s.seconds:.2f} s)</h2>{img}<pre>{html.escape(s.text)}</pre>"
                        f"<p><b>call</b> {html.escape(json.dumps(s.call, ensure_ascii=False))}</p>"
                        f"<p><b>result</b> {html.escape(s.result)}</p></section>")
        summary = {"task": trajectory.task, "success": trajectory.success, "reason": trajectory.reason,
                   "steps": len(trajectory.steps)}
        (tmp / "trajectory.jsonl").write_text("\n".join(lines + [json.dumps(summary)]) + "\n", encoding="utf-8")
        title = html.escape(trajectory.task)
        (tmp / "index.html").write_text(
            f"<!doctype html><meta charset=utf-8><title>{title}</title><h1>{title}</h1>"
            f"<p>{'succeeded' if trajectory.success else 'failed'} ({trajectory.reason}) in "
            f"{len(trajectory.steps)} steps</p>" + "".join(rows), encoding="utf-8")
    return Path(out)
