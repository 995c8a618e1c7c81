"""What ``GET /metrics`` reports, in Prometheus' text format (version 0.0.4). Counters are plain ints under one
lock: the engine thread and the request threads share them."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

WINDOW_S = 10.0


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[int] = Counter()  # by HTTP status
        self.tokens = 0
        self.recent: deque[float] = deque()  # when each token of the last WINDOW_S seconds came

    def request(self, status: int) -> None:
        with self.lock:
            self.requests[status] += 1

    def token(self) -> None:
        now = time.monotonic()
        with self.lock:
            self.tokens += 1
            self.recent.append(now)
            while self.recent[0] < now - WINDOW_S:
                self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            return sum(t >= now - WINDOW_S for t in self.recent) / WINDOW_S

    def render(self, engine) -> str:
        with self.lock:
            by_status = sorted(self.requests.items())
            tokens = self.tokens
        lines = [
            "# HELP qwen2vl_requests_total HTTP requests answered, by status code.",
            "# TYPE qwen2vl_requests_total counter",
            *(f'qwen2vl_requests_total{{status="{status}"}} {n}' for status, n in by_status),
        ]
        gauges = [
            ("queue_depth", "gauge", "Requests waiting for a batch row.", engine.waiting.qsize()),
            ("running_rows", "gauge", "Sequences decoding now.", engine.running),
            ("generated_tokens_total", "counter", "Tokens generated since start.", tokens),
            ("tokens_per_second", "gauge", f"Tokens generated per second over the last {WINDOW_S:g} s.",
             round(self.tokens_per_second(), 3)),
            ("engine_restarts_total", "counter", "Times the engine rebuilt its batch after a failed recovery.",
             engine.restarts),
            ("engine_alive", "gauge", "1 while the engine thread runs, else 0.", int(engine.alive)),
        ]
        for name, kind, help, value in gauges:
            lines += [f"# HELP qwen2vl_{name} {help}", f"# TYPE qwen2vl_{name} {kind}", f"qwen2vl_{name} {value}"]
        return "\n".join(lines) + "\n"
