"""Error classes shared by the conversion engine and the webhook's retry policy.

The webhook decides between "try again later" and "give up now" only by these base classes, so every
error the pipeline raises on purpose must derive from one of them.

Every message is bounded at the source (`shorten`): a layer can name a 1 MiB path, a registry can answer
with a huge body, and whatever we put in an exception ends up in logs, the job store and the status page.
"""

from __future__ import annotations

MAX_MESSAGE = 4096  # characters of an error message we keep: enough for a layer, an entry and a cause
MAX_NAME = 1024  # characters of a name (tar entry, path, field) quoted inside a message


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` if it fits in `limit` characters, else its head and tail around a note of what was cut."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 2)
    head, tail = keep * 3 // 4, keep // 4
    return f"{text[:head]}…[{len(text) - head - tail} chars cut]…{text[len(text) - tail:]}"


class ConversionError(Exception):
    """Base of every error the conversion pipeline raises on purpose. The message is bounded (shorten)."""

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str) and len(args[0]) > MAX_MESSAGE:
            args = (shorten(args[0]), *args[1:])
        super().__init__(*args)


class TransientError(ConversionError):
    """Worth retrying: network failure, registry 5xx or 429, timeout, lost lease."""


class PermanentError(ConversionError):
    """Retrying cannot help: bad or unsupported image, auth refused after a token refresh."""


class ImageError(PermanentError):
    """The source is not an image we can convert; the message names the manifest, layer or field."""
