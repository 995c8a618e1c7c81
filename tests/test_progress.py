"""The progress line: redrawn in place on a terminal, ten plain lines in a log."""

import io

from qwen2vl.progress import end, show


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_line_every_tenth():
    log = io.StringIO()
    for k in range(1, 2701):
        show(f"step {k}/2700", k, 2700, log)
    end(log)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines == [f"step {k}/2700" for k in range(270, 2701, 270)]


def test_short_jobs_log_every_unit_once():
    log = io.StringIO()
    for k in range(1, 4):
        show(f"{k}/3", k, 3, log)
    assert log.getvalue().splitlines() == ["1/3", "2/3", "3/3"]


def test_a_terminal_gets_one_line_redrawn():
    tty = Terminal()
    for k in range(1, 6):
        show(f"{k}/5", k, 5, tty)
    end(tty)
    assert tty.getvalue() == "".join(f"\r{k}/5" for k in range(1, 6)) + "\n"
