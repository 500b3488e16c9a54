"""Lifecycle API: backfill runs and the stale-output report, with its one-call fixes.

  POST /api/v1/backfill              start a backfill (202 + its id; "wait": true runs it before answering)
  GET  /api/v1/backfill              recent runs with progress
  GET  /api/v1/backfill/<id>         one run's progress
  GET  /api/v1/stale                 outputs whose source tag is gone or moved
  POST /api/v1/stale/reconvert       queue conversions of the moved sources
  POST /api/v1/stale/delete          queue deletions of the outputs whose source is gone

All of them need the webhook secret, like every other API call (see webhook.app).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, jsonify, request

from converter.errors import ConversionError
from webhook.app import services
from webhook.backfill import RUN_KIND, BackfillRequest, progress_view, run_backfill
from webhook.config import Config
from webhook.lifecycle import StaleOutput, find_stale, fix_intakes, stale_counters
from webhook.registry_access import ListingError, matches

blueprint = Blueprint("lifecycle", __name__, url_prefix="/api/v1")


class BadRequest(ValueError):
    pass


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify(error=message), status


def default_registry(config: Config, given: object) -> str:
    """The registry named in the request, else the only one configured; it must be one a rule covers (a
    walk never reaches out to hosts the service would not convert from)."""
    if given is not None and not (isinstance(given, str) and given):
        raise BadRequest("registry: expected a host[:port] string")
    if isinstance(given, str):
        registry = given
    elif len(config.registries) == 1:
        registry = next(iter(config.registries))
    else:
        raise BadRequest('name the registry: {"registry": "host[:port]"} (more or fewer than one is configured)')
    if not any(matches(registry, rule.registries) for rule in config.rules):
        raise BadRequest(f"registry {registry!r}: no rule covers it (rules[].registries)")
    return registry


def _globs(body: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key, ["*"])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"{key}: expected a non-empty list of names or globs")
    return tuple(value)


def backfill_request(config: Config, body: Mapping[str, Any]) -> BackfillRequest:
    limit = body.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadRequest("limit: expected a positive integer")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run: expected true or false")
    return BackfillRequest(registry=default_registry(config, body.get("registry")),
                           repositories=_globs(body, "repositories"), tags=_globs(body, "tags"),
                           dry_run=dry_run, limit=limit)


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True) if request.content_length else {}
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    return body


@blueprint.post("/backfill")
def start_backfill() -> Response | tuple[Response, int]:
    svc = services()
    try:
        body = _body()
        req = backfill_request(svc.config, body)
    except BadRequest as exc:
        return _error(str(exc), 400)
    if body.get("wait"):
        progress = run_backfill(svc.config, svc.store, req)
        return jsonify(progress_view(svc.store, progress.record()))
    run_id = str(uuid.uuid4())
    # The walk is network-bound; it runs beside the request handlers of this process and records its
    # progress in the store, where every process can read it.
    threading.Thread(target=run_backfill, args=(svc.config, svc.store, req), kwargs={"run_id": run_id},
                     name=f"backfill-{run_id[:8]}", daemon=True).start()
    return jsonify(id=run_id, state="running", progress=f"/api/v1/backfill/{run_id}"), 202


@blueprint.get("/backfill")
def list_backfills() -> Response:
    store = services().store
    return jsonify(runs=[progress_view(store, r) for r in store.list_runs(RUN_KIND, limit=50)])


@blueprint.get("/backfill/<run_id>")
def get_backfill(run_id: str) -> Response | tuple[Response, int]:
    store = services().store
    record = store.get_run(run_id)
    if record is None:
        return _error(f"no backfill {run_id}", 404)
    return jsonify(progress_view(store, record))


def _stale_scan(body: Mapping[str, Any]) -> list[StaleOutput]:
    svc = services()
    registry = default_registry(svc.config, body.get("registry"))
    found = find_stale(svc.config, registry, _globs(body, "repositories"))
    svc.store.add_counters(stale_counters(found))
    wanted = body.get("tags")
    if wanted is None:
        return found
    if not isinstance(wanted, list) or not all(isinstance(t, str) for t in wanted):
        raise BadRequest('tags: expected a list of output tags or "repository:tag" names')
    return [s for s in found if s.tag in wanted or f"{s.repository}:{s.tag}" in wanted]


def _stale(body: Mapping[str, Any]) -> tuple[list[StaleOutput] | None, tuple[Response, int] | None]:
    try:
        return _stale_scan(body), None
    except BadRequest as exc:
        return None, _error(str(exc), 400)
    except ListingError as exc:
        return None, _error(str(exc), 502)
    except ConversionError as exc:  # the registry failed or refused us
        return None, _error(f"registry error: {exc}", 502)


@blueprint.get("/stale")
def stale() -> Response | tuple[Response, int]:
    body = {"registry": request.args.get("registry"),
            "repositories": request.args.getlist("repository") or ["*"]}
    found, failure = _stale(body)
    if failure is not None:
        return failure
    assert found is not None
    return jsonify(stale=[s.to_dict() for s in found], count=len(found))


def _fix(fix: str) -> Response | tuple[Response, int]:
    try:
        body = _body()
    except BadRequest as exc:
        return _error(str(exc), 400)
    found, failure = _stale(body)
    if failure is not None:
        return failure
    assert found is not None
    svc = services()
    intakes, skipped = fix_intakes(svc.config, found, fix)
    outcomes = svc.store.record(intakes) if intakes else []
    jobs = [svc.store.get(o.job_id).to_dict() for o in outcomes if o.job_id is not None]
    return jsonify(queued=jobs, skipped=skipped)


@blueprint.post("/stale/reconvert")
def stale_reconvert() -> Response | tuple[Response, int]:
    return _fix("reconvert")


@blueprint.post("/stale/delete")
def stale_delete() -> Response | tuple[Response, int]:
    return _fix("delete")
