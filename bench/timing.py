"""The benchmarks' one timing rule: a warm-up call, then the median wall time of ``repeats`` calls."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median seconds of ``repeats`` calls after one warm-up, the last call's result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result
