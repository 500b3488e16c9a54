"""Job API: manual trigger, listing, details, retry."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, jsonify, request

from converter.errors import ConversionError
from webhook.app import services
from webhook.config import Rule
from webhook.events import RegistryEvent
from webhook.rules import rule_matches
from webhook.store import Intake, InvalidTransition, JobNotFound, JobState, NewJob

blueprint = Blueprint("api", __name__, url_prefix="/api/v1")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ReferenceError_(ValueError):
    pass


def parse_reference(reference: str) -> tuple[str, str, str, str | None]:
    """"host[:port]/repo/path:tag[@sha256:...]" -> (registry, repository, tag, digest)."""
    name, _, digest = reference.partition("@")
    if digest and not DIGEST.match(digest):
        raise ReferenceError_(f"reference {reference!r}: digest must be sha256:<64 hex>")
    registry, slash, rest = name.partition("/")
    if not slash or not rest or not ("." in registry or ":" in registry or registry == "localhost"):
        raise ReferenceError_(f"reference {reference!r}: must start with the registry host, "
                              "e.g. registry.example.com/team/app:v1")
    repository, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        raise ReferenceError_(f"reference {reference!r}: a tag is required (…/repo:tag)")
    if not TAG.match(tag):
        raise ReferenceError_(f"reference {reference!r}: invalid tag {tag!r}")
    return registry, repository, tag, digest or None


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify(error=message), status


def _pick_rule(body: Mapping[str, Any], event: RegistryEvent) -> Rule | None:
    rules = services().config.rules
    if "rule" in body:
        return next((r for r in rules if r.name == body["rule"]), None)
    return next((r for r in rules if rule_matches(r, event)), None)


@blueprint.post("/conversions")
def trigger() -> Response | tuple[Response, int]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("reference"), str):
        return _error('expected a JSON object {"reference": "host/repo:tag@sha256:..."}', 400)
    try:
        registry, repository, tag, digest = parse_reference(body["reference"])
    except ReferenceError_ as exc:
        return _error(str(exc), 400)
    if digest is None:
        # The job store pins every job to a digest: resolve the tag now (one manifest HEAD), so the job
        # converts exactly what the tag names at the time of the request.
        try:
            digest = _resolve_tag(registry, repository, tag)
        except ConversionError as exc:
            return _error(f"cannot resolve {registry}/{repository}:{tag} to a digest: {exc}", 502)
        if digest is None:
            return _error(f"{registry}/{repository}:{tag} does not exist", 404)
    event = RegistryEvent("api", "", "push", registry, repository, tag, digest, None)
    rule = _pick_rule(body, event)
    if rule is None:
        return _error("no rule matches this reference (or the named rule does not exist)", 422)
    if any(tag.endswith(s) for s in services().config.output_suffixes):
        return _error(f"tag {tag!r} is a conversion output; converting it again would loop", 422)
    target_tag, options = rule.job_target(registry, repository, tag)
    job = NewJob(registry=registry, repository=repository, tag=tag, digest=digest,
                 target_tag=target_tag, rule=rule.name, options=options)
    outcome = services().store.record([Intake(source="api", job=job)])[0]
    job_id = outcome.job_id
    status = 201 if outcome.status == "accepted" else 200
    return jsonify(status=outcome.status, job=services().store.get(job_id).to_dict()), status


def _resolve_tag(registry: str, repository: str, tag: str) -> str | None:
    """Digest the tag points at, through the same registry settings the workers use."""
    from converter.options import RegistryOptions  # the registry client loads only when a tag needs it
    from converter.registry import RetryPolicy
    from converter.transport import registry_client

    settings = services().config.registries.get(registry)
    options = RegistryOptions.coerce(dataclasses.asdict(settings) if settings is not None else None)
    # A request handler must answer quickly: two tries within 10 s, then a clear 502.
    with registry_client(registry, options, retry=RetryPolicy(attempts=2, total=10.0, max_wait=2.0)) as client:
        found = client.head_manifest(repository, tag)
    return found.digest if found is not None else None


@blueprint.get("/conversions")
def list_conversions() -> Response | tuple[Response, int]:
    state_name = request.args.get("state")
    try:
        state = JobState(state_name) if state_name else None
        limit = min(int(request.args.get("limit", 100)), 1000)
        offset = max(int(request.args.get("offset", 0)), 0)
    except ValueError:
        return _error(f"state must be one of {[s.value for s in JobState]}; limit/offset integers", 400)
    jobs = services().store.list_jobs(state, limit=limit, offset=offset)
    return jsonify(jobs=[j.to_dict() for j in jobs], counts=services().store.counts_by_state())


@blueprint.get("/conversions/<job_id>")
def get_conversion(job_id: str) -> Response | tuple[Response, int]:
    store = services().store
    try:
        job = store.get(job_id)
    except JobNotFound:
        return _error(f"no job {job_id}", 404)
    data = job.to_dict()
    data["attempt_log"] = [vars(a) for a in store.attempts(job_id)]
    return jsonify(data)


@blueprint.post("/conversions/<job_id>/retry")
def retry(job_id: str) -> Response | tuple[Response, int]:
    try:
        job = services().store.retry(job_id)
    except JobNotFound:
        return _error(f"no job {job_id}", 404)
    except InvalidTransition as exc:
        return _error(str(exc), 409)
    return jsonify(job.to_dict())
