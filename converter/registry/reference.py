"""Image references: ``[host[:port]/]repository[:tag][@digest]`` with Docker Hub normalisation."""

from __future__ import annotations

import re
from dataclasses import dataclass

from converter.registry.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

# The grammar of the distribution reference package (docker/distribution/reference/regexp.go).
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
# The distribution grammar's \w is ASCII (Go regexp): a Unicode letter is not a valid tag.
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
HOST_RE = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
MAX_REPOSITORY = 255


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``registry`` is as written (``docker.io`` for Docker Hub)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Host[:port] to send API requests to (Docker Hub's API lives on registry-1.docker.io)."""
        return DOCKER_HUB_API if self.registry in DOCKER_HUB_ALIASES else self.registry

    @property
    def ref(self) -> str:
        """What to put after ``/manifests/``: the digest when pinned, else the tag (default ``latest``)."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        if not TAG_RE.fullmatch(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r}")
        return Reference(self.registry, self.repository, tag)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


def parse_reference(text: str, *, default_registry: str = DOCKER_HUB) -> Reference:
    """Parse ``[host[:port]/]repo[:tag][@digest]``; names the offending part on error.

    Without a host the reference is on ``default_registry`` (Docker Hub), where a one-part
    repository gets the ``library/`` prefix, as ``docker pull`` does.
    """
    if not text or text != text.strip():
        raise InvalidReferenceError(f"invalid image reference {text!r}: empty or surrounded by spaces")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.fullmatch(digest):
            raise InvalidReferenceError(f"invalid digest {digest!r} in {text!r} (expected sha256:<64 hex>)")
    first, sep, remainder = rest.partition("/")
    if sep and _looks_like_host(first):
        registry, path = first, remainder
        if not HOST_RE.fullmatch(registry):
            raise InvalidReferenceError(f"invalid registry host {registry!r} in {text!r}")
    else:
        registry, path = default_registry, rest
    tag = None
    name, colon, maybe_tag = path.rpartition(":")
    if colon and "/" not in maybe_tag:
        path, tag = name, maybe_tag
        if not TAG_RE.fullmatch(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r} in {text!r}")
    if registry in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    if not REPOSITORY_RE.fullmatch(path):
        raise InvalidReferenceError(
            f"invalid repository {path!r} in {text!r} (lowercase letters, digits, separators . _ __ - and /)")
    if len(path) > MAX_REPOSITORY:
        raise InvalidReferenceError(f"repository name in {text!r} is longer than {MAX_REPOSITORY} characters")
    return Reference(registry, path, tag, digest)
