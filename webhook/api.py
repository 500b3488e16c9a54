"""Job API: manual trigger, listing, details, retry."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, jsonify, request

from converter.errors import ConversionError
from webhook.app import services
from webhook.config import RegistrySettings, Rule
from webhook.events import PayloadError, RegistryEvent, parse_json
from webhook.hooks import read_body
from webhook.limits import clip
from webhook.names import digest_problem, host_problem, repository_problem, tag_problem
from webhook.rules import rule_matches
from webhook.store import Intake, InvalidTransition, JobNotFound, JobState, NewJob
from webhook.trust import configured_registry

blueprint = Blueprint("api", __name__, url_prefix="/api/v1")
MAX_LIMIT = 1000
MAX_OFFSET = 2**62  # SQLite integers are 64-bit; anything near is out of range for any real store
INTEGER = re.compile(r"-?[0-9]{1,19}")


class ReferenceError_(ValueError):
    """The reference cannot name an image (answered 400)."""


class RegistryNotAllowed(ValueError):
    """The reference names a registry the service may not contact (answered 403)."""


def parse_reference(reference: str, registries: Mapping[str, RegistrySettings]
                    ) -> tuple[str, str, str, str | None]:
    """"host[:port]/repo/path:tag[@sha256:...]" -> (registry, repository, tag, digest).

    The first path component is always the registry (the API never guesses Docker Hub), and it must be
    a configured registry (webhook.trust); the registry key is returned, never the text as written."""
    shown = clip(reference, 300)
    name, _, digest = reference.partition("@")
    if digest and digest_problem(digest):
        raise ReferenceError_(f"reference {shown!r}: digest must be sha256:<64 hex>")
    host, slash, rest = name.partition("/")
    if not slash or not rest or host_problem(host):
        raise ReferenceError_(f"reference {shown!r}: must start with the registry host, "
                              "e.g. registry.example.com/team/app:v1")
    repository, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        raise ReferenceError_(f"reference {shown!r}: a tag is required (…/repo:tag)")
    if problem := tag_problem(tag) or repository_problem(repository):
        raise ReferenceError_(f"reference {shown!r}: {problem}")
    registry = configured_registry(registries, host)
    if registry is None:
        raise RegistryNotAllowed(f"registry {clip(host, 100)!r} is not configured for this service "
                                 "(host_not_allowed; see `registries:` in the configuration)")
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
    try:
        body = parse_json(read_body())
    except PayloadError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("reference"), str):
        return _error('expected a JSON object {"reference": "host/repo:tag@sha256:..."}', 400)
    try:
        registry, repository, tag, digest = parse_reference(body["reference"], services().config.registries)
    except ReferenceError_ as exc:
        return _error(str(exc), 400)
    except RegistryNotAllowed as exc:
        return _error(str(exc), 403)
    if digest is None:
        # The job store pins every job to a digest: resolve the tag now (one manifest HEAD), so the job
        # converts exactly what the tag names at the time of the request.
        try:
            digest = _resolve_tag(registry, repository, tag)
        except ConversionError as exc:
            return _error(f"cannot resolve {registry}/{repository}:{tag} to a digest: {clip(str(exc), 1000)}",
                          502)
        if digest is None:
            return _error(f"{registry}/{repository}:{tag} does not exist", 404)
        if digest_problem(digest):
            return _error(f"{registry} answered an invalid digest for {repository}:{tag}", 502)
    event = RegistryEvent("api", "", "push", registry, repository, tag, digest, None)
    rule = _pick_rule(body, event)
    if rule is None:
        return _error("no rule matches this reference (or the named rule does not exist)", 422)
    if any(tag.endswith(s) for s in services().config.output_suffixes):
        return _error(f"tag {tag!r} is a conversion output; converting it again would loop", 422)
    target_tag, options = rule.job_target(tag)
    job = NewJob(registry=registry, repository=repository, tag=tag, digest=digest,
                 target_tag=target_tag, rule=rule.name, options=options, origin="manual")
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
    options = RegistryOptions.coerce(settings.client_options() if settings is not None else None)
    # A request handler must answer quickly: two tries within 10 s, then a clear 502.
    with registry_client(registry, options, retry=RetryPolicy(attempts=2, total=10.0, max_wait=2.0)) as client:
        found = client.head_manifest(repository, tag)
    return found.digest if found is not None else None


@blueprint.get("/conversions")
def list_conversions() -> Response | tuple[Response, int]:
    state_name = request.args.get("state")
    try:
        state = JobState(state_name) if state_name else None
    except ValueError:
        return _error(f"state must be one of {[s.value for s in JobState]}", 400)
    limit_text, offset_text = request.args.get("limit", "100"), request.args.get("offset", "0")
    if not INTEGER.fullmatch(limit_text) or not INTEGER.fullmatch(offset_text):
        return _error("limit and offset must be integers", 400)
    offset = int(offset_text)
    if not 0 <= offset <= MAX_OFFSET:
        return _error(f"offset must be between 0 and {MAX_OFFSET}", 400)
    limit = min(max(int(limit_text), 1), MAX_LIMIT)  # a page is 1..1000 jobs, whatever was asked
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
