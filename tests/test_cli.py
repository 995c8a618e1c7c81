"""`qwen2vl chat` and `qwen2vl tokens` on a tiny random checkpoint saved with the genuine tokenizer."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qwen2vl
from qwen2vl.assistant import Assistant
from examples.demo import main as demo_main
from qwen2vl.cli import main


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)).save(d / "b.jpg")
    from test_processor import write_video

    write_video(d / "clip.mp4")
    return d


def test_tokens_prints_each_item_and_the_total(media, capsys):
    assert main(["tokens", "--image", str(media / "a.png"), "--image", str(media / "b.jpg"),
                 "--video", str(media / "clip.mp4")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert "640x480" in lines[1] and "644x476" in lines[1] and "(1, 34, 46)" in lines[1] and lines[1].endswith(" 391")
    assert "1920x1080" in lines[2] and "1932x1092" in lines[2] and lines[2].endswith(" 2691")
    assert lines[3].startswith("video 1") and "96x64" in lines[3] and "392x280" in lines[3] and " 6 " in lines[3]
    assert lines[4] == "total: 3502 visual tokens (3508 with <|vision_start|>/<|vision_end|>)"


def test_tokens_with_a_budget(media, capsys):
    assert main(["tokens", "--image", str(media / "b.jpg"), "--max-pixels", str(256 * 784)]) == 0
    out = capsys.readouterr().out
    assert "588x336" in out and "total: 252 visual tokens" in out


def test_tokens_errors_are_one_line(media, capsys):
    assert main(["tokens", "--image", str(media / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"qwen2vl: error: --image {media / 'missing.png'}: no such file\n"
    assert main(["tokens"]) == 1
    assert "at least one --image or --video" in capsys.readouterr().err


def test_chat_with_a_prompt_prints_the_answer(tiny_checkpoint, media, capsys):
    args = ["chat", str(tiny_checkpoint), "--image", str(media / "a.png"), "--max-new-tokens", "10", "What is it?"]
    assert main(args) == 0
    expected = qwen2vl.load(tiny_checkpoint).chat(
        [{"role": "user", "content": [{"type": "image", "image": str(media / "a.png")},
                                      {"type": "text", "text": "What is it?"}]}], max_new_tokens=10)  # fmt: skip
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_chat_keeps_the_history(tiny_checkpoint, media, monkeypatch, capsys):
    seen = []
    real = Assistant.stream

    def spy(self, messages, **kw):
        seen.append([dict(m) for m in messages])
        yield from real(self, messages, **kw)

    monkeypatch.setattr(Assistant, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hello\n/image {media / 'a.png'}\nAnd this?\n\n"))
    assert main(["chat", str(tiny_checkpoint), "--max-new-tokens", "4"]) == 0
    assert len(seen) == 2
    second = seen[1]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[2]["content"][0] == {"type": "image", "image": str(media / "a.png")}
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_draw_boxes_saves_the_grounding_picture(tiny_checkpoint, media, monkeypatch, tmp_path, capsys):
    answer = "<|object_ref_start|>the thing<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>"
    monkeypatch.setattr(Assistant, "stream", lambda self, messages, **kw: iter([answer[:20], answer[20:]]))
    out = tmp_path / "boxes.png"
    assert main(["chat", str(tiny_checkpoint), "--image", str(media / "a.png"), "--draw-boxes", str(out), "Where?"]) == 0
    assert "1 box drawn" in capsys.readouterr().err
    drawn, original = np.asarray(Image.open(out)), np.asarray(Image.open(media / "a.png"))
    assert drawn.shape == original.shape
    # (100,200)-(500,600) on 640x480 is x 64..320, y 96..288: the outline changed, a far corner did not
    assert (drawn[96:288, 64] != original[96:288, 64]).any(axis=-1).mean() > 0.9
    assert (drawn[400:, 400:] == original[400:, 400:]).all()


def test_chat_errors(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nowhere"), "hi"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "qwen2vl", "tokens", "--image", "nope.png"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr == "qwen2vl: error: --image nope.png: no such file\n"


def test_random_demo_runs_offline_on_the_example_image(tmp_path, capsys):
    out = tmp_path / "boxes.png"
    assert demo_main(["--random", "--new-tokens", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "640x400 -> model input 644x392" in text and "322 tokens" in text
    assert "('the red ball', 70, 90, 210, 230)" in text
    assert Image.open(out).size == (640, 400)


def test_demo_without_a_model_falls_back_to_random_weights(tmp_path, capsys):
    assert demo_main(["--model", str(tmp_path / "none"), "--new-tokens", "2", "--out", str(tmp_path / "b.png")]) == 0
    assert "no model at" in capsys.readouterr().out


def test_a_bad_media_path_in_interactive_chat_is_an_error_line(tiny_checkpoint, media, monkeypatch, tmp_path,
                                                              capsys):
    """A mistyped /image or /video path, an undecodable file, and a turn that fails inside the model: each is one
    error line; the session goes on and keeps its conversation."""
    (tmp_path / "bad.png").write_bytes(b"not a png")
    seen, real = [], Assistant.stream

    def spy(self, messages, **kw):
        seen.append([dict(m) for m in messages])
        if messages[-1]["content"][-1]["text"] == "fail":
            raise ValueError("the prompt is too long")
        yield from real(self, messages, **kw)

    monkeypatch.setattr(Assistant, "stream", spy)
    lines = ["Hello", f"/image {media / 'typo.png'}", f"/video {media / 'typo.mp4'}", f"/image {tmp_path / 'bad.png'}",
             "/image", "fail", f"/image {media / 'a.png'}", "And this?", ""]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(tiny_checkpoint), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("qwen2vl: error:")]
    assert len(errors) == 5 and "Traceback" not in captured.err
    assert "typo.png" in errors[0] and "no such file" in errors[0] and "typo.mp4" in errors[1]
    assert "bad.png" in errors[2] and "/image wants a path" in errors[3] and "too long" in errors[4]
    assert len(seen) == 3  # Hello, the failed turn, And this?
    last = seen[2]
    assert [m["role"] for m in last] == ["user", "assistant", "user"]  # the failed turn left no trace
    assert last[2]["content"][0] == {"type": "image", "image": str(media / "a.png")}
    assert len(captured.out.splitlines()) == 2


def test_command_line_media_are_checked_before_the_model_loads(tiny_checkpoint, media, monkeypatch, tmp_path,
                                                               capsys):
    monkeypatch.setattr(qwen2vl, "load", lambda *a, **k: pytest.fail("the model loaded before the media were checked"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    for flag, path, reason in (("--image", media / "typo.png", "no such file"),
                               ("--image", tmp_path / "bad.png", "not a readable image"),
                               ("--video", media / "typo.mp4", "no such file"),
                               ("--video", tmp_path / "bad.mp4", "not a readable video"),
                               ("--image", media, "a directory, not a file")):  # fmt: skip
        assert main(["chat", str(tiny_checkpoint), flag, str(path), "hi"]) == 2, (flag, path)
        err = capsys.readouterr().err
        assert err.startswith(f"qwen2vl: error: {flag} {path}: {reason}"), err
        assert len(err.splitlines()) == 1


def test_every_missing_file_argument_is_one_line_naming_it(tiny_checkpoint, tmp_path, capsys):
    missing, data = str(tmp_path / "missing"), tmp_path / "data.jsonl"
    data.write_text("")
    (tmp_path / "recipe.yaml").write_text(f"stage: 1\nmodel: {tiny_checkpoint}\ndata: {missing}.jsonl\nout: o\n")
    model, out = str(tiny_checkpoint), str(tmp_path / "out")
    cases = [
        (["train", "--stage", "1", "--model", model, "--data", missing, "--out", out], f"--data {missing}: no such file"),
        (["train", "--recipe", missing], f"--recipe {missing}: no such file"),
        (["train", "--recipe", str(tmp_path / "recipe.yaml")], f"recipe.yaml: data {missing}.jsonl: no such file"),
        (["train", "--stage", "1", "--model", missing, "--data", str(data), "--out", out],
         f"--model {missing}: no such directory"),
        (["train", "--stage", "1", "--model", model, "--data", str(tmp_path), "--out", out],
         "a directory without index.json, not a prepared store"),
        (["eval", model, "--data", missing], f"--data {missing}: no such file"),
        (["eval", missing, "--data", str(data)], f"MODEL {missing}: no such directory"),
        (["data", "check", missing, "--model", model], f"FILE {missing}: no such file"),
        (["data", "check", str(data), "--model", missing], f"--model {missing}: no such directory"),
        (["export", missing, out], f"CHECKPOINT {missing}: no such directory"),
        (["export", model, out, "--base", missing], f"--base {missing}: no such directory"),
        (["chat", missing, "hi"], f"MODEL {missing}: no such directory"),
        (["serve", missing], f"MODEL {missing}: no such directory"),
        (["tokens", "--image", missing], f"--image {missing}: no such file"),
        (["tokens", "--model", missing, "--video", missing], f"--model {missing}: no such directory"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err == f"qwen2vl: error: {err.removeprefix('qwen2vl: error: ').strip()}\n" and message in err, (argv, err)
        assert "Errno" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_help_imports_no_training_code_nor_torch():
    code = ("import sys\nfrom qwen2vl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('qwen2vl.train', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_library_alone_runs_the_shipped_model():
    """`pip install .` is enough for inference: with the extras' and the tests' packages made unimportable, the
    shipped model still answers (its clip included)."""
    code = """
import sys
for name in ("fastapi", "uvicorn", "yaml", "tensorboard", "transformers", "torchvision", "qwen_vl_utils", "decord",
             "dashscope", "openai", "pytest", "huggingface_hub"):
    sys.modules[name] = None
import qwen2vl
a = qwen2vl.load("models/qwen2vl-synth")
video = [{"role": "user", "content": [{"type": "video", "video": "examples/ball.mp4"},
                                      {"type": "text", "text": "Which direction does the ball move?"}]}]
print(a.chat(video, max_new_tokens=8))
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "right"


def test_serve_starts_on_localhost(tiny_checkpoint):
    import re

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "qwen2vl", "serve", str(tiny_checkpoint), "--port", "0",
                             "--api-key", "k"], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for _ in range(200):
            line = proc.stderr.readline()
            if m := re.search(r"running on http://([\d.]+):(\d+)", line):
                break
        assert m and m.group(1) == "127.0.0.1"
        base = f"http://127.0.0.1:{m.group(2)}"
        assert httpx.get(base + "/health").json()["status"] == "ok"
        assert httpx.get(base + "/v1/models").status_code == 401
        models = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == tiny_checkpoint.name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_argument_errors(tiny_checkpoint, tmp_path, capsys):
    assert main(["serve", str(tiny_checkpoint), "--limit-mm-per-prompt", "{bad"]) == 1
    assert "--limit-mm-per-prompt must be a JSON object" in capsys.readouterr().err
    assert main(["serve", str(tiny_checkpoint), "--allowed-local-media-path", str(tmp_path / "none")]) == 2
    assert "--allowed-local-media-path" in capsys.readouterr().err
