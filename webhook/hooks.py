"""Notification endpoints: parse, decide, store durably, then answer.

Anything we choose to ignore is answered 2xx (Distribution retries any other status forever and
blocks its queue behind it); only unreadable bodies get 400, bad secrets 401, huge bodies 413.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

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
from webhook.rules import decide
from webhook.store import Intake, NewJob

log = logging.getLogger("webhook.hooks")
blueprint = Blueprint("hooks", __name__, url_prefix="/hooks")


def intake_for(event: RegistryEvent, config: Config) -> Intake:
    decision = decide(event, config)
    if decision.rule is None or event.tag is None or event.digest is None:
        return Intake(source=event.source, event_id=event.event_id, reason=decision.reason)
    target_tag, options = decision.rule.job_target(event.registry, event.repository, event.tag)
    return Intake(source=event.source, event_id=event.event_id, job=NewJob(
        registry=event.registry, repository=event.repository, tag=event.tag, digest=event.digest,
        target_tag=target_tag, rule=decision.rule.name,
        options=options, media_type=event.media_type,
    ))


def accept(events: Sequence[RegistryEvent]) -> Response:
    svc = services()
    items = [intake_for(event, svc.config) for event in events]
    outcomes = svc.store.record(items)
    ignored: Counter[str] = Counter()
    accepted = []
    for event, outcome in zip(events, outcomes, strict=True):
        if outcome.status == "accepted":
            accepted.append(outcome.job_id)
            # DEBUG, not INFO: at a thousand events/s a JSON line per event costs more CPU than storing
            # the job; the worker logs every job it starts and finishes at INFO.
            log.debug("event accepted", extra={
                "job_id": outcome.job_id, "event_id": event.event_id, "source": event.source,
                "reference": f"{event.registry}/{event.repository}:{event.tag}", "digest": event.digest,
                "superseded": list(outcome.superseded)})
        else:
            ignored[outcome.reason or outcome.status] += 1
            log.debug("event ignored", extra={"event_id": event.event_id, "reason": outcome.reason})
    # Built by hand: this is the hot path of intake, and jsonify's provider lookup costs more than the rest.
    summary = {"received": len(events), "accepted": accepted, "ignored": dict(ignored)}
    return Response(json.dumps(summary, separators=(",", ":")), mimetype="application/json")


def read_body() -> bytes:
    """The request body, or 413. A chunked body (no Content-Length) is cut at the limit by Werkzeug
    rather than refused, so reaching the limit counts as too large."""
    body = request.get_data(cache=False)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(body) >= limit:
        raise RequestEntityTooLarge()
    return body


def _handle(parse: Callable[[object], list[RegistryEvent]]) -> Response | tuple[Response, int]:
    try:
        events = parse(parse_json(read_body()))
    except PayloadError as exc:
        log.warning("bad notification payload", extra={"path": request.path, "error": str(exc)})
        return jsonify(error=str(exc)), 400
    return accept(events)


@blueprint.post("/distribution")
def distribution() -> Response | tuple[Response, int]:
    # Content-Type is v1+json (2.8), v2+json (3.x) or plain JSON; the shape decides, not the header.
    return _handle(parse_distribution)


@blueprint.post("/harbor")
def harbor() -> Response | tuple[Response, int]:
    content_type = request.headers.get("Content-Type", "")
    return _handle(lambda payload: parse_harbor(payload, content_type))


@blueprint.post("/generic")
def generic() -> Response | tuple[Response, int]:
    headers = {k.lower(): v for k, v in request.headers.items()}
    registry = request.args.get("registry")
    return _handle(lambda payload: parse_generic(payload, headers, registry))
