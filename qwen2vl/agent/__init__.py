"""The visual agent: function calls (calls.py), environments to act in (gui.py, browser.py), and the loop that runs
them (loop.py)."""

import contextlib

from .gui import TEMPLATES, GuiEnv, Observation
from .loop import Step, Trajectory, oracle, run

ENVIRONMENTS = ("gui", "browser")


@contextlib.contextmanager
def environment(name: str):
    """``gui`` (PIL) or ``browser`` (headless Chromium, closed on leaving the ``with``)."""
    if name == "gui":
        yield GuiEnv()
    elif name == "browser":
        from .browser import BrowserEnv

        with BrowserEnv() as env:
            yield env
    else:
        raise ValueError(f"environment {name!r}: expected one of {', '.join(ENVIRONMENTS)}")


__all__ = ["ENVIRONMENTS", "TEMPLATES", "GuiEnv", "Observation", "Step", "Trajectory", "environment", "oracle", "run"]
