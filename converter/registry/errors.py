"""Registry errors. Each is either transient (worth a later retry) or permanent, via converter.errors."""

from __future__ import annotations

import json
from dataclasses import dataclass

from converter.errors import ConversionError, PermanentError, TransientError


@dataclass
class RegistryErrorDetail:
    """One item of the registry's ``{"errors": [{"code", "message", "detail"}]}`` body."""

    code: str
    message: str
    detail: object = None


class RegistryError(ConversionError):
    """A registry request failed. ``status`` is the HTTP status (None without a response)."""

    def __init__(self, message: str, *, status: int | None = None, errors: list[RegistryErrorDetail] | None = None,
                 method: str | None = None, path: str | None = None):
        self.status = status
        self.errors = errors or []
        self.method = method
        self.path = path
        super().__init__(message)


class RegistryTransientError(RegistryError, TransientError):
    """Network failure, timeout, 5xx or 429 that outlasted the retry budget."""


class RegistryPermanentError(RegistryError, PermanentError):
    """Any other 4xx, or a protocol violation; retrying cannot help."""


class AuthError(RegistryPermanentError):
    """401 after one credential/token refresh, or 403: the credentials do not grant the action."""


class NotFoundError(RegistryPermanentError):
    """404: the repository, manifest, blob or upload does not exist."""


class DigestMismatchError(RegistryPermanentError):
    """Content does not match its digest or size."""


class UnsupportedManifestError(RegistryPermanentError):
    """Schema 1 or an unknown manifest media type."""


class InvalidReferenceError(PermanentError, ValueError):  # PermanentError first: its __init__ bounds the message
    """An image reference that does not parse; the message names the bad part."""


class DeleteUnsupportedError(RegistryPermanentError):
    """405 / UNSUPPORTED on a manifest DELETE: the registry does not allow deletes (Distribution needs
    ``storage.delete.enabled: true``)."""


class TLSError(RegistryPermanentError):
    """Certificate verification failed (or client certificate refused)."""


def parse_error_body(body: bytes) -> list[RegistryErrorDetail]:
    """The registry's error list, or [] when the body is not the standard error JSON."""
    try:
        data = json.loads(body)
        return [RegistryErrorDetail(str(e.get("code", "")), str(e.get("message", "")), e.get("detail"))
                for e in data.get("errors", []) if isinstance(e, dict)]
    except (ValueError, AttributeError, TypeError):
        return []


def describe(method: str, path: str, status: int, errors: list[RegistryErrorDetail], body: bytes) -> str:
    """``GET /v2/x/manifests/v1: HTTP 404 MANIFEST_UNKNOWN: manifest unknown`` (body text if not JSON)."""
    if errors:
        what = "; ".join(f"{e.code}: {e.message}" if e.message else e.code for e in errors)
    else:
        what = body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    return f"{method} {path}: HTTP {status} {what}"
