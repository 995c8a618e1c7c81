"""Where media may come from: local files only inside an allowed directory (no '..' or symlinks out), size caps
checked before decoding, URL schemes."""

import base64
import os

import pytest

from qwen2vl.processing.errors import MediaError
from qwen2vl.processing.sources import MediaAccess


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"inside")
    (tmp_path / "secret.txt").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.txt", root / "link_out.png")
    os.symlink(root / "sub" / "a.png", root / "link_in.png")
    return root


def test_files_inside_the_allowed_directory(tree):
    access = MediaAccess(local=tree)
    for source in (str(tree / "sub" / "a.png"), f"file://{tree}/sub/a.png", str(tree / "sub" / ".." / "sub" / "a.png"),
                   str(tree / "link_in.png")):  # fmt: skip
        assert access.read(source, "image 1").read_bytes() == b"inside"


@pytest.mark.parametrize("relative", ["../secret.txt", "sub/../../secret.txt", "link_out.png"])
def test_nothing_outside_it(tree, relative):
    with pytest.raises(MediaError, match="outside the allowed media directory"):
        MediaAccess(local=tree).read(str(tree / relative), "image 1")
    with pytest.raises(MediaError, match="outside the allowed media directory"):
        MediaAccess(local=tree).read(f"file://{tree}/{relative}", "image 1")


def test_no_local_files_at_all(tree):
    with pytest.raises(MediaError, match="image 2 .*local files are not allowed"):
        MediaAccess(local=False).read(str(tree / "sub" / "a.png"), "image 2")


def test_size_caps_before_decoding(tree):
    small = MediaAccess(max_bytes=4)
    with pytest.raises(MediaError, match="6 bytes is over the limit of 4"):
        small.read(str(tree / "sub" / "a.png"), "image 1")
    with pytest.raises(MediaError, match="over the limit"):
        small.read(b"123456", "image 1")
    big_url = "data:image/png;base64," + base64.b64encode(b"x" * 300).decode()
    with pytest.raises(MediaError, match="holds over 4 bytes"):
        small.read(big_url, "image 1")
    assert MediaAccess().read(big_url, "image 1") == b"x" * 300


def test_schemes(tree):
    with pytest.raises(MediaError, match="unsupported URL scheme 'ftp'"):
        MediaAccess().read("ftp://example.com/a.png", "image 1")
    with pytest.raises(MediaError, match="URLs are not allowed"):
        MediaAccess(fetch=None).read("https://example.com/a.png", "image 1")
