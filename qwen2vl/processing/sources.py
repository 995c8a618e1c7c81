"""Where media may come from: local files (anywhere, nowhere, or inside one directory), data URLs, http(s) URLs
(through :func:`fetch_url`'s limits) and object stores (s3://, oss://, gs://, ... through a :class:`Remote`), each
capped in size. The library's default trusts local files and reads object stores with the user's own credentials
(it runs on the user's machine); the server's default trusts no local file, fetches only public addresses and
reads no object store, since it must not use its own credentials on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MediaError, describe
from .fetch import FetchPolicy, fetch_url
from .remote import OBJECT_STORES, Remote


@dataclass(frozen=True)
class MediaAccess:
    local: bool | str | Path = True  # True: any local file; False: none; a directory: only files inside it
    fetch: FetchPolicy | None = field(default_factory=FetchPolicy)  # None: no http(s) URLs
    max_bytes: int = 64 * 2**20  # for local files, data URLs and object stores (downloads: the fetch policy's cap)
    remote: Remote | None = None  # None: no object-store URIs, and http(s) fetched once with no retries

    def read(self, source: object, name: str) -> bytes | Path:
        """The bytes or the local path behind a media source: bytes, a path, ``file://``, ``data:``, http(s), or
        an object-store URI such as ``s3://bucket/key``."""
        what = f"{name} ({describe(source)})"
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if len(data) > self.max_bytes:
                raise MediaError(f"{what}: {len(data)} bytes is over the limit of {self.max_bytes}")
            return data
        if isinstance(source, Path):
            source = str(source)
        if not isinstance(source, str):
            raise MediaError(f"{what}: expected a path, URL, data URL or bytes, got {type(source).__name__}")
        if source.startswith("data:"):
            header, sep, payload = source.partition(",")
            if not sep or ";base64" not in header:
                raise MediaError(f"{what}: a data URL must be base64 ('data:<type>;base64,<data>')")
            if len(payload) * 3 // 4 > self.max_bytes:  # before decoding anything
                raise MediaError(f"{what}: the data URL holds over {self.max_bytes} bytes")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise MediaError(f"{what}: invalid base64 in the data URL") from None
        if source.startswith(("http://", "https://")):
            if self.fetch is None:
                raise MediaError(f"{what}: URLs are not allowed here")
            if self.remote is not None:  # retries, and the concurrency and rate caps shared by all readers
                return self.remote.read(source, name, fetch=self.fetch)
            return fetch_url(source, self.fetch, name=name)
        scheme = source.split("://", 1)[0] if "://" in source else ""
        if scheme in OBJECT_STORES:
            if self.remote is None:
                raise MediaError(f"{what}: object-store URIs ({scheme}://...) are not allowed here")
            return self.remote.read(source, name, max_bytes=self.max_bytes)
        if scheme and scheme != "file":
            raise MediaError(f"{what}: unsupported URL scheme {scheme!r}")
        return self._local(Path(source.removeprefix("file://")).expanduser(), what)

    def _local(self, path: Path, what: str) -> Path:
        if self.local is False:
            raise MediaError(f"{what}: local files are not allowed here")
        if self.local is not True:
            root = os.path.realpath(self.local)
            real = os.path.realpath(path)  # resolves '..' and every symlink on the way
            if os.path.commonpath([real, root]) != root:
                raise MediaError(f"{what}: outside the allowed media directory")
            path = Path(real)
        if not path.exists():
            raise MediaError(f"{what}: no such file")
        if not path.is_file():
            raise MediaError(f"{what}: not a regular file")
        if not os.access(path, os.R_OK):
            raise MediaError(f"{what}: not readable (permission denied)")
        if path.stat().st_size > self.max_bytes:
            raise MediaError(f"{what}: {path.stat().st_size} bytes is over the limit of {self.max_bytes}")
        return path


TRUST_LOCAL = MediaAccess(remote=Remote())  # the python API and the CLI, on the user's own machine
