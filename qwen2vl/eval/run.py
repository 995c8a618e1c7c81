"""``qwen2vl eval MODEL --data FILE.jsonl``: answer every record, score it, report per task.

A record: ``{"task": "colour", "metric": "exact", "messages": [...user turn(s)...], "answer": "red"}`` (or
``"answers": [...]`` for several references; ``metric`` defaults to the ``--metric`` given, else ``exact``). Media
paths are relative to the data file. The report is a JSON file (per task and per record, written atomically) and
a markdown table; for the ``box`` metric it also holds each answer's IoU and the task's mean IoU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import write_text
from ..processing.chat import check_messages
from ..progress import end as end_progress
from ..progress import show
from ..records import read_jsonl, with_root
from .metrics import SCORERS, box_iou


def evaluate(assistant, data: str | Path, metric: str | None = None, *, max_new_tokens: int = 64,
             limit: int | None = None, progress: bool = True) -> dict:  # fmt: skip
    if metric is not None and metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(SCORERS)}")
    root = Path(data).resolve().parent
    records = list(read_jsonl(data))[:limit]
    if not records:
        raise ValueError(f"{data}: no records")
    results, t0 = [], time.perf_counter()
    for k, (line, record) in enumerate(records, 1):
        where = f"{data}:{line}"
        reference = record.get("answers", record.get("answer"))
        if reference is None:
            raise ValueError(f"{where}: needs 'answer' or 'answers'")
        name = record.get("metric") or metric or "exact"
        if name not in SCORERS:
            raise ValueError(f"{where}: unknown metric {name!r}")
        messages = with_root(check_messages(record.get("messages"), where), root)
        prediction = assistant.chat(messages, max_new_tokens=max_new_tokens)
        score = SCORERS[name](prediction, reference)
        results.append({"line": line, "task": record.get("task", "all"), "metric": name, "prediction": prediction,
                        "reference": reference, "score": score})  # fmt: skip
        if name == "box":
            results[-1]["iou"] = round(box_iou(prediction, reference), 4)
        if progress:
            elapsed = time.perf_counter() - t0
            mean = sum(r["score"] for r in results) / len(results)
            show(f"{k}/{len(records)} score {mean:.3f} ETA {elapsed / k * (len(records) - k):.0f} s", k, len(records))
    if progress:
        end_progress()
    tasks = {}
    for task in sorted({r["task"] for r in results}):
        mine = [r for r in results if r["task"] == task]
        tasks[task] = {"metric": mine[0]["metric"], "n": len(mine), "score": sum(r["score"] for r in mine) / len(mine)}
        if ious := [r["iou"] for r in mine if "iou" in r]:
            tasks[task]["mean_iou"] = round(sum(ious) / len(mine), 4)
    return {"data": str(data), "n": len(results), "seconds": round(time.perf_counter() - t0, 2), "tasks": tasks,
            "records": results}


def markdown(report: dict) -> str:
    rows = [f"| {name} | {t['metric']} | {t['n']} | {100 * t['score']:.1f}% |" for name, t in report["tasks"].items()]
    return "\n".join(["| task | metric | n | score |", "|---|---|---:|---:|", *rows])


def write_report(report: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(report, indent=1, ensure_ascii=False))
