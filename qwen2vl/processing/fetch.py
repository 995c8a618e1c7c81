"""Fetching media over http(s) with limits: a timeout, a size cap enforced while downloading, no redirects,
and no connection to loopback, private or link-local addresses unless the host is explicitly allowed.

The address check is done on the resolved address, and the connection then goes to that same address (the host
name is kept for the Host header and TLS), so a DNS answer cannot change between the check and the connection.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import MediaError, describe

__all__ = ["FetchPolicy", "fetch_url", "resolve"]


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
    """The body of ``url`` (http or https), or a :class:`MediaError` that says why not."""
    what = f"{name} ({describe(url)})"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise MediaError(f"{what}: only http and https URLs can be fetched")
    if not (host := parts.hostname):
        raise MediaError(f"{what}: the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise MediaError(f"{what}: bad port in the URL") from None
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise MediaError(f"{what}: cannot resolve host {host!r} ({e})") from None
    if not addresses:
        raise MediaError(f"{what}: host {host!r} has no address")
    trusted = policy.allow_private or _domain_allowed(host, policy.allowed_domains)
    refused = [a for a in addresses if not is_public(a)]
    if refused and not trusted:
        # all addresses must be public: a host with one private address could be steered to it
        raise MediaError(f"{what}: host {host!r} resolves to a non-public address ({refused[0]}); refused")

    deadline = time.monotonic() + policy.timeout
    conn = _PinnedHTTPConnection(host, port, addresses[0], policy.timeout, tls=parts.scheme == "https")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", target, headers={"User-Agent": "qwen2vl", "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise MediaError(f"{what}: redirect ({response.status}) refused; give the final URL")
        if response.status != 200:
            raise MediaError(f"{what}: HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > policy.max_bytes:
            raise MediaError(f"{what}: {int(length)} bytes is over the limit of {policy.max_bytes}")
        chunks, size = [], 0
        while chunk := response.read(64 * 1024):
            size += len(chunk)
            if size > policy.max_bytes:
                raise MediaError(f"{what}: more than the limit of {policy.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise MediaError(f"{what}: download took longer than {policy.timeout:g} s")
            chunks.append(chunk)
        return b"".join(chunks)
    except (OSError, http.client.HTTPException) as e:
        reason = "timed out" if isinstance(e, TimeoutError | socket.timeout) else (str(e) or type(e).__name__)
        raise MediaError(f"{what}: fetch failed ({reason})") from None
    finally:
        conn.close()
