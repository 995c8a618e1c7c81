"""The progress line of long jobs (training, evaluation): redrawn in place on a terminal; in a log file or a pipe,
a plain line once every tenth of the way, so that a log holds ten lines, not thousands of carriage returns."""

from __future__ import annotations

import sys


def show(text: str, done: int, total: int, stream=None) -> None:
    """Report that ``done`` of ``total`` units are done; ``text`` is the whole line."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        print(f"\r{text}", end="", file=stream, flush=True)
    elif done >= total or done * 10 // max(total, 1) != (done - 1) * 10 // max(total, 1):
        print(text, file=stream, flush=True)


def end(stream=None) -> None:
    """Close a live line (a newline after the last redraw); nothing in a log."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        print(file=stream, flush=True)
