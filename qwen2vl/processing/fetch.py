"""Fetching media over http(s) with limits: a timeout, a size cap enforced while downloading, no redirects,
and no connection to loopback, private or link-local addresses unless the host is explicitly allowed.

The address check is done on the resolved address, and the connection then goes to that same address (the host
name is kept for the Host header and TLS), so a DNS answer cannot change between the check and the connection.

Every failure is a :class:`FetchError` that says whether trying again could help (``transient``: 408, 429, 5xx
gateway errors, timeouts, resets, truncated bodies) or not (other 4xx, redirects, the size cap, refused addresses,
bad URLs), so that :mod:`.remote` retries only what a retry can fix.
"""

from __future__ import annotations

import http.client
import ipaddress
import errno
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import MediaError, describe

__all__ = ["FetchError", "FetchPolicy", "fetch_url", "resolve"]

# statuses a server sends when it is overloaded or a hop timed out: the same request may well succeed later
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class FetchError(MediaError):
    """A failed fetch. ``reason`` is short and stable enough to count by ("HTTP 503", "timed out", "truncated
    body", "connection reset"); ``transient`` says whether the same request may succeed if tried again."""

    def __init__(self, message: str, *, reason: str, transient: bool):
        super().__init__(message)
        self.reason = reason
        self.transient = transient


def _network_reason(e: BaseException) -> tuple[str, bool]:
    """A short reason for a network failure, and whether it is transient."""
    if isinstance(e, http.client.IncompleteRead):
        return "truncated body", True
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out", True
    if isinstance(e, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "connection reset", True  # RemoteDisconnected (closed with no response) is a reset too
    if isinstance(e, ConnectionRefusedError):
        return "connection refused", True
    if isinstance(e, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted", False
    if isinstance(e, OSError):
        unreachable = e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
        return ("unreachable" if unreachable else "connection error"), True
    return "bad HTTP response", False  # a malformed status line or headers: the same server will send it again


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0  # seconds for the whole download
    max_bytes: int = 64 * 2**20
    allowed_domains: tuple[str, ...] = ()  # hosts (and their subdomains) that may resolve to private addresses
    allow_private: bool = False  # every host may resolve to a private address (tests, trusted networks)


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (stubbed in tests)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return ip.is_global and not ip.is_multicast


def _domain_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d.lower() or host.endswith("." + d.lower()) for d in allowed)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address already checked, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: bool):
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._tls:
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)


def fetch_url(url: str, policy: FetchPolicy = FetchPolicy(), *, name: str = "media") -> bytes:
    """The body of ``url`` (http or https), or a :class:`FetchError` that says why not and whether to retry."""
    what = f"{name} ({describe(url)})"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"{what}: only http and https URLs can be fetched", reason="bad URL", transient=False)
    if not (host := parts.hostname):
        raise FetchError(f"{what}: the URL has no host", reason="bad URL", transient=False)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError(f"{what}: bad port in the URL", reason="bad URL", transient=False) from None
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as e:
        # "try again later" from the resolver is transient; an unknown name stays unknown
        retry = isinstance(e, socket.gaierror) and e.errno == socket.EAI_AGAIN
        raise FetchError(f"{what}: cannot resolve host {host!r} ({e})", reason="cannot resolve host",
                         transient=retry) from None  # fmt: skip
    if not addresses:
        raise FetchError(f"{what}: host {host!r} has no address", reason="cannot resolve host", transient=False)
    trusted = policy.allow_private or _domain_allowed(host, policy.allowed_domains)
    refused = [a for a in addresses if not is_public(a)]
    if refused and not trusted:
        # all addresses must be public: a host with one private address could be steered to it
        raise FetchError(f"{what}: host {host!r} resolves to a non-public address ({refused[0]}); refused",
                         reason="non-public address", transient=False)  # fmt: skip

    deadline = time.monotonic() + policy.timeout

    def time_left() -> float:
        # the socket timeout is what is left of the whole budget, set before every blocking step, so a server
        # that stalls (or trickles) mid-body cannot hold us much past policy.timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    conn = _PinnedHTTPConnection(host, port, addresses[0], policy.timeout, tls=parts.scheme == "https")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    response = None
    try:
        conn.connect()
        sock = conn.sock  # kept: the connection drops it once the response says it will close
        sock.settimeout(time_left())
        conn.request("GET", target, headers={"User-Agent": "qwen2vl", "Accept-Encoding": "identity"})
        sock.settimeout(time_left())
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise FetchError(f"{what}: redirect ({response.status}) refused; give the final URL",
                             reason="redirect", transient=False)  # fmt: skip
        if response.status != 200:
            raise FetchError(f"{what}: HTTP {response.status} {response.reason}", reason=f"HTTP {response.status}",
                             transient=response.status in TRANSIENT_STATUS)  # fmt: skip
        length = response.getheader("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        if expected is not None and expected > policy.max_bytes:
            raise FetchError(f"{what}: {expected} bytes is over the limit of {policy.max_bytes}",
                             reason="over the size limit", transient=False)  # fmt: skip
        chunks, size = [], 0
        while True:
            sock.settimeout(time_left())
            if not (chunk := response.read1(64 * 1024)):  # read1: one recv, so each wait is bounded by the above
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise FetchError(f"{what}: more than the limit of {policy.max_bytes} bytes",
                                 reason="over the size limit", transient=False)  # fmt: skip
            if time.monotonic() > deadline:
                raise FetchError(f"{what}: download took longer than {policy.timeout:g} s", reason="timed out",
                                 transient=True)  # fmt: skip
            chunks.append(chunk)
        if expected is not None and size < expected:
            # http.client ends a short body quietly when reading in pieces: the server hung up mid-body
            raise FetchError(f"{what}: fetch failed (truncated body: {size} of {expected} bytes)",
                             reason="truncated body", transient=True)  # fmt: skip
        return b"".join(chunks)
    except (OSError, http.client.HTTPException) as e:
        reason, transient = _network_reason(e)
        detail = "timed out" if reason == "timed out" else (str(e) or type(e).__name__)
        raise FetchError(f"{what}: fetch failed ({detail})", reason=reason, transient=transient) from None
    finally:
        if response is not None:
            response.close()  # a response that will close owns the socket: closing the connection alone leaves it open
        conn.close()
