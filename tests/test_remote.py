"""Remote reads: each fault kind is retried and classified (transient or permanent, one request per try, s3fs's,
botocore's and aiohttp's own retries off), the concurrency and rate caps hold as the server sees them, under 20%
injected faults, and object stores are reachable only through a Remote (never from the server's media access).
Servers on 127.0.0.1 only: tests/storage_servers.py."""

import importlib.util
import io
import os
import pickle
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler

import pytest
from PIL import Image

from helpers import loopback_server
from qwen2vl.processing import fetch, remote
from qwen2vl.processing.errors import MediaError
from qwen2vl.processing.fetch import FetchError, FetchPolicy
from qwen2vl.processing.image import load_image
from qwen2vl.processing.remote import Remote, RemotePolicy
from qwen2vl.processing.sources import TRUST_LOCAL, MediaAccess
from storage_servers import (FAULTS, TEST_CREDENTIALS, MediaServer, create_bucket, max_in_flight, max_in_window,
                             moto_s3)  # fmt: skip

LOOPBACK = FetchPolicy(allow_private=True, timeout=0.5)
BODY = bytes(range(256)) * 2


def quick(**kw) -> Remote:
    """A Remote with short waits, for tests."""
    return Remote(RemotePolicy(**{"backoff": 0.01, "max_backoff": 0.05, "timeout": 0.5, **kw}))


# --- http(s): classification


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_retried_then_the_body_delivered(fault):
    with MediaServer({"/a.png": BODY}, stall=30) as server:
        server.inject("a.png", fault, fault)
        r = quick(retries=3)
        assert r.read(server.url("a.png"), fetch=LOOPBACK) == BODY
        server.wait_idle()
        assert [h.outcome for h in server.hits("a.png")] == [fault, fault, "200"]
        stats = r.stats()
        assert (stats["requests"], stats["retries"], stats["failures"]) == (3, 2, 0)
        reason = {"stall": "timed out", "truncate": "truncated body", "reset": "connection reset"}.get(fault)
        assert stats["reasons"] == {reason or f"HTTP {fault}": 2}


def test_a_404_is_not_retried():
    with MediaServer({}) as server:
        r = quick(retries=5)
        with pytest.raises(FetchError, match=r"image 3 .*HTTP 404") as e:
            r.read(server.url("missing.png"), "image 3", fetch=LOOPBACK)
        assert not e.value.transient
        assert len(server.hits("missing.png")) == 1
        assert r.stats()["retries"] == 0 and r.stats()["failures"] == 1


def test_retries_exhausted_names_the_tries_and_the_last_reason():
    with MediaServer({"/a.png": BODY}) as server:
        server.inject("a.png", "500", "503", "503")
        expected = r"image 2 \('http://127.0.0.1:\d+/a.png'\): failed after 3 tries \(HTTP 503\)"
        with pytest.raises(MediaError, match=expected):
            quick(retries=2).read(server.url("a.png"), "image 2", fetch=LOOPBACK)
        assert len(server.hits("a.png")) == 3


def test_a_stall_ends_by_the_timeout():
    with MediaServer({"/a.png": BODY}, fault_rate=1.0, faults=("stall",), stall=30) as server:
        t = time.monotonic()
        with pytest.raises(FetchError, match="timed out") as e:
            quick(retries=1).read(server.url("a.png"), fetch=LOOPBACK)
        assert e.value.transient
        assert time.monotonic() - t < 20  # cut by the 0.5 s timeouts, not by the server's 30 s stalls
        server.wait_idle()
        assert len(server.hits("a.png")) == 2


class Trickle(BaseHTTPRequestHandler):
    """Promises 1000 bytes and sends them one every 50 ms: every read returns, so only a deadline stops it."""

    hits = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        Trickle.hits += 1
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(600):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the client gave up


def test_a_stall_mid_body_ends_by_the_timeout():
    Trickle.hits = 0
    with loopback_server(Trickle) as base:
        t = time.monotonic()
        with pytest.raises(FetchError, match="timed out|longer than") as e:
            quick(retries=1).read(base + "/slow", fetch=LOOPBACK)
        assert e.value.transient and Trickle.hits == 2
        assert time.monotonic() - t < 20  # the trickle alone would take 50 s a try


def test_backoff_doubles_up_to_the_cap_and_frees_the_slot(monkeypatch):
    monkeypatch.setattr(remote.random, "uniform", lambda lo, hi: hi)  # the top of each full-jitter range
    with MediaServer({"/a.png": BODY, "/b.png": BODY}) as server:
        server.inject("a.png", "503", "503", "503")
        r = Remote(RemotePolicy(concurrency=1, retries=3, backoff=0.3, max_backoff=0.6))
        reader = threading.Thread(target=r.read, args=(server.url("a.png"),), kwargs={"fetch": LOOPBACK})
        reader.start()
        while not server.hits("a.png"):
            time.sleep(0.01)
        # a.png now sleeps 0.3 s before its retry: its slot (the only one) is free meanwhile
        assert r.read(server.url("b.png"), fetch=LOOPBACK) == BODY
        reader.join()
        a = server.hits("a.png")
        assert server.hits("b.png")[0].start < a[1].start
        gaps = [later.start - earlier.end for earlier, later in zip(a, a[1:])]
        for gap, wait in zip(gaps, [0.3, 0.6, 0.6]):  # 0.3, doubled, then capped
            assert gap >= wait


def test_the_start_limit_is_a_sliding_window():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731

    def sleep(seconds):
        now[0] += seconds

    limit = remote._StartLimit(10, clock, sleep)
    starts = []
    for _ in range(45):
        limit.wait()
        starts.append(clock())
    assert max_in_window(starts, 1.1) == 10  # the window is a second and a margin
    assert starts[-1] == pytest.approx(4 * 1.1)  # no start waited longer than it had to
    slow = remote._StartLimit(0.5, clock, sleep)  # under 1 a second: one start every 2 s
    starts = [now[0]]
    for _ in range(3):
        slow.wait()
        starts.append(clock())
    assert max_in_window(starts[1:], 2.1) == 1


# --- the acceptance test


def test_a_thousand_files_under_faults_keep_the_caps():
    """1,000 small files, 20% of requests failing with every fault kind, 16 threads through one Remote. Every
    body arrives byte-exact; the server's log shows the caps held."""
    files = {f"/img/{i:04d}.png": os.urandom(200 + i % 300) for i in range(1000)}
    # a cap the run reaches: uncapped, this machine made 280-450 starts a second; 150 costs about 9 s
    qps, concurrency = 150, 8
    with MediaServer(files, fault_rate=0.2, seed=7, stall=30) as server:
        # at 20% faults, 11 tries all failing for one of 1,000 files is a 2e-5 chance (and seeded: same every run)
        r = Remote(RemotePolicy(concurrency=concurrency, qps=qps, retries=10, backoff=0.02, max_backoff=0.5))
        policy = FetchPolicy(allow_private=True, timeout=0.5)  # what a stall costs
        with ThreadPoolExecutor(16) as pool:
            bodies = list(pool.map(lambda path: r.read(server.url(path), fetch=policy), files))
        assert bodies == list(files.values())
        server.wait_idle()
        log = server.log

    stats = r.stats()
    assert stats["failures"] == 0 and stats["requests"] == 1000 + stats["retries"]
    assert stats["requests"] >= len(log) > 1100  # a request timed out before the server read it is not logged
    assert {h.outcome for h in log} == {"200", *FAULTS}
    # The server sees each event a little after the client: 0.2 s is the delivery jitter allowed (threads, the GIL).
    # Each logged interval lies inside the client's slot, but a stall ends when the server notices the hang-up.
    assert max_in_flight(log, hangup_lag=0.2) <= concurrency
    # The limiter spaces the n-th and (n+qps)-th starts by 1.1 s. The server logs a request when it accepts the
    # connection, which on a busy machine (its threads share the GIL with the 16 clients) can lag by more than
    # the 0.1 s margin for a burst, so its log is held to the cap as a rate: over the whole run, and over every
    # 2 s window.
    # A 2 s window may still hold a few late arrivals from the one before (306 of 300 seen once in a full
    # suite): 5% is allowed for them. The limiter's own exactness is test_the_start_limit_is_a_sliding_window's.
    starts = sorted(h.start for h in log)
    assert len(starts) / (starts[-1] - starts[0]) <= qps
    assert max_in_window(starts, 2.0) <= 2 * qps * 1.05
    assert max_in_window(starts, 1.0) >= 0.85 * qps  # the cap was reached, so the lines above tested it


# --- object stores (moto's S3 server), and the retry switch-off proved on a fake S3


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as (endpoint, options):
        create_bucket(options, "media")
        yield options


def test_s3_put_and_read_back(s3, tmp_path):
    tree = tmp_path / "tree"
    files = {f"d{i % 3}/sub{i % 2}/f{i}.bin": os.urandom(100 + i) for i in range(24)}
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    (tmp_path / "one.bin").write_bytes(b"one file")
    (tmp_path / "empty.bin").write_bytes(b"")
    r = Remote(RemotePolicy(concurrency=4, storage_options=s3))
    r.put(tmp_path / "one.bin", "s3://media/single/one.bin")
    r.put(tmp_path / "empty.bin", "s3://media/single/empty.bin")
    r.put(tree, "s3://media/tree/")
    assert r.read("s3://media/single/one.bin") == b"one file"
    assert r.read("s3://media/single/empty.bin") == b""  # S3 answers a range on an empty object with 416
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda rel: r.read(f"s3://media/tree/{rel}"), files))
    assert got == list(files.values())
    assert r.stats()["failures"] == 0


def test_s3_missing_key_is_permanent(s3):
    r = Remote(RemotePolicy(retries=5, storage_options=s3))
    with pytest.raises(FetchError, match=r"image 4 \('s3://media/nope.png'\): not found") as e:
        r.read("s3://media/nope.png", "image 4")
    assert not e.value.transient
    assert r.stats()["requests"] == 1 and r.stats()["retries"] == 0


def test_media_access_reads_s3_images_only_with_a_remote(s3, tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(png, format="PNG")
    (tmp_path / "cat.png").write_bytes(png.getvalue())
    r = Remote(RemotePolicy(storage_options=s3))
    r.put(tmp_path / "cat.png", "s3://media/cat.png")
    access = MediaAccess(remote=r)
    assert access.read("s3://media/cat.png", "image 1") == png.getvalue()
    assert load_image("s3://media/cat.png", access=access).size == (32, 24)
    with pytest.raises(MediaError, match=r"over the limit|more than the limit of 10 bytes"):
        MediaAccess(remote=r, max_bytes=10).read("s3://media/cat.png", "image 1")
    with pytest.raises(MediaError, match=r"image 1 .*object-store URIs \(s3://...\) are not allowed here"):
        MediaAccess().read("s3://media/cat.png", "image 1")
    assert TRUST_LOCAL.remote is not None  # the python API and the CLI read object stores
    copy = pickle.loads(pickle.dumps(access))  # to a worker process: same policy, its own limits
    assert copy.remote.policy == r.policy and copy.read("s3://media/cat.png", "image 1") == png.getvalue()


def test_the_server_reads_no_object_store():
    pytest.importorskip("fastapi")
    from qwen2vl.serve.app import ServerConfig

    with pytest.raises(MediaError, match="object-store URIs"):
        ServerConfig().media_access().read("s3://media/cat.png", "image 1")


def test_a_missing_implementation_names_the_package():
    pytest.importorskip("fsspec")
    if importlib.util.find_spec("ossfs") is not None:
        pytest.skip("ossfs is installed")
    hint = r"image 1 \('oss://bucket/a.png'\): oss:// URIs need ossfs: pip install ossfs$"
    with pytest.raises(MediaError, match=hint):
        Remote().read("oss://bucket/a.png", "image 1")
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        MediaAccess(remote=Remote()).read("ftp://example.com/a.png", "image 1")


@pytest.mark.parametrize("fault", FAULTS)
def test_s3_each_try_is_one_request(fault):
    """A fake S3 endpoint that always fails: the server sees exactly our tries, so neither s3fs nor botocore nor
    aiohttp retried on its own."""
    with MediaServer({"/media/x.png": BODY}, fault_rate=1.0, faults=(fault,), stall=30) as server:
        options = {"s3": {"endpoint_url": server.url("").rstrip("/"), **TEST_CREDENTIALS}}
        r = quick(retries=2, storage_options=options)
        with pytest.raises(FetchError, match=r"failed after 3 tries") as e:
            r.read("s3://media/x.png", "image 1")
        assert e.value.transient
        server.wait_idle()
        assert [h.outcome for h in server.log] == [fault] * 3


def test_s3_reads_are_one_ranged_get():
    with MediaServer({"/media/x.png": BODY}) as server:  # it ignores Range: the whole body comes back
        options = {"s3": {"endpoint_url": server.url("").rstrip("/"), **TEST_CREDENTIALS}}
        r = quick(storage_options=options)
        assert r.read("s3://media/x.png") == BODY
        with pytest.raises(FetchError, match=f"more than the limit of {len(BODY) - 1} bytes") as e:
            r.read("s3://media/x.png", max_bytes=len(BODY) - 1)
        assert not e.value.transient
        assert [h.outcome for h in server.log] == ["200", "200"]  # no HEAD before either


# --- the address check still holds through a Remote


def test_private_addresses_are_refused_through_a_remote_and_not_retried(monkeypatch):
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["10.0.0.7"])
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("a connection was attempted"))
    r = quick(retries=5)
    with pytest.raises(FetchError, match="image 1 .*non-public address") as e:
        r.read("http://images.example.com/cat.png", "image 1")
    assert not e.value.transient
    with pytest.raises(MediaError, match="non-public address"):
        MediaAccess(remote=r).read("http://images.example.com/cat.png", "image 1")
    assert r.stats()["requests"] == 2 and r.stats()["retries"] == 0
