"""Storage servers for tests and benchmarks, on 127.0.0.1 only: moto's real S3 protocol server, and a media server
that injects the faults an object store or CDN shows at scale (429, 500, 503, stalls, truncated bodies, resets).

The media server logs every request with its start and end, taken so that each logged interval lies inside the
client's own: the start when the connection is accepted (after the client took its slot), the end just before the
byte that lets the client finish (the headers of an error, the body, the reset), or for a stall when the client
hangs up (a moment late: see :func:`max_in_flight`). Request counts per second and in flight derived from the log
are then bounds the client kept.

Importable from tests and from bench scripts with ``sys.path`` set to tests/.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import urlsplit

FAULTS = ("429", "500", "503", "stall", "truncate", "reset")

TEST_CREDENTIALS = {"key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}


@contextmanager
def moto_s3() -> Iterator[tuple[str, dict]]:
    """moto's S3 server on a free port of 127.0.0.1, for the block. Yields its endpoint URL and the
    ``storage_options`` that point s3fs at it with fake credentials; the server's state is reset on the way out."""
    from moto.server import ThreadedMotoServer

    werkzeug = logging.getLogger("werkzeug")  # moto's server logs a line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    # fake credentials in the environment too, so nothing in the block can pick up real ones
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    os.environ.pop("AWS_SESSION_TOKEN", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield endpoint, {"s3": {"endpoint_url": endpoint, **TEST_CREDENTIALS}}
    finally:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("POST", "/moto-api/reset")  # moto's backends are global to the process
            conn.getresponse().read()
            conn.close()
        finally:
            server.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            werkzeug.setLevel(level)


def create_bucket(storage_options: dict, bucket: str) -> None:
    """A new bucket on the server ``storage_options`` point at (s3fs's mkdir sends a location constraint that
    us-east-1 refuses, hence the plain CreateBucket)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options["s3"])
    fs.call_s3("create_bucket", Bucket=bucket)


class Hit(NamedTuple):
    start: float  # time.monotonic() when the request began
    path: str
    outcome: str  # "200", "404", or the fault: "429", "500", "503", "stall", "truncate", "reset"
    end: float


class MediaServer:
    """Serves ``files`` (path -> bytes) over HTTP on 127.0.0.1, with faults.

    A request fails with probability ``fault_rate``, with a fault drawn from ``faults``. The draw is seeded by
    (seed, path, how many requests that path had before), not by arrival order, so a run with many client threads
    sees the same faults every time. :meth:`inject` forces the next faults of one path. A "stall" answers nothing
    for ``stall`` seconds (or until the client hangs up); "truncate" promises the whole body and sends half;
    "reset" answers with a TCP reset. ``delay`` is added to every request."""

    def __init__(self, files: dict[str, bytes] | None = None, *, fault_rate: float = 0.0,
                 faults: Iterable[str] = FAULTS, seed: int = 0, stall: float = 10.0, delay: float = 0.0):  # fmt: skip
        self.files = dict(files or {})
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        if unknown := set(self.faults) - set(FAULTS):
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.seed = seed
        self.stall = stall
        self.delay = delay
        self._lock = threading.Lock()
        self._log: list[Hit] = []
        self._seen: dict[str, int] = {}
        self._open = 0  # requests begun and not yet logged
        self._forced: dict[str, deque[str]] = {}
        self._accepted: dict[socket.socket, float] = {}
        self._httpd: ThreadingHTTPServer | None = None

    # --- the client's view

    def url(self, path: str) -> str:
        assert self._httpd is not None, "start the server first (use it as a context manager)"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{path.lstrip('/')}"

    @property
    def log(self) -> list[Hit]:
        """Every finished request, in the order they began."""
        with self._lock:
            return sorted(self._log)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is being handled: a stall is logged only once the server notices the client
        hung up, a moment after the client's call returned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._open == 0:
                    return
            time.sleep(0.01)
        raise TimeoutError(f"{self._open} requests still open after {timeout} s")

    def hits(self, path: str) -> list[Hit]:
        path = "/" + path.lstrip("/")
        return [h for h in self.log if h.path == path]

    def inject(self, path: str, *faults: str) -> None:
        """The next requests of ``path`` fail with these faults, in order, whatever ``fault_rate`` says."""
        if unknown := set(faults) - set(FAULTS):
            raise ValueError(f"unknown faults {sorted(unknown)}")
        with self._lock:
            self._forced.setdefault("/" + path.lstrip("/"), deque()).extend(faults)

    def start(self) -> MediaServer:
        owner = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # socketserver's 5 drops connections from more clients than that at once

            def get_request(self):
                sock, address = super().get_request()
                with owner._lock:
                    owner._accepted[sock] = time.monotonic()
                return sock, address

            def handle_error(self, request, client_address):
                pass  # clients hang up on purpose (timeouts, size caps)

        self._httpd = Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> MediaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the handler's side

    def _began(self, sock: socket.socket) -> float:
        now = time.monotonic()
        with self._lock:
            return self._accepted.pop(sock, now)  # the first request of a connection began at its accept

    def _begin(self, sock: socket.socket, path: str) -> tuple[float, str | None]:
        """The start time of a request on ``sock`` and the fault it gets (None: none)."""
        start = self._began(sock)
        with self._lock:
            self._open += 1
            n = self._seen.get(path, 0)
            self._seen[path] = n + 1
            forced = self._forced.get(path)
            if forced:
                return start, forced.popleft()
        if self.fault_rate > 0:
            rng = random.Random(f"{self.seed}/{path}/{n}")
            if rng.random() < self.fault_rate:
                return start, rng.choice(self.faults)
        return start, None

    def _record(self, start: float, path: str, outcome: str) -> None:
        with self._lock:
            self._log.append(Hit(start, path, outcome, time.monotonic()))
            self._open -= outcome != "HEAD"  # a HEAD is logged but never counted as open


class _Handler(BaseHTTPRequestHandler):
    server_version = "MediaServer"

    def log_message(self, *args):
        pass

    def do_HEAD(self):  # logged, so that a test can tell a client sent none (a ranged GET needs no HEAD first)
        owner: MediaServer = self.server.owner
        path = urlsplit(self.path).path
        start = owner._began(self.connection)
        self.close_connection = True
        self.send_response(405)
        self.send_header("Content-Length", "0")
        owner._record(start, path, "HEAD")
        self.end_headers()

    def do_GET(self):
        owner: MediaServer = self.server.owner
        path = urlsplit(self.path).path
        start, fault = owner._begin(self.connection, path)
        self.close_connection = True
        if owner.delay:
            time.sleep(owner.delay)
        body = owner.files.get(path)
        if fault == "stall":
            # wait for the client to give up (its end of the socket turns readable at EOF), at most `stall` s
            select.select([self.connection], [], [], owner.stall)
            owner._record(start, path, fault)
        elif fault == "reset":
            owner._record(start, path, fault)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the socket closes for real only once its file is closed too: a RST
            self.connection.close()
        elif fault == "truncate":
            data = body or b"x"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            owner._record(start, path, fault)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
        elif fault is not None or body is None:
            code = int(fault) if fault is not None else 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            owner._record(start, path, str(code))
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            owner._record(start, path, "200")
            self.end_headers()
            self.wfile.write(body)


def max_in_window(times: Iterable[float], window: float = 1.0) -> int:
    """The most of ``times`` that lie in any half-open interval [t, t + window)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def max_in_flight(hits: Iterable[Hit], hangup_lag: float = 0.0) -> int:
    """The most requests open at once, from their logged start and end times. A stall ends when the client hangs
    up, which the server notices a moment after the client has closed the socket and freed its slot, so another
    request may already have begun: ``hangup_lag`` seconds are taken off the end of each stall for that."""
    hits = list(hits)
    ends = [max(h.start, h.end - hangup_lag) if h.outcome == "stall" else h.end for h in hits]
    events = sorted([(h.start, 1) for h in hits] + [(end, -1) for end in ends], key=lambda e: (e[0], e[1]))
    best = open_ = 0
    for _, step in events:  # at equal times an end comes before a start
        open_ += step
        best = max(best, open_)
    return best
