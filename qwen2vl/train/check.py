"""``qwen2vl data check FILE``: every record validated (format, placeholder counts, media readable, length within
the row budget), a summary, and one sample printed with its supervised tokens marked."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

from ..processing.processor import Processor
from ..records import DataError, read_jsonl
from .data import IGNORE, encode, to_messages


def render_supervised(sample, tokenizer) -> str:
    """The sample's text with supervised spans in [[...]] and each run of vision placeholders shortened."""
    out = []
    pairs = zip(sample.input_ids.tolist(), sample.labels.tolist())
    for supervised, run in groupby(pairs, key=lambda pair: pair[1] != IGNORE):
        text = tokenizer.decode([i for i, _ in run], skip_special_tokens=False)
        for pad in ("<|image_pad|>", "<|video_pad|>"):
            if (n := text.count(pad)) > 1:
                text = text.replace(pad * n, f"{pad}x{n}")
        out.append(f"[[{text}]]" if supervised else text)
    return "".join(out)


def check_file(path: str, model: str, batch_tokens: int, show: int = 1) -> int:
    """0 when every record is usable, 1 otherwise (each problem printed with its line). A file that does not read
    as JSON lines raises (DataError, OSError)."""
    processor = Processor.from_pretrained(model)
    root = Path(path).resolve().parent
    problems, shown, lengths = [], None, []
    records = list(read_jsonl(path))  # an unreadable file or a line that is not JSON: an error before any check
    for line, record in records:
        where = f"{path}:{line}"
        try:
            sample = encode(*to_messages(record, where, root), processor, where)
            if len(sample) > batch_tokens:
                raise DataError(f"{where}: {len(sample)} tokens, over batch_tokens={batch_tokens}")
            if sample.supervised == 0:
                raise DataError(f"{where}: no supervised token")
        except ValueError as e:  # DataError and MediaError
            problems.append(str(e))
            continue
        lengths.append(len(sample))
        if line == show or shown is None:
            shown = (line, sample)
    for p in problems:
        print(p)
    print(f"{len(lengths)} of {len(records)} records usable" + (f"; tokens per sample {min(lengths)}-{max(lengths)}, "
          f"mean {sum(lengths) / len(lengths):.0f}" if lengths else ""))  # fmt: skip
    if shown:
        print(f"\nline {shown[0]}, supervised tokens in [[...]]:\n{render_supervised(shown[1], processor.tokenizer)}")
    return 0 if not problems else 1
