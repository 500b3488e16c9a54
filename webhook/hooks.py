"""Notification endpoints: parse, decide, store durably, then answer.

Anything we choose to ignore is answered 2xx (Distribution retries any other status forever and
blocks its queue behind it); only unreadable bodies get 400, bad secrets 401, a hook URL naming a
registry that is not configured 404, huge bodies 413.

Each hook exists unbound (`/hooks/distribution`: the event's host must be a configured registry)
and bound to a registry (`/hooks/distribution/<registry>`: events are about that registry, and one
claiming another host is ignored); see webhook.trust.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence

from flask import Blueprint, Response, jsonify, request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import BadRequest, NotFound, RequestEntityTooLarge

from webhook.app import services
from webhook.config import Config
from webhook.events import (
    PayloadError,
    RegistryEvent,
    parse_distribution,
    parse_generic,
    parse_harbor,
    parse_json,
)
from webhook.limits import clip
from webhook.rules import decide
from webhook.store import Intake, NewJob
from webhook.trust import configured_registry

log = logging.getLogger("webhook.hooks")
blueprint = Blueprint("hooks", __name__, url_prefix="/hooks")


def intake_for(event: RegistryEvent, config: Config, bound: str | None = None) -> Intake:
    if event.action == "delete":
        from webhook.lifecycle import delete_intake  # delete mirroring (rule option delete_mirror)

        return delete_intake(event, config, bound)
    decision = decide(event, config, bound)
    if decision.rule is None or decision.registry is None or event.tag is None or event.digest is None:
        if decision.detail:
            log.info("event ignored", extra={"event_id": clip(event.event_id, 200), "source": event.source,
                                              "reason": decision.reason, "detail": decision.detail})
        return Intake(source=event.source, event_id=event.event_id, reason=decision.reason)
    target_tag, options = decision.rule.job_target(event.tag)
    return Intake(source=event.source, event_id=event.event_id, job=NewJob(
        registry=decision.registry, repository=event.repository, tag=event.tag, digest=event.digest,
        target_tag=target_tag, rule=decision.rule.name,
        options=options, media_type=event.media_type,
    ))


def accept(events: Sequence[RegistryEvent], bound: str | None = None) -> Response:
    svc = services()
    items = [intake_for(event, svc.config, bound) for event in events]
    outcomes = svc.store.record(items)
    ignored: Counter[str] = Counter()
    accepted = []
    for event, item, outcome in zip(events, items, outcomes, strict=True):
        if outcome.status == "accepted" and item.job is not None:
            accepted.append(outcome.job_id)
            # DEBUG, not INFO: at a thousand events/s a JSON line per event costs more CPU than storing
            # the job; the worker logs every job it starts and finishes at INFO.
            log.debug("event accepted", extra={
                "job_id": outcome.job_id, "event_id": event.event_id, "source": event.source,
                "reference": f"{item.job.registry}/{item.job.repository}:{item.job.tag}", "digest": item.job.digest,
                "superseded": list(outcome.superseded)})
        else:
            ignored[outcome.reason or outcome.status] += 1
            log.debug("event ignored", extra={"event_id": event.event_id, "reason": outcome.reason})
    # Built by hand: this is the hot path of intake, and jsonify's provider lookup costs more than the rest.
    summary = {"received": len(events), "accepted": accepted, "ignored": dict(ignored)}
    return Response(json.dumps(summary, separators=(",", ":")), mimetype="application/json")


def read_body() -> bytes:
    """The request body, or 413. A chunked body (no Content-Length) is cut at the limit by Werkzeug
    rather than refused, so reaching the limit counts as too large. A body the HTTP server cannot
    decode (bad chunk sizes, missing terminators, a truncated body) is a 400, not a server error."""
    try:
        body = request.get_data(cache=False)
    except (OSError, ValueError, ParseException) as exc:
        raise BadRequest(f"the request body could not be read: {clip(str(exc) or type(exc).__name__, 200)}"
                         ) from None
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(body) >= limit:
        raise RequestEntityTooLarge()
    return body


def bound_registry(name: str | None) -> str | None:
    """The configured registry a hook URL names (404 if none), or None for an unbound hook."""
    if name is None:
        return None
    registry = configured_registry(services().config.registries, name)
    if registry is None:
        raise NotFound(f"no registry {clip(name, 100)!r} is configured for this service "
                       "(see `registries:` in the configuration)")
    return registry


def _handle(parse: Callable[[object], list[RegistryEvent]], bound: str | None
            ) -> Response | tuple[Response, int]:
    try:
        events = parse(parse_json(read_body()))
    except PayloadError as exc:
        message = clip(str(exc), 500)
        log.warning("bad notification payload", extra={"path": clip(request.path, 200), "error": message})
        return jsonify(error=message), 400
    return accept(events, bound)


@blueprint.post("/distribution")
@blueprint.post("/distribution/<registry>")
def distribution(registry: str | None = None) -> Response | tuple[Response, int]:
    # Content-Type is v1+json (2.8), v2+json (3.x) or plain JSON; the shape decides, not the header.
    return _handle(parse_distribution, bound_registry(registry))


@blueprint.post("/harbor")
@blueprint.post("/harbor/<registry>")
def harbor(registry: str | None = None) -> Response | tuple[Response, int]:
    content_type = request.headers.get("Content-Type", "")
    return _handle(lambda payload: parse_harbor(payload, content_type), bound_registry(registry))


@blueprint.post("/generic")
@blueprint.post("/generic/<registry>")
def generic(registry: str | None = None) -> Response | tuple[Response, int]:
    headers = {k.lower(): v for k, v in request.headers.items()}
    bound = bound_registry(registry)
    # zot does not name its own host in its events: the hook URL does (bound), or `?registry=`, a
    # claim checked against the configured registries like any event's host.
    claimed = bound or request.args.get("registry")
    return _handle(lambda payload: parse_generic(payload, headers, claimed), bound)
