"""The browser environment: the GUI's tasks as pages on 127.0.0.1 in headless Chromium (Selenium, Debian's
chromium-driver). Clicks are pointer events at coordinates, success is read from the page's DOM; an oracle that
reads the page's truth solves every episode, and wrong actions fail as they fail in the PIL screen."""

import json

import pytest

from qwen2vl.agent import TEMPLATES, GuiEnv, oracle, run
from qwen2vl.agent.calls import Call

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def env():
    from qwen2vl.agent.browser import BrowserEnv

    with BrowserEnv() as e:
        yield e


def click(x, y):
    c = Call("click", json.dumps({"x": x, "y": y}))
    c.parsed = {"x": x, "y": y}
    return c


def test_the_screenshot_is_the_viewport_and_the_page_lays_out_as_the_pil_screen(env):
    obs = env.reset(3, "tick_then_press")
    assert obs.image.size == (448, 448)
    gui = GuiEnv()
    gui.reset(3, "tick_then_press")
    assert obs.task == gui.task
    shown = {(w.kind, w.label): w.box for w in env.visible()}
    for w in gui.visible():
        assert shown[(w.kind, w.label)] == w.box, w


def test_the_oracle_solves_every_episode(env):
    """40 seeded episodes (the five templates, each several times; 100 took 70 s of the suite and found nothing
    more)."""
    results = [run(oracle(env), env, seed=s) for s in range(40)]
    assert all(t.success for t in results), [(t.task, t.reason) for t in results if not t.success]
    assert {t.task.split()[0] for t in results} >= {"Click", "Tick", "Type", "Open", "Scroll"}


def test_success_is_the_dom_state_not_the_words(env):
    env.reset(3, "tick_then_press")
    target = env.goal[2]
    button = next(w for w in env.visible() if w.kind == "button" and w.label == target)
    obs, done, success = env.step(click(*button.center()))  # pressed before ticking: the order is wrong
    assert obs.text.startswith(f"Pressed {target}. ") and not success
    assert env.state.pressed == [(target, frozenset())]
    _, done, success = env.step(Call("done", "{}"))
    assert done and not success
    env.reset(0, "click")
    obs, done, success = env.step(click(999, 999))
    assert obs.text.startswith("Nothing there. ") and not done


def test_menu_typing_and_scrolling_act_on_the_page(env):
    env.reset(5, "type_and_enter")
    field = next(w for w in env.visible() if w.kind == "field")
    obs, _, _ = env.step(Call("type", "{}", parsed={"text": "x"}))
    assert obs.text.startswith("No text field has the focus. ")
    env.step(click(*field.center()))
    env.step(Call("type", "{}", parsed={"text": env.goal[1]}))
    assert env.state.text == env.goal[1]
    _, done, success = env.step(Call("key", "{}", parsed={"name": "Enter"}))
    assert done and success
    env.reset(7, "scroll_and_click")
    obs, _, _ = env.step(Call("scroll", "{}", parsed={"direction": "down"}))
    assert env.state.offset == 1 and obs.text.startswith(f"The list shows {', '.join(env.items[1:4])}. ")
    assert [w.label for w in env.visible() if w.kind == "item"] == env.items[1:4]


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_template_in_the_browser_agrees_with_the_pil_screen(env, template):
    """The oracle's calls, replayed in the PIL screen, succeed there too: the two realise the same task."""
    t = run(oracle(env), env, template, seed=11)
    gui = GuiEnv()
    gui.reset(11, template)
    for step in t.steps:
        call = Call(step.call["name"], step.call["arguments"], parsed=json.loads(step.call["arguments"]))
        _, done, success = gui.step(call)
    assert t.success and success
