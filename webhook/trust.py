"""Which registries the service talks to, and which registry an event is about.

A registry event names its host in fields the pushing client controls (Distribution copies the
client's `Host` header into `request.host` and `target.url`), so an event's host is a claim, never an
address to connect to. The service only contacts registries the operator configured (`registries:`
keys and their `aliases`); with none configured, only loopback registries (`localhost`, `127.0.0.1`,
`[::1]`, any port), so a first `make run` works against a registry on the same machine. A hook URL
may name its registry (`/hooks/distribution/<registry>`): events arriving there are about that
registry, and an event claiming another host is ignored as `host_not_allowed`. See docs/webhook.md,
"Threat model".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

from webhook.config import RegistrySettings
from webhook.names import host_problem, normalise_host

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def _name_of(host: str) -> str:
    """The host without its port (`[::1]:5000` -> `[::1]`)."""
    if host.startswith("["):
        return host[: host.index("]") + 1]
    return host.partition(":")[0]


def is_loopback(host: str) -> bool:
    return _name_of(normalise_host(host)) in LOOPBACK_NAMES


def configured_registry(registries: Mapping[str, RegistrySettings], host: str) -> str | None:
    """The configured registry that `host` names (its key, by name or alias), or None if `host` is
    not one the service may contact. Without configured registries, loopback hosts name themselves."""
    if host_problem(host) is not None:
        return None
    host = normalise_host(host)
    if not registries:
        return host if is_loopback(host) else None
    for name, settings in registries.items():
        if host == normalise_host(name) or host in {normalise_host(a) for a in settings.aliases}:
            return name
    return None


def event_registry(claimed: str, bound: str | None,
                   registries: Mapping[str, RegistrySettings]) -> tuple[str | None, str | None]:
    """(registry to use, None) for an event claiming host `claimed` (may be empty) that arrived on a
    hook bound to registry `bound` (None for an unbound hook); else (None, reason to ignore it)."""
    if bound is not None:
        if not claimed or configured_registry(registries, claimed) == bound:
            return bound, None
        return None, "host_not_allowed"
    if not claimed:
        return None, "no_registry"
    registry = configured_registry(registries, claimed)
    return (registry, None) if registry is not None else (None, "host_not_allowed")


@lru_cache(maxsize=256)
def host_glob(pattern: str) -> re.Pattern[str]:
    """A rule's registry pattern as a regex over `host[:port]`: `*` and `?` never match `/`, every
    other character (brackets of IPv6 addresses included) is literal, names compare case-insensitively."""
    parts = [{"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)) for c in pattern]
    return re.compile("".join(parts), re.IGNORECASE)


def host_matches(pattern: str, host: str) -> bool:
    return host_problem(host) is None and host_glob(pattern).fullmatch(host) is not None
