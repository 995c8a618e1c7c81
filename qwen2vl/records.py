"""Data files of records, one JSON object a line, as training and evaluation read them; relative media paths in
a record are relative to its file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .processing.chat import part_kind


class DataError(ValueError):
    """A data file or record that cannot be used, named by file and line."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-empty line; a line that is not a JSON object is a DataError."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: a record is a JSON object")
            yield n, record


def with_root(messages: list[dict], root: Path) -> list[dict]:
    """The messages with relative media paths made relative to ``root`` (a data file's directory)."""

    def rooted(part: dict) -> dict:
        kind = part_kind(part)
        source = part.get(kind) if kind in ("image", "video") else None
        if isinstance(source, str) and "://" not in source and not source.startswith(("data:", "/")):
            return {**part, kind: str(root / source)}
        return part

    return [
        m if isinstance(m["content"], str) else {**m, "content": [rooted(p) for p in m["content"]]}
        for m in messages
    ]
