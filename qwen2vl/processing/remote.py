"""Media and prepared data from object stores (s3://, oss://, gs://, ... through fsspec) and over http(s), read by
many threads at once without tripping the store's throttling: at most ``concurrency`` requests in flight, at most
``qps`` request starts in any second, and transient faults retried with exponential backoff and full jitter.

Throttling (S3's SlowDown, 429, 503), 5xx errors, timeouts, resets and truncated bodies are transient: the same
request may succeed later. A missing key, a refused permission, a 404, a redirect or a size over the cap are
permanent and raised at once, since repeating them only adds load. The storage layer of the paper reads millions
of small images this way; at that scale a fault rate of a few percent is normal and must cost nothing but time.

Every request passes through one limiter and one retry loop here, so the counts in :meth:`Remote.stats` are the
truth: s3fs's and botocore's own retries are switched off (s3fs retries in ``_error_wrapper`` up to its
``retries`` attribute, botocore up to ``Config(retries={"total_max_attempts": ...})``). Other fsspec
implementations (gcsfs, ossfs) may still retry inside a request of ours.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import MediaError, describe
from .fetch import TRANSIENT_STATUS, FetchError, FetchPolicy, fetch_url

__all__ = ["OBJECT_STORES", "Remote", "RemotePolicy"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# schemes that name an object store (fsspec protocols). Other fsspec protocols (ftp, ssh, memory, zip, ...) are
# not media sources: MediaAccess refuses them as before.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "oss", "az", "abfs", "abfss", "adl", "oci", "tos"})

# s3fs turns S3 errors into OSErrors (s3fs/errors.py): SlowDown/503 into EBUSY, InternalError/500 into EREMOTEIO,
# unknown codes into EIO, all transient. These errnos, on the other hand, say the request itself is wrong
# (400, 416, 405, 501, a redirect to another region)
_PERMANENT_ERRNO = frozenset(
    {errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOSYS, errno.ENOENT, errno.ENAMETOOLONG,
     getattr(errno, "EREMCHG", -1)}
)  # fmt: skip


@dataclass(frozen=True)
class RemotePolicy:
    concurrency: int = 8  # requests in flight at once, across all threads
    qps: float | None = None  # at most this many request starts (retries included) in any one second; None: no cap
    retries: int = 5  # further tries after the first, for transient faults only
    backoff: float = 0.25  # first wait in seconds; doubles each retry up to max_backoff; full jitter: uniform [0, w]
    max_backoff: float = 8.0
    timeout: float = 30.0  # per request: connect and read timeouts of object stores (http: the FetchPolicy's)
    # fsspec filesystem options per protocol, e.g. {"s3": {"endpoint_url": "http://127.0.0.1:5000"}}
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.qps is not None and not self.qps > 0:
            raise ValueError(f"qps must be positive or None, got {self.qps}")
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0 or not self.timeout > 0:
            raise ValueError("retries, backoff and max_backoff must be non-negative and timeout positive")


class _StartLimit:
    """A sliding-window log of request starts: a start waits until fewer than ``limit`` starts lie in the last
    ``window`` seconds. Unlike a token bucket it allows no burst beyond the cap in any window, which is what a
    store that counts requests per second sees. A fractional qps rounds down (2.5 allows 2 a second); under 1 it
    spaces starts 1/qps seconds apart. The window is ``MARGIN`` longer than a second: a store counts arrivals,
    which lag our starts by a varying few milliseconds (more on a busy machine), and must still count <= qps."""

    MARGIN = 0.1

    def __init__(self, qps: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        self.limit = max(1, math.floor(qps))
        self.window = max(1.0, 1.0 / qps) + self.MARGIN
        self._clock, self._sleep = clock, sleep  # a test's fake clock
        self._starts: deque[float] = deque()
        self._lock = threading.Lock()

    def wait(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                while self._starts and now >= self._starts[0] + self.window - 1e-9:  # 1e-9: float rounding
                    self._starts.popleft()
                if len(self._starts) < self.limit:
                    self._starts.append(now)
                    return
                delay = self._starts[0] + self.window - now
            self._sleep(delay)  # outside the lock; another thread may win the slot, then we wait again


@functools.cache
def _transport_errors() -> dict[str, tuple[type[BaseException], ...]]:
    """botocore's and aiohttp's connection-level errors by reason, where installed. They come before the OSError
    rule in :func:`_classify`: botocore's timeouts are OSErrors with no errno."""
    found: dict[str, list[type[BaseException]]] = {"timed out": [], "truncated body": [], "connection error": []}
    try:
        from botocore import exceptions as boto
        from botocore.parsers import ResponseParserError

        found["timed out"] += [boto.ReadTimeoutError, boto.ConnectTimeoutError]
        found["truncated body"] += [boto.IncompleteReadError]
        found["connection error"] += [boto.HTTPClientError, boto.ConnectionError, ResponseParserError]
    except ImportError:
        pass
    try:
        import aiohttp

        found["truncated body"].append(aiohttp.ClientPayloadError)
        found["connection error"].append(aiohttp.ClientError)
    except ImportError:
        pass
    return {reason: tuple(kinds) for reason, kinds in found.items()}


def _http_status(e: BaseException) -> int | None:
    """The HTTP status behind a boto error (s3fs keeps botocore's ClientError as the cause of its OSError)."""
    for error in (e, e.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def _classify(e: Exception) -> tuple[str, bool]:
    """A short reason for a failed request, and whether trying again may help."""
    if isinstance(e, FetchError):
        return e.reason, e.transient
    for kind, reason in ((FileNotFoundError, "not found"), (PermissionError, "permission denied"),
                         (IsADirectoryError, "is a directory"), (NotADirectoryError, "not a directory"),
                         (FileExistsError, "already exists")):  # fmt: skip
        if isinstance(e, kind):
            return reason, False
    if isinstance(e, TimeoutError):  # socket.timeout, asyncio's and fsspec's FSTimeoutError are all TimeoutError
        return "timed out", True
    for reason, kinds in _transport_errors().items():
        if isinstance(e, kinds):
            return reason, True
    if isinstance(e, ConnectionError):
        return "connection error", True
    status = _http_status(e)
    if isinstance(e, OSError):
        transient = e.errno not in _PERMANENT_ERRNO or status in TRANSIENT_STATUS
        if status is not None:
            return f"HTTP {status}", transient
        return (errno.errorcode.get(e.errno, "I/O error") if e.errno is not None else "I/O error"), transient
    if isinstance(e, ValueError):
        return "invalid request", False
    if status is not None:  # an untranslated boto error
        return f"HTTP {status}", status in TRANSIENT_STATUS
    return type(e).__name__, False  # NoCredentialsError, ParamValidationError, ...: the same call fails again


@functools.cache
def _single_try_http_session() -> type | None:
    """aiobotocore's HTTP session with aiohttp's own retry switched off. aiohttp sends an idempotent request once
    more when the connection drops before a response (RFC 9112, 9.3.1), a second request that our limiter would not
    see. Both names are private, so this applies only where they are found (tests/test_remote.py checks it holds)."""
    try:
        from aiobotocore.httpsession import AIOHTTPSession
    except ImportError:
        return None
    if not hasattr(AIOHTTPSession, "_get_session"):
        return None

    class SingleTryHTTPSession(AIOHTTPSession):
        async def _get_session(self, proxy_url):
            session = await super()._get_session(proxy_url)
            if hasattr(session, "_retry_connection"):
                session._retry_connection = False
            return session

    return SingleTryHTTPSession


def _missing_implementation(protocol: str, what: str) -> MediaError:
    from fsspec.registry import known_implementations

    if protocol in ("s3", "s3a"):
        return MediaError(f"{what}: {protocol}:// URIs need s3fs: pip install 'qwen2vl[storage]'")
    package = known_implementations[protocol]["class"].split(".")[0]
    return MediaError(f"{what}: {protocol}:// URIs need {package}: pip install {package}")


class Remote:
    """Reads (and uploads) through one set of limits shared by every thread that uses this object."""

    def __init__(self, policy: RemotePolicy = RemotePolicy()):
        self.policy = policy
        self._slots = threading.BoundedSemaphore(policy.concurrency)
        self._starts = _StartLimit(policy.qps) if policy.qps is not None else None
        self._filesystems: dict[str, Any] = {}  # one per protocol, made on first use
        self._filesystems_lock = threading.Lock()  # apart from the counts' lock: importing s3fs takes a while
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "retries": 0, "failures": 0}
        self._reasons: Counter[str] = Counter()

    def __reduce__(self):
        # pickled (a worker process): the same policy with fresh limits and counts, which are per process
        return (Remote, (self.policy,))

    def read(self, uri: str, name: str = "media", *, fetch: FetchPolicy = FetchPolicy(),
             max_bytes: int | None = None) -> bytes:  # fmt: skip
        """The bytes at ``uri``, at most ``max_bytes`` (default: the fetch policy's cap), or a :class:`MediaError`
        naming ``name``, the URI and the reason. http(s) goes through :func:`fetch_url` with ``fetch``'s limits."""
        what = f"{name} ({describe(uri)})"
        cap = fetch.max_bytes if max_bytes is None else max_bytes
        protocol = uri.split("://", 1)[0] if "://" in uri else ""
        if protocol in ("http", "https"):
            policy = fetch if max_bytes is None else replace(fetch, max_bytes=min(fetch.max_bytes, max_bytes))
            return self._retrying(what, lambda: fetch_url(uri, policy, name=name))
        if not protocol or protocol in ("file", "data"):
            raise MediaError(f"{what}: not a remote URI (expected s3://, oss://, gs://, http(s)://, ...)")
        fs = self._filesystem(protocol, what)

        def get() -> bytes | None:
            try:
                # one ranged GET: a byte past the cap shows the object is too big, with no HEAD request first
                return fs.cat_file(uri, start=0, end=cap + 1)
            except OSError as e:
                status = _http_status(e)
                if status == 416 or (status is None and e.errno == errno.EINVAL):
                    return None  # S3 answers any range on an empty object with 416 (EINVAL in s3fs)
                raise

        if (data := self._retrying(what, get)) is None:
            if self._retrying(what, lambda: fs.size(uri)) == 0:  # only now is the size worth a request
                return b""
            raise FetchError(f"{what}: the store refused the range request (HTTP 416)", reason="HTTP 416",
                             transient=False)  # fmt: skip
        if len(data) > cap:
            raise FetchError(f"{what}: more than the limit of {cap} bytes", reason="over the size limit",
                             transient=False)  # fmt: skip
        return data

    def put(self, local_path: str | Path, uri: str) -> None:
        """Upload a file to ``uri``, or a directory tree under it (``dir/a/b.png`` to ``uri/a/b.png``), each file
        with the same limits and retries as a read. Files are uploaded ``concurrency`` at a time."""
        local = Path(local_path)
        protocol = uri.split("://", 1)[0] if "://" in uri else ""
        if not protocol or protocol in ("http", "https", "file", "data"):
            raise MediaError(f"{describe(uri)}: uploads go to object stores only (s3://, oss://, gs://, ...)")
        if local.is_dir():
            files = sorted(p for p in local.rglob("*") if p.is_file())
            pairs = [(p, uri.rstrip("/") + "/" + p.relative_to(local).as_posix()) for p in files]
        elif local.is_file():
            pairs = [(local, uri)]
        else:
            raise MediaError(f"{describe(str(local))}: no such file or directory")
        fs = self._filesystem(protocol, f"upload to {describe(uri)}")

        def upload(pair: tuple[Path, str]) -> None:
            source, target = pair
            self._retrying(f"upload {describe(str(source))} ({describe(target)})",
                           lambda: fs.put_file(str(source), target))  # fmt: skip

        with ThreadPoolExecutor(min(self.policy.concurrency, max(1, len(pairs)))) as pool:
            for _ in pool.map(upload, pairs):  # re-raises the first failure
                pass

    def stats(self) -> dict:
        """Counts so far: ``requests`` (every try), ``retries``, ``failures`` (calls that raised), and ``reasons``:
        how often each reason made a try fail (retried or not)."""
        with self._lock:
            return {**self._counts, "reasons": dict(self._reasons)}

    def _count(self, key: str, reason: str | None = None) -> None:
        with self._lock:
            self._counts[key] += 1
            if reason is not None:
                self._reasons[reason] += 1

    def _retrying(self, what: str, request: Callable[[], T]) -> T:
        """``request()``, tried again on transient faults; each try holds a slot and passes the start limit."""
        tries = 1 + self.policy.retries
        for attempt in range(tries):
            with self._slots:  # held for the request only, never during the backoff sleep
                if self._starts is not None:
                    # after the slot, not before: starts taken while waiting for slots would fall due in a burst
                    self._starts.wait()
                self._count("requests")
                try:
                    return request()
                except MediaError as e:
                    if not isinstance(e, FetchError):
                        raise
                    error: Exception = e
                except Exception as e:
                    error = e
            reason, transient = _classify(error)
            if not transient:
                self._count("failures", reason)
                if isinstance(error, FetchError):
                    raise error
                raise FetchError(f"{what}: {reason} ({error})", reason=reason, transient=False) from error
            if attempt + 1 == tries:
                break
            wait = random.uniform(0, min(self.policy.max_backoff, self.policy.backoff * 2**attempt))
            log.debug("%s: %s; retry %d of %d in %.2f s", what, reason, attempt + 1, self.policy.retries, wait)
            self._count("retries", reason)
            time.sleep(wait)
        self._count("failures", reason)
        tried = "1 try" if tries == 1 else f"{tries} tries"
        raise FetchError(f"{what}: failed after {tried} ({reason})", reason=reason, transient=True) from error

    def _filesystem(self, protocol: str, what: str) -> Any:
        with self._filesystems_lock:
            if (fs := self._filesystems.get(protocol)) is None:
                fs = self._filesystems[protocol] = self._open(protocol, what)
            return fs

    def _open(self, protocol: str, what: str) -> Any:
        try:
            import fsspec
        except ImportError:
            raise MediaError(f"{what}: {protocol}:// URIs need fsspec: pip install 'qwen2vl[storage]'") from None
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except ImportError:
            raise _missing_implementation(protocol, what) from None
        except ValueError:
            raise MediaError(f"{what}: no fsspec implementation knows {protocol}:// URIs") from None
        options = dict(self.policy.storage_options.get(protocol, {}))
        s3 = cls.__module__.split(".")[0] == "s3fs"
        if s3:
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("connect_timeout", self.policy.timeout)
            config.setdefault("read_timeout", self.policy.timeout)
            config.setdefault("max_pool_connections", max(10, self.policy.concurrency))
            # botocore's max_attempts counts retries, total_max_attempts counts tries: 1 is the first try only
            config["retries"] = {**config.get("retries", {}), "total_max_attempts": 1}
            config["retries"].pop("max_attempts", None)
            if "http_session_cls" not in config and (session := _single_try_http_session()) is not None:
                config["http_session_cls"] = session
            options["config_kwargs"] = config
        # our own instance: fsspec shares instances with equal options, and we change one attribute below
        fs = cls(skip_instance_cache=True, **options)
        if s3:
            fs.retries = 1  # a class attribute, not a constructor option (it would reach botocore's session)
        return fs
