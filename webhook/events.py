"""Normalise registry notifications (Distribution, Harbor, zot) into `RegistryEvent`s.

Formats are described in the reference document `registry-events.md`. Parsing is strict about the
envelope (a body that is not the documented shape is a client error) and lenient per event: one odd
event inside a valid envelope becomes a `malformed` event that is ignored, never an error, because a
4xx answer would block Distribution's delivery queue forever.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from webhook.limits import MAX_EVENT_ID, MAX_JSON_DEPTH, bounds_problem, parse_int

BLOB_MEDIA_TYPE = "application/octet-stream"
DISTRIBUTION_MEDIA_TYPES = (
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
)
CLOUDEVENTS_MEDIA_TYPE = "application/cloudevents+json"
HARBOR_PUSH_TYPES = {"PUSH_ARTIFACT": "push", "PULL_ARTIFACT": "pull", "DELETE_ARTIFACT": "delete"}
HARBOR_CLOUDEVENT_TYPES = {
    "harbor.artifact.pushed": "push",
    "harbor.artifact.pulled": "pull",
    "harbor.artifact.deleted": "delete",
}
ZOT_CLOUDEVENT_TYPES = {"zotregistry.image.updated": "push", "zotregistry.image.deleted": "delete"}


class PayloadError(ValueError):
    """The request body is not a notification of the expected format (answered with 400)."""


@dataclass(frozen=True)
class RegistryEvent:
    """One registry event, whatever format it arrived in."""

    source: str  # distribution | harbor | zot | api
    event_id: str
    action: str  # push | pull | mount | delete | <other, lower-case>
    registry: str
    repository: str
    tag: str | None
    digest: str | None
    media_type: str | None
    actor: str | None = None
    user_agent: str | None = None
    artifact_type: str | None = None
    references: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)
    malformed: str | None = None  # why the event could not be read, if it could not


def parse_json(body: bytes) -> Any:
    """The body as JSON. Integers too long to be field values stay text (`limits.BigNumber`, which makes
    their event malformed); nesting deep enough to exhaust the parser's recursion is a PayloadError."""
    try:
        return json.loads(body, parse_int=parse_int)
    except RecursionError:
        raise PayloadError("body is not acceptable JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and float/int conversion limits
        raise PayloadError(f"body is not valid JSON: {str(exc)[:200]}") from None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _malformed(source: str, event_id: str, why: str) -> RegistryEvent:
    return RegistryEvent(source, event_id, "unknown", "", "", None, None, None, malformed=why)


def _body_id(prefix: str, payload: Any) -> str:
    """A stable id for formats without one: retries of the same delivery resend the same body."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return f"{prefix}:{hashlib.sha256(canonical).hexdigest()[:32]}"


def _event_id(prefix: str, raw: str | None, payload: Any) -> str:
    """The delivery id the sender gave, if it is a short printable string; a long or odd one is kept
    as its hash (still stable across redeliveries), and a missing one derived from the body."""
    if raw is None:
        return _body_id(prefix, payload)
    if len(raw) <= MAX_EVENT_ID and raw.isprintable() and raw.isascii():
        return raw
    return f"{prefix}:id-{hashlib.sha256(raw.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


def _host_of(url: str | None) -> str | None:
    """The host[:port] part of a URL, or None when there is none or it is not a URL."""
    if not url:
        return None
    try:
        parts = urlsplit(url if "://" in url else "//" + url)
    except ValueError:  # e.g. "http://[::1" (unbalanced IPv6 bracket)
        return None
    return parts.netloc or None


def _within_bounds(value: Any, depth: int) -> str | None:
    """Why this part of a payload is out of bounds (too deep, oversized number, lone surrogate)."""
    return bounds_problem(value, MAX_JSON_DEPTH - depth)


# --- Distribution --------------------------------------------------------------------------------


def parse_distribution(payload: Any) -> list[RegistryEvent]:
    """`{"events": [...]}` from Distribution 2.8 (v1+json) / 3.x (v2+json) or plain JSON."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("events"), list):
        raise PayloadError('expected a JSON object with an "events" list (Distribution envelope)')
    return [_distribution_event(raw, index) for index, raw in enumerate(payload["events"])]


def _distribution_event(raw: Any, index: int) -> RegistryEvent:
    if not isinstance(raw, Mapping):
        return _malformed("distribution", f"distribution:index-{index}", f"events[{index}] is not an object")
    if problem := _within_bounds(raw, depth=2):
        return _malformed("distribution", f"distribution:index-{index}", f"events[{index}]: {problem}")
    event_id = _event_id("distribution", _str(raw.get("id")), raw)
    target = raw.get("target")
    if not isinstance(target, Mapping):
        return _malformed("distribution", event_id, f"events[{index}].target is missing or not an object")
    repository = _str(target.get("repository"))
    if repository is None:
        return _malformed("distribution", event_id, f"events[{index}].target.repository is missing")
    request = raw.get("request") if isinstance(raw.get("request"), Mapping) else {}
    actor = raw.get("actor") if isinstance(raw.get("actor"), Mapping) else {}
    source = raw.get("source") if isinstance(raw.get("source"), Mapping) else {}
    # The Host the pushing client used is the name users know the registry by; the URL builder uses it
    # too. source.addr (hostname:port of the node) is the last resort. All of these are claims that
    # intake checks against the configured registries (webhook.trust), never addresses to connect to.
    registry = (_str(request.get("host")) or _host_of(_str(target.get("url")))
                or _str(source.get("addr")) or "")
    references = target.get("references")
    refs = tuple(r for r in references if isinstance(r, Mapping)) if isinstance(references, list) else ()
    return RegistryEvent(
        source="distribution",
        event_id=event_id,
        action=(_str(raw.get("action")) or "unknown").lower(),
        registry=registry,
        repository=repository,
        tag=_str(target.get("tag")),
        digest=_str(target.get("digest")),
        media_type=_str(target.get("mediaType")),
        actor=_str(actor.get("name")),
        user_agent=_str(request.get("useragent")),
        artifact_type=_str(target.get("artifactType")),
        references=refs,
    )


# --- Harbor ---------------------------------------------------------------------------------------


def parse_harbor(payload: Any, content_type: str = "") -> list[RegistryEvent]:
    """Harbor webhook: "Default" (`type` + `event_data`) or CloudEvents (`specversion`) format."""
    if not isinstance(payload, Mapping):
        raise PayloadError("expected a JSON object (Harbor webhook payload)")
    _check_outside(payload, ("data", "event_data"), "resources")
    if "specversion" in payload or content_type.startswith(CLOUDEVENTS_MEDIA_TYPE):
        kind = _str(payload.get("type"))
        if kind is None or not isinstance(payload.get("data"), Mapping | None):
            raise PayloadError('CloudEvents payload needs a string "type" and an object "data"')
        action = HARBOR_CLOUDEVENT_TYPES.get(kind, kind.lower())
        event_id = _str(payload.get("id"))
        event_id = _event_id("harbor", event_id, payload) if event_id else _harbor_id(payload, "data")
        return _harbor_resources(payload.get("data") or {}, action, event_id, _str(payload.get("operator")))
    kind = _str(payload.get("type"))
    if kind is None or not isinstance(payload.get("event_data"), Mapping | None):
        raise PayloadError('expected a Harbor payload with a string "type" and an object "event_data"')
    action = HARBOR_PUSH_TYPES.get(kind, kind.lower())
    return _harbor_resources(payload.get("event_data") or {}, action, _harbor_id(payload, "event_data"),
                             _str(payload.get("operator")))


def _harbor_id(payload: Mapping[str, Any], container: str) -> str:
    """The body hash as event id, with out-of-bounds resources (ignored as malformed) replaced by a
    marker: hashing them could exhaust the encoder's recursion, and they do not identify the delivery."""
    data = payload.get(container)
    resources = data.get("resources") if isinstance(data, Mapping) else None
    if isinstance(data, Mapping) and isinstance(resources, list):
        safe = [r if _within_bounds(r, depth=3) is None else f"out of bounds #{i}" for i, r in enumerate(resources)]
        payload = {**payload, container: {**data, "resources": safe}}
    return _body_id("harbor", payload)


def _check_outside(payload: Mapping[str, Any], containers: tuple[str, ...], events_key: str) -> None:
    """Bounds of a single-notification payload outside its per-event part (`<container>.<events_key>`),
    which is checked event by event: out of bounds there is a PayloadError (400)."""
    for key, value in payload.items():
        if key in containers and isinstance(value, Mapping):
            for inner_key, inner in value.items():
                if inner_key != events_key and (problem := _within_bounds({inner_key: inner}, depth=1)):
                    raise PayloadError(f"{key}.{inner_key}: {problem}")
        elif problem := _within_bounds({key: value}, depth=0):
            raise PayloadError(f"{key}: {problem}")


def _harbor_registry(url: str, full_name: str) -> str:
    """The registry host in a `resource_url` ("<ext host>/<repo_full_name>:<tag>" or "...@<digest>",
    from Harbor's external URL); "" when the URL does not start with a host before the repository."""
    if "://" in url:
        url = url.split("://", 1)[1]
    head, found, _ = url.partition("/" + full_name)
    return head if found and head and "/" not in head else ""


def _harbor_resources(data: Mapping[str, Any], action: str, event_id: str,
                      operator: str | None) -> list[RegistryEvent]:
    resources = data.get("resources")
    repo = data.get("repository") if isinstance(data.get("repository"), Mapping) else {}
    if not isinstance(resources, list) or not resources:
        # Quota, scan, replication and retention events carry no artifact; keep them so they are counted.
        return [RegistryEvent("harbor", event_id, action, "", _str(repo.get("repo_full_name")) or "",
                              None, None, None, actor=operator)]
    events = []
    for index, resource in enumerate(resources):
        sub_id = event_id if len(resources) == 1 else f"{event_id}#{index}"
        if not isinstance(resource, Mapping):
            events.append(_malformed("harbor", sub_id, f"resources[{index}] is not an object"))
            continue
        if problem := _within_bounds(resource, depth=3):
            events.append(_malformed("harbor", sub_id, f"resources[{index}]: {problem}"))
            continue
        full_name = _str(repo.get("repo_full_name"))
        if full_name is None:
            events.append(_malformed("harbor", sub_id, "repository.repo_full_name is missing"))
            continue
        registry = _harbor_registry(_str(resource.get("resource_url")) or "", full_name)
        if action == "delete" and isinstance(resource.get("tags"), list):
            # DELETE_ARTIFACT may name every tag the deleted artifact had: one event per tag.
            tags = [t for t in resource["tags"] if isinstance(t, str) and t]
            events.extend(RegistryEvent("harbor", f"{sub_id}:{t}", action, registry, full_name, t,
                                        _str(resource.get("digest")), None, actor=operator) for t in tags)
            if tags:
                continue
        events.append(RegistryEvent(
            source="harbor",
            event_id=sub_id,
            action=action,
            registry=registry,
            repository=full_name,
            tag=_str(resource.get("tag")),
            digest=_str(resource.get("digest")),
            media_type=None,  # Harbor does not say; the converter checks the manifest itself
            actor=operator,
        ))
    return events


# --- zot (and any CloudEvents source shaped like it) ---------------------------------------------


def parse_generic(payload: Any, headers: Mapping[str, str], registry: str | None) -> list[RegistryEvent]:
    """zot's `events` extension: CloudEvents in structured mode, or binary mode (`ce-*` headers).

    zot does not name its own host in the event, so the registry comes from the `?registry=` query
    parameter of the hook URL configured in zot.
    """
    if not isinstance(payload, Mapping):
        raise PayloadError("expected a JSON object (CloudEvents payload)")
    if "specversion" in payload:
        if problem := _within_bounds({k: v for k, v in payload.items() if k != "data"}, depth=0):
            raise PayloadError(problem)
        kind, event_id, data = _str(payload.get("type")), _str(payload.get("id")), payload.get("data")
    else:
        kind, event_id, data = headers.get("ce-type"), headers.get("ce-id"), payload
    if not kind or not isinstance(data, Mapping):
        raise PayloadError("expected a CloudEvent with a type and an object data "
                           "(ce-type header or specversion)")
    if not registry:
        raise PayloadError("the generic hook needs its registry: /hooks/generic/<registry> "
                           "(or ?registry=<host[:port]>) in its URL")
    if problem := _within_bounds(data, depth=1):
        return [_malformed("zot", "zot:out-of-bounds", f"data: {problem}")]
    event_id = _event_id("generic", event_id, payload)
    name, reference = _str(data.get("name")), _str(data.get("reference"))
    if name is None:
        return [_malformed("zot", event_id, "data.name is missing")]
    digest = _str(data.get("digest"))
    tag = reference if reference and reference != digest and not reference.startswith("sha256:") else None
    return [RegistryEvent(
        source="zot",
        event_id=event_id,
        action=ZOT_CLOUDEVENT_TYPES.get(kind, kind.lower()),
        registry=registry,
        repository=name,
        tag=tag,
        digest=digest,
        media_type=_str(data.get("mediaType")),
    )]
