"""Evaluation: the benchmark scorers (metrics.py) and a runner over a JSONL of questions (run.py)."""
