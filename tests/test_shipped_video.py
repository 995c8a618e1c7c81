"""The shipped clip through every path a user has: the CLI, the Python API and the server each read the model's
own video_preprocessor_config.json, so the 112x112 clip stays 112x112 (32 tokens) as in training, and the model
tells the direction. Before a checkpoint's video settings were honoured, each path upscaled the clip to the
default per-frame floor (128*28*28 pixels) and the answer was a run of digits."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import qwen2vl
from qwen2vl.processing.errors import MediaError
from qwen2vl.processing.processor import Processor
from qwen2vl.serve.app import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "qwen2vl-synth"
CLIP = ROOT / "examples" / "ball.mp4"
QUESTION = "Which direction does the ball move?"


@pytest.fixture(scope="module")
def assistant():
    return qwen2vl.load(MODEL)


def test_the_model_carries_its_video_settings():
    settings = json.loads((MODEL / "video_preprocessor_config.json").read_text())
    assert settings["size"]["shortest_edge"] == 4 * 28 * 28
    info = Processor.from_pretrained(MODEL).media.load("video", {"video": str(CLIP)}, "clip", {})[0]
    assert info.size == (112, 112) and info.tokens == 32


def test_without_the_file_the_default_floor_upscales(tmp_path):
    for f in MODEL.iterdir():
        if f.name != "video_preprocessor_config.json" and not f.name.endswith(".safetensors"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    info = Processor.from_pretrained(tmp_path).media.load("video", {"video": str(CLIP)}, "clip", {})[0]
    assert info.size == (336, 336)  # what every path did before: the failure this file guards against


def test_a_bad_video_setting_is_named(tmp_path):
    for f in MODEL.iterdir():
        if not f.name.endswith(".safetensors"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"fps": -1}))
    with pytest.raises(MediaError, match="video_preprocessor_config.json: fps must be a positive number"):
        Processor.from_pretrained(tmp_path)


def test_python_api(assistant):
    messages = [{"role": "user", "content": [{"type": "video", "video": str(CLIP)}, {"type": "text", "text": QUESTION}]}]
    assert assistant.chat(messages, max_new_tokens=8).strip() == "right"


def test_cli():
    out = subprocess.run(
        [sys.executable, "-m", "qwen2vl", "chat", str(MODEL), "--video", str(CLIP), QUESTION, "--max-new-tokens", "8"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].strip() == "right"


def test_server(assistant):
    from test_serve import Live

    url = "data:video/mp4;base64," + base64.b64encode(CLIP.read_bytes()).decode()
    server = Live(assistant, ServerConfig(model_name="synth", api_key="k", max_model_len=1024))
    try:
        body = {"model": "synth", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}  # fmt: skip
        r = httpx.post(server.base + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                       timeout=600)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == "right"
    finally:
        server.close()
