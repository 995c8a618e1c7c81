"""The visual agent: function calls (calls.py), environments to act in (gui.py), and the loop that runs them."""

from .gui import GuiEnv, Observation
from .loop import Step, Trajectory, oracle, run

__all__ = ["GuiEnv", "Observation", "Step", "Trajectory", "oracle", "run"]
