"""Shared-secret authentication for hooks, API, status page and metrics.

Accepted forms of the `Authorization` header, for each configured secret (several allow rotation):
`Bearer <secret>` (Distribution's static header), the secret verbatim (Harbor copies the policy's
`auth_header` as is), and HTTP Basic with the secret as password (browsers, for the status page).
Every candidate is compared with `hmac.compare_digest` and all comparisons always run, so the time
taken does not reveal which secret, or how much of one, matched.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence


def _candidates(header: str) -> list[bytes]:
    values = [header.encode("utf-8", "replace")]
    scheme, _, rest = header.partition(" ")
    if scheme.lower() == "bearer":
        values.append(rest.strip().encode("utf-8", "replace"))
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        values.append(decoded.partition(":")[2].encode("utf-8", "replace"))
    return values


def authorized(header: str | None, secrets: Sequence[str]) -> bool:
    """True if the Authorization header carries one of `secrets`. A missing header never passes."""
    if not header or not secrets:
        return False
    match = False
    for candidate in _candidates(header):
        for secret in secrets:
            match |= hmac.compare_digest(candidate, secret.encode("utf-8"))
    return match
