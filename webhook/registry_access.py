"""How the service reaches a registry outside a conversion: one rate-limited client per run, and the walk
over repositories (catalog, Harbor's API, or an explicit list) that backfills and stale reports share."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from webhook.config import Config, RegistrySettings

if TYPE_CHECKING:  # the registry client loads only when a run needs it
    from converter.registry import RegistryClient

GLOB_CHARS = re.compile(r"[*?\[]")


class ListingError(RuntimeError):
    """The registry's repositories cannot be listed; the message says what to do instead."""


def open_client(config: Config, registry: str, *, quick: bool = False) -> RegistryClient:
    """A client for `registry` with the configured endpoint, credentials, TLS and rate limit.

    `quick`: two tries within 10 s (a request handler answering a user), instead of the full budget.
    """
    return client_for(registry, config.registries.get(registry), config.backfill.requests_per_second or None,
                      quick=quick)


def client_for(registry: str, settings: RegistrySettings | None, rate_limit: float | None = None, *,
               quick: bool = False) -> RegistryClient:
    from converter.options import RegistryOptions
    from converter.registry import RetryPolicy
    from converter.transport import registry_client

    options = RegistryOptions.coerce(settings.client_options() if settings is not None else None)
    retry = RetryPolicy(attempts=2, total=10.0, max_wait=2.0) if quick else None
    return registry_client(registry, options, retry=retry, rate_limit=rate_limit)


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def explicit(patterns: Sequence[str]) -> bool:
    """True when the patterns name repositories outright (no glob), so no listing is needed."""
    return bool(patterns) and not any(GLOB_CHARS.search(p) for p in patterns)


def repositories(client: RegistryClient, patterns: Sequence[str], page_size: int) -> Iterator[str]:
    """The registry's repositories matching `patterns`: the names themselves when none is a glob, else
    `/v2/_catalog`, else (catalog refused before its first page) Harbor's project/repository API."""
    from converter.registry import RegistryError

    if explicit(patterns):
        yield from dict.fromkeys(patterns)
        return
    listed = 0
    try:
        for name in client.list_repositories(page_size):
            listed += 1
            if matches(name, patterns):
                yield name
        return
    except RegistryError as catalog_error:
        if listed:
            raise ListingError(f"{client.host}: the catalog failed after {listed} repositories: "
                               f"{catalog_error}") from None
        failure = catalog_error
    try:
        for name in client.list_harbor_repositories(page_size):
            if matches(name, patterns):
                yield name
    except RegistryError as harbor_error:
        raise ListingError(
            f"{client.host}: cannot list repositories: /v2/_catalog answered {failure}; Harbor's API answered "
            f"{harbor_error}. Name the repositories explicitly (e.g. --repository team/app) or give the "
            "service credentials that may read the catalog") from None
