"""URL fetching: limits enforced (size while downloading, time, no redirects), and non-public addresses refused on
the resolved address before any connection (the resolver is stubbed; only loopback traffic leaves a test)."""

import socket
import time
from http.server import BaseHTTPRequestHandler

import pytest

from helpers import loopback_server
from qwen2vl.processing import fetch
from qwen2vl.processing.errors import MediaError
from qwen2vl.processing.fetch import FetchPolicy, fetch_url


BODY = b"x" * 5000


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/ok":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.end_headers()
        elif self.path == "/chunked":  # no Content-Length: the cap must hold while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(BODY)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            time.sleep(30)  # far longer than any client here waits, however busy the machine
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    with loopback_server(Handler) as base:
        yield base


LOOPBACK_OK = FetchPolicy(allow_private=True, max_bytes=100_000, timeout=1.0)


def test_fetches_a_body(server):
    assert fetch_url(server + "/ok", LOOPBACK_OK) == BODY


def test_loopback_is_refused_by_default(server):
    with pytest.raises(MediaError, match="non-public address"):
        fetch_url(server + "/ok")


def test_an_allowed_domain_may_be_private(server, monkeypatch):
    port = int(server.rsplit(":", 1)[1])
    monkeypatch.setattr(fetch, "resolve", lambda host, p: ["127.0.0.1"])
    policy = FetchPolicy(allowed_domains=("media.internal",))
    assert fetch_url(f"http://cdn.media.internal:{port}/ok", policy) == BODY
    with pytest.raises(MediaError, match="non-public"):
        fetch_url(f"http://media.internal.evil.com:{port}/ok", policy)


@pytest.mark.parametrize(
    "address", ["10.0.0.7", "192.168.1.1", "172.16.5.4", "169.254.169.254", "127.0.0.1", "::1", "fe80::1",
                "::ffff:127.0.0.1", "100.64.0.1", "0.0.0.0", "fd00::1"],
)  # fmt: skip
def test_private_addresses_are_refused_before_connecting(monkeypatch, address):
    monkeypatch.setattr(fetch, "resolve", lambda host, port: [address])

    def no_connection(*a, **k):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    with pytest.raises(MediaError, match="non-public address"):
        fetch_url("http://images.example.com/cat.png", name="image 1")


def test_one_private_address_among_public_ones_is_refused(monkeypatch):
    monkeypatch.setattr(fetch, "resolve", lambda host, port: ["93.184.216.34", "10.1.2.3"])
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected"))
    with pytest.raises(MediaError, match="10.1.2.3"):
        fetch_url("https://images.example.com/cat.png")


def test_redirects_are_not_followed(server):
    with pytest.raises(MediaError, match="redirect"):
        fetch_url(server + "/redirect", LOOPBACK_OK)


def test_size_cap_holds_with_and_without_content_length(server):
    with pytest.raises(MediaError, match="over the limit"):
        fetch_url(server + "/ok", FetchPolicy(allow_private=True, max_bytes=1000))
    with pytest.raises(MediaError, match="more than the limit"):
        fetch_url(server + "/chunked", FetchPolicy(allow_private=True, max_bytes=100_000))


def test_timeout(server):
    t = time.monotonic()
    with pytest.raises(MediaError, match="timed out|longer than"):
        fetch_url(server + "/slow", FetchPolicy(allow_private=True, timeout=0.3))
    assert time.monotonic() - t < 15  # cut by the 0.3 s timeout, not by the server's 30 s


@pytest.mark.parametrize(
    "url, reason",
    [("ftp://example.com/a.png", "only http and https"), ("http:///a.png", "no host"), ("/404", "HTTP 404")],
)
def test_failures_are_named(server, url, reason):
    url = server + url if url.startswith("/") else url
    with pytest.raises(MediaError, match=reason) as e:
        fetch_url(url, LOOPBACK_OK, name="image 3")
    assert "image 3" in str(e.value)


def test_unresolvable_host(monkeypatch):
    def fail(host, port):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(fetch, "resolve", fail)
    with pytest.raises(MediaError, match="cannot resolve host"):
        fetch_url("http://no-such-host.invalid/a.png")
