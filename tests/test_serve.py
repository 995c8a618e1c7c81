"""The OpenAI-compatible server, live on 127.0.0.1 with a tiny random checkpoint and the genuine tokenizer, driven
by the official openai client: answers equal qwen2vl.load(...).chat(...) alone and among concurrent requests;
streaming; usage with visual token counts; every error answered in OpenAI's shape; every refusal."""

import base64
import concurrent.futures
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

import qwen2vl
from helpers import loopback_server
from qwen2vl.processing import fetch
from qwen2vl.model.qwen2vl import Media
from qwen2vl.serve.app import ServerConfig, create_app


KEY = "test-key"


def png(w=64, h=48, seed=0, flat=False) -> bytes:
    buf = io.BytesIO()
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    (Image.new("RGB", (w, h), (200, 120, 40)) if flat else Image.fromarray(a)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class Live:
    """uvicorn in a thread on 127.0.0.1, port chosen by the OS."""

    def __init__(self, assistant, config):
        self.app = create_app(assistant, config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=600)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def post(self, body, key=KEY, raw=None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = raw if raw is not None else json.dumps(body)
        return httpx.post(self.base + "/v1/chat/completions", content=content, headers=headers, timeout=600)


@pytest.fixture(scope="module")
def assistant(small_checkpoint):
    return qwen2vl.load(small_checkpoint)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("served_media")
    (d / "cat.png").write_bytes(png(seed=1))
    (tmp_path_factory.getbasetemp() / "outside.png").write_bytes(png(seed=2))
    os.symlink(tmp_path_factory.getbasetemp() / "outside.png", d / "link.png")
    return d


@pytest.fixture(scope="module")
def live(assistant, media_dir):
    config = ServerConfig(
        model_name="tiny", api_key=KEY, max_model_len=1024, max_batch_size=4, max_queue=16,
        allowed_local_media_path=str(media_dir), allowed_media_domains=("media.test",), max_media_bytes=100_000,
    )  # fmt: skip
    server = Live(assistant, config)
    yield server
    server.close()


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text(t):
    return {"type": "text", "text": t}


def image_url(url):
    return {"type": "image_url", "image_url": {"url": url}}


def as_qwen(messages):
    """The same conversation in the Qwen message format the Python API takes."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": p["image_url"]["url"]} if p["type"] == "image_url" else p
                       for p in content]  # fmt: skip
        out.append({"role": m["role"], "content": content})
    return out


def test_answer_equals_chat_and_reports_visual_tokens(live, assistant):
    messages = user(image_url(data_url(png())), text("What is in the image?"))
    r = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == assistant.chat(as_qwen(messages), max_new_tokens=12)
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 12 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    media = u.model_extra["media"]
    assert media == [{"type": "image", "index": 0, "grid": [1, 4, 4], "tokens": 4, "size": [56, 56],
                      "original_size": [48, 64]}]  # fmt: skip


def test_streaming_with_usage(live, assistant):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    stream = live.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == assistant.chat(messages, max_new_tokens=10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_sse_ends_with_done(live):
    body = {"messages": user(text("hi")), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live.base + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_eight_concurrent_requests_equal_their_lone_answers(live, assistant):
    prompts = [user(text(f"Question number {i}: {'why ' * i}?")) for i in range(6)]
    prompts += [user(image_url(data_url(png(32 + 8 * i, 40, seed=i))), text("Describe.")) for i in range(2)]
    expected = [assistant.chat(as_qwen(p), max_new_tokens=8 + i) for i, p in enumerate(prompts)]

    def ask(i):
        r = live.client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=8 + i, temperature=0)
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == expected


def test_stop_strings_and_per_request_media_options(live, assistant):
    messages = user(text("Tell me a story."))
    full = assistant.chat(messages, max_new_tokens=16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    big = user(image_url(data_url(png(300, 200, flat=True))), text("?"))
    small = live.client.chat.completions.create(model="tiny", messages=big, max_tokens=1,
                                                extra_body={"mm_processor_kwargs": {"max_pixels": 16 * 784}})  # fmt: skip
    default = live.client.chat.completions.create(model="tiny", messages=big, max_tokens=1)
    assert small.usage.model_extra["media"][0]["tokens"] <= 16 < default.usage.model_extra["media"][0]["tokens"]


def test_models_and_health(live):
    assert [m.id for m in live.client.models.list()] == ["tiny"]
    assert httpx.get(live.base + "/health").json()["status"] == "ok"


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    assert "Traceback" not in response.text
    return body["error"]["message"]


@pytest.mark.parametrize(
    "body, raw, needle",
    [
        (None, b"{not json", "invalid JSON"),
        ({"messages": user({"type": "audio_url", "audio_url": {"url": "x"}})}, None, "unknown content type 'audio_url'"),
        ({"messages": user(image_url("data:image/png;base64,@@@"))}, None, "invalid base64"),
        ({"messages": user(image_url(data_url(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)))}, None, "corrupt or truncated"),
        ({"messages": user(*[image_url(data_url(png()))] * 5)}, None, "too many images: 5, at most 4"),
        ({"messages": user(text("word " * 1500))}, None, "--max-model-len is 1024"),
        ({"messages": []}, None, "messages"),
        ({"messages": user(text("x")), "temperature": -1}, None, "temperature"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, None, "role"),
        ({"messages": user(text("x")), "mm_processor_kwargs": {"max_pixel": 5}}, None, "max_pixel"),
    ],
)
def test_bad_requests_are_400_and_the_server_keeps_serving(live, body, raw, needle):
    message = error_of(live.post(body, raw=raw), 400)
    assert needle in message
    r = live.client.chat.completions.create(model="tiny", messages=user(text("still there?")), max_tokens=2)
    assert r.choices[0].message.content is not None


def test_api_key_is_enforced(live):
    assert "API key" in error_of(live.post({"messages": user(text("x"))}, key=None), 401)
    assert "API key" in error_of(live.post({"messages": user(text("x"))}, key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.base + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_model_is_404(live):
    assert "does not exist" in error_of(live.post({"model": "gpt-9", "messages": user(text("x"))}), 404)


def test_local_files_only_inside_the_allowed_directory(live, media_dir):
    ok = live.post({"messages": user(image_url(f"file://{media_dir}/cat.png")), "max_tokens": 1})
    assert ok.status_code == 200
    for url in (f"file://{media_dir}/../outside.png", f"{media_dir}/link.png", "file:///etc/passwd"):
        assert "outside the allowed media directory" in error_of(live.post({"messages": user(image_url(url))}), 400)


def test_private_addresses_are_refused_before_connecting(live, monkeypatch):
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["169.254.169.254"])
    monkeypatch.setattr(fetch._PinnedHTTPConnection, "connect", lambda self: pytest.fail("a connection was made"))
    message = error_of(live.post({"messages": user(image_url("http://metadata.example.com/latest"))}), 400)
    assert "non-public address" in message
    message = error_of(live.post({"messages": user(image_url("http://127.0.0.1:9/x.png"))}), 400)
    assert "non-public address" in message


class MediaServer(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/cat.png":
            body = png(seed=3)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big.png":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * 200_000)
        else:
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()


def test_allowed_domain_fetches_with_limits(live, monkeypatch):
    monkeypatch.setattr(fetch, "resolve", lambda host, p: ["127.0.0.1"] if host == "cdn.media.test" else ["10.0.0.1"])
    with loopback_server(MediaServer) as base:
        port = base.rsplit(":", 1)[1]
        ok = live.post({"messages": user(image_url(f"http://cdn.media.test:{port}/cat.png")), "max_tokens": 1})
        assert ok.status_code == 200 and ok.json()["usage"]["media"][0]["original_size"] == [48, 64]
        redirect = live.post({"messages": user(image_url(f"http://cdn.media.test:{port}/moved.png"))})
        assert "redirect" in error_of(redirect, 400)
        big = live.post({"messages": user(image_url(f"http://cdn.media.test:{port}/big.png"))})
        assert "more than the limit of 100000 bytes" in error_of(big, 400)
        other = live.post({"messages": user(image_url(f"http://other.test:{port}/cat.png"))})
        assert "non-public" in error_of(other, 400)


def test_a_disconnected_stream_stops_its_generation(live):
    engine = live.app.state.engine
    body = {"messages": user(text("Go on forever.")), "max_tokens": 900, "stream": True}
    with httpx.stream("POST", live.base + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert engine.running == 1
    deadline = time.time() + 10
    while engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert engine.running == 0
    steps = engine.steps
    time.sleep(0.3)
    assert engine.steps == steps  # nothing is decoding any more


def test_overload_is_answered_at_once(assistant):
    config = ServerConfig(model_name="tiny", max_model_len=400, max_batch_size=1, max_queue=1)
    server = Live(assistant, config)
    try:
        body = {"messages": user(text("Count to a thousand.")), "max_tokens": 300}

        def ask(_):
            t = time.time()
            r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
            return r.status_code, time.time() - t

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            results = list(pool.map(ask, range(5)))
        refused = [t for status, t in results if status == 429]
        answered = [t for status, t in results if status == 200]
        assert refused and answered and all(status in (200, 429) for status, _ in results)
        assert max(refused) < max(answered)  # not queued behind the others (relative: a busy machine slows both)
    finally:
        server.close()


def test_a_video_data_url_with_per_request_fps(live, tmp_path):
    from test_processor import write_video

    clip = write_video(tmp_path / "clip.mp4").read_bytes()  # 30 frames at 10 fps: 3 s
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    part = {"type": "video_url", "video_url": {"url": url}}
    r = live.post({"messages": user(part, text("What moves?")), "max_tokens": 2})
    assert r.status_code == 200, r.text
    (video,) = r.json()["usage"]["media"]
    assert video["type"] == "video" and video["frames"] == 6 and video["grid"][0] == 3  # 2 fps
    r = live.post({"messages": user(part), "max_tokens": 2, "mm_processor_kwargs": {"fps": 4.0}})
    assert r.json()["usage"]["media"][0]["frames"] == 12
    two = live.post({"messages": user(part, part)})
    assert "too many videos: 2, at most 1" in error_of(two, 400)


def test_a_failed_engine_step_ends_what_runs_and_the_engine_keeps_serving(tiny, monkeypatch):
    import torch

    from qwen2vl.generate.batch import Sequence
    from qwen2vl.generate.sampling import SamplingParams
    from qwen2vl.serve.app import Engine

    engine = Engine(tiny, max_batch_size=2, max_len=64, max_queue=4)
    real, calls = engine.batcher.step, []

    def step_that_fails_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a step failed")
        real()

    monkeypatch.setattr(engine.batcher, "step", step_that_fails_once)
    ends = {}

    def request(key):
        finished = threading.Event()
        seq = Sequence(torch.tensor([[5, 6, 7]]), Media(), 20, SamplingParams(), emit=lambda t: None,
                       finish=lambda r: (ends.__setitem__(key, r), finished.set()))  # fmt: skip
        engine.submit(seq)
        return finished

    engine.start()
    try:
        assert request("first").wait(10) and ends["first"] == "error"
        assert request("next").wait(10) and ends["next"] == "length"
        assert engine.batcher.active == 0
    finally:
        engine.stop()
