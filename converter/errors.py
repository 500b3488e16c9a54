"""Error classes shared by the conversion engine and the webhook's retry policy.

The webhook decides between "try again later" and "give up now" only by these base classes, so every
error the pipeline raises on purpose must derive from one of them.
"""

from __future__ import annotations


class ConversionError(Exception):
    """Base of every error the conversion pipeline raises on purpose."""


class TransientError(ConversionError):
    """Worth retrying: network failure, registry 5xx or 429, timeout, lost lease."""


class PermanentError(ConversionError):
    """Retrying cannot help: bad or unsupported image, auth refused after a token refresh."""
