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
from .calls import STOP_WORDS, Call, check, functions_of, parse, render, render_call

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
    messages: list[dict] = field(default_factory=list, repr=False)  # the conversation, OpenAI-style


MAX_CALL_TOKENS = 128  # what a model may write in one step


def oracle(env) -> Policy:
    """A policy that reads the environment's truth and writes its calls as a model of format ``qwen`` would."""
    def policy(messages, tools):
        c = env.oracle()
        return render_call({"name": c.name, "arguments": c.arguments}, "qwen")
    return policy


def run(model, env, task: str | None = None, *, seed: int = 0, max_steps: int = 10, max_errors: int = 3,
        fmt: str = "qwen", screens: int = 4, out: str | Path | None = None, api_key: str | None = None) -> Trajectory:
    """One episode of ``env`` (``task``: a template name, or the env's pick for ``seed``). ``model``: a loaded
    :class:`qwen2vl.Assistant`, the URL of an OpenAI-compatible server, or a policy function. The model sees the
    last ``screens`` screenshots (older ones become the words "an earlier screenshot"). ``api_key``: the server's."""
    policy = _policy(model, fmt, api_key)
    functions = functions_of(env.tools)
    obs = env.reset(seed, task)
    messages = [first_message(obs)]
    steps, errors, reason, success = [], 0, "max_steps", False
    for _ in range(max_steps):
        t0, screen = time.perf_counter(), obs.image
        text = policy(recent_screens(messages, screens), env.tools)
        head, calls = parse(text, fmt)
        call = check(calls[0], functions) if calls else None
        if call is None or call.error:
            errors += 1
            result = call.error if call else "no function call in the answer; call one of the tools"
            messages += [{"role": "assistant", "content": text}] if call is None else _turn(head, call, result)
            if call is None:
                messages.append({"role": "user", "content": result})
            steps.append(Step(text, _call_dict(call), result, time.perf_counter() - t0, screen))
            if errors >= max_errors:
                reason = "errors"
                break
            continue
        obs, done, success = env.step(call)
        messages += _turn(head, call, [{"type": "image", "image": obs.image}, {"type": "text", "text": obs.text}])
        steps.append(Step(text, _call_dict(call), obs.text, time.perf_counter() - t0, screen))
        if done:
            reason = "success" if success else "done"
            break
    trajectory = Trajectory(obs.task, steps, success, reason, messages)
    if out is not None:
        write(trajectory, out)
    return trajectory


def first_message(obs) -> dict:
    """The episode's opening user turn: the screenshot, the task, the screen's text."""
    return {"role": "user", "content": [{"type": "image", "image": obs.image},
                                        {"type": "text", "text": f"{obs.task}\n{obs.text}"}]}


def _turn(head: str, call: Call, result) -> list[dict]:
    """The answer (its text before the call, and the call) and the result, as OpenAI messages."""
    tool_call = {"id": call.id or "call_0", "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
    return [{"role": "assistant", "content": head or None, "tool_calls": [tool_call]},
            {"role": "tool", "tool_call_id": tool_call["id"], "content": result}]


def _call_dict(call: Call | None) -> dict | None:
    return None if call is None else {"name": call.name, "arguments": call.arguments, "error": call.error}


def recent_screens(messages: list[dict], keep: int) -> list[dict]:
    """``messages`` with all but the last ``keep`` screenshots replaced by the words "an earlier screenshot"."""
    seen, out = 0, []
    for m in reversed(messages):
        if isinstance(m.get("content"), list):
            parts = []
            for p in reversed(m["content"]):
                if p.get("type") == "image":
                    seen += 1
                    p = p if seen <= keep else {"type": "text", "text": "(an earlier screenshot)"}
                parts.append(p)
            m = {**m, "content": parts[::-1]}
        out.append(m)
    return out[::-1]


def _policy(model, fmt: str, api_key: str | None = None) -> Policy:
    if callable(model) and not hasattr(model, "stream"):
        return model
    if isinstance(model, str):  # an OpenAI-compatible server
        return _server_policy(model, fmt, api_key)

    def local(messages, tools):
        plain = render(messages, functions_of(tools), fmt)
        return model.chat(plain, max_new_tokens=MAX_CALL_TOKENS, temperature=0, stop=STOP_WORDS[fmt] or None)
    return local


def _server_policy(url: str, fmt: str, api_key: str | None = None) -> Policy:
    """Asks ``url``/v1/chat/completions (greedy), the calls it answers written back into ``fmt``'s text."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    base, model = url.rstrip("/").removesuffix("/v1"), []

    def ask(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, data, headers), timeout=600) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{base + path}: {e.code} {e.read().decode(errors='replace')[:500]}") from None

    def policy(messages, tools):
        if not model:  # the server's own model id, asked once
            model.append(ask("/v1/models")["data"][0]["id"])
        body = {"model": model[0], "messages": _wire(messages), "tools": tools, "max_tokens": MAX_CALL_TOKENS,
                "temperature": 0}  # fmt: skip
        message = ask("/v1/chat/completions", body)["choices"][0]["message"]
        calls = "".join("\n" + render_call(c, fmt) for c in message.get("tool_calls") or [])
        return (message.get("content") or "") + calls
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
