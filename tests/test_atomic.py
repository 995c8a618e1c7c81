"""Atomic writes: an error midway leaves the previous output and no temporary behind, and what is written gets
the modes a plain open/mkdir would give under the umask, not tempfile's private 0600/0700: an exported model, a
checkpoint, a report or a drawn picture is readable by whoever could read a file written the ordinary way."""

import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen2vl import atomic
from qwen2vl.eval.run import write_report
from qwen2vl.processing.grounding import Box, draw_boxes
from qwen2vl.train.checkpoint import save_checkpoint
from qwen2vl.train.export import export
from recipes.synth.scratch import init_model_dir

TEXTS = ["A red circle and two blue squares.", "What colour is the shape?", "red"] * 10


@pytest.fixture(params=[0o022, 0o077, 0o002])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def check_tree(root: Path, mask: int) -> int:
    """Every directory and file under root (root included) has the plain mode; returns how many were checked."""
    paths = [root, *root.rglob("*")]
    for p in paths:
        assert mode(p) == (0o777 if p.is_dir() else 0o666) & ~mask, f"{p}: {oct(mode(p))}"
    return len(paths)


def test_umask_is_read_without_being_changed(mask, monkeypatch):
    assert atomic.umask() == mask
    assert os.umask(mask) == mask  # still set
    # where /proc cannot tell (not Linux), the fallback reads it too and puts it back
    monkeypatch.setattr(atomic, "Path", lambda *_: (_ for _ in ()).throw(OSError("no /proc")))
    assert atomic.umask() == mask
    assert os.umask(mask) == mask


def test_everything_written_atomically_gets_the_plain_modes(mask, tiny, tmp_path):
    model = init_model_dir(tmp_path / "init", TEXTS, vocab_size=300)  # tokenizer, config, weights: a directory
    assert check_tree(model, mask) >= 5
    tiny.save_pretrained(tmp_path / "saved")  # weights and config files written one by one
    assert check_tree(tmp_path / "saved", mask) >= 3
    out = tmp_path / "run"
    point = save_checkpoint(out, 1, tiny, {"state": {}}, {"step": 1, "config": {"model": str(model)}})
    check_tree(point, mask)
    assert mode(out / "latest") == 0o666 & ~mask
    check_tree(export(out, tmp_path / "exported", base=model), mask)
    check_tree(export(out, tmp_path / "exported16", base=model, dtype=torch.bfloat16), mask)
    write_report({"tasks": {}}, tmp_path / "report.json")
    assert mode(tmp_path / "report.json") == 0o666 & ~mask
    draw_boxes(Image.new("RGB", (32, 32)), [Box(2, 2, 20, 20)], tmp_path / "boxes.png")
    assert mode(tmp_path / "boxes.png") == 0o666 & ~mask


def test_a_file_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    atomic.write_text(target, "old")

    def half(tmp):
        tmp.write_bytes(b"ne")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic.write_file(target, half)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic.write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "model"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic.new_directory(dest) as tmp:
            (tmp / "a.json").write_text("{}")
            raise RuntimeError("midway")
    assert list(tmp_path.iterdir()) == []
    with atomic.new_directory(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest and not dest.exists()
        (tmp / "a.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["a.json", "sub", "sub/b.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(FileExistsError, match="model exists"):
        with atomic.new_directory(dest):
            pass
    # replace: the old directory stays whole until the new one is complete, then gives way to it
    with pytest.raises(RuntimeError):
        with atomic.new_directory(dest, replace=True) as tmp:
            (tmp / "c.json").write_text("{}")
            raise RuntimeError("midway")
    assert (dest / "a.json").is_file() and not (dest / "c.json").exists()
    with atomic.new_directory(dest, replace=True) as tmp:
        (tmp / "c.json").write_text("{}")
    assert [p.name for p in dest.iterdir()] == ["c.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
