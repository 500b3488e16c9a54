"""The names an event or API call may carry: registry host, repository, tag, digest.

Grammars are those of the distribution reference package (`reference/regexp.go`) and of the OCI
distribution spec, in ASCII only (Python's `\\w` would also accept any Unicode letter). Each check
returns None for a valid value, else a one-line reason naming the field, so intake can ignore the
event as `malformed` and say why.
"""

from __future__ import annotations

import re

from webhook.limits import clip

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
# host[:port]: a DNS name (labels of letters, digits and inner hyphens), an IPv4 address, or an IPv6
# address in brackets; the port, if any, is 1-65535. Nothing else: no scheme, path, user or `oci:`.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_RE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\])(?::(?P<port>[0-9]{{1,5}}))?")
MAX_REPOSITORY = 255
MAX_HOST = 253 + 6


def host_problem(host: str) -> str | None:
    """Why `host` is not a registry `host[:port]`, or None."""
    match = HOST_RE.fullmatch(host) if len(host) <= MAX_HOST else None
    if match is None:
        return f"registry {clip(host, 80)!r} is not a host[:port]"
    port = match.group("port")
    if port is not None and not 0 < int(port) <= 65535:
        return f"registry {clip(host, 80)!r}: port out of range"
    return None


def normalise_host(host: str) -> str:
    """DNS names are case-insensitive: compare and store them in lower case."""
    return host.lower()


def repository_problem(repository: str) -> str | None:
    if len(repository) > MAX_REPOSITORY:
        return f"repository name is longer than {MAX_REPOSITORY} characters"
    if not REPOSITORY_RE.fullmatch(repository):
        return (f"repository {clip(repository, 80)!r} is not a valid name "
                "(lowercase letters, digits, separators . _ __ - and /)")
    return None


def tag_problem(tag: str) -> str | None:
    if not TAG_RE.fullmatch(tag):
        return f"tag {clip(tag, 80)!r} is not a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
    return None


def digest_problem(digest: str) -> str | None:
    if not DIGEST_RE.fullmatch(digest):
        return f"digest {clip(digest, 80)!r} is not sha256:<64 hex> (or sha512:<128 hex>)"
    return None
