"""The one error type of preprocessing: bad media or bad messages, named and explained in one line."""

import os


class MediaError(ValueError):
    """An image, video or message that cannot be used. The message names the item and the reason,
    e.g. ``image 2 ('cat.png'): not a readable image (truncated file)``."""


def describe(source: object, limit: int = 60) -> str:
    """A short, printable name for a media source, for error messages (never the whole data URL)."""
    if isinstance(source, os.PathLike):
        source = str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str):
        if source.startswith("data:"):
            return f"<{source.partition(',')[0]}, {len(source)} chars>"
        return repr(source if len(source) <= limit else "..." + source[3 - limit :])  # the file name is at the end
    if isinstance(source, (list, tuple)):
        return f"<list of {len(source)} frames>"
    return f"<{type(source).__name__}>"
