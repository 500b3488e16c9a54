"""Read-only status page: server-rendered HTML, no JavaScript."""

from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from webhook.app import services
from webhook.backfill import RUN_KIND, progress_view
from webhook.store import JobState

blueprint = Blueprint("ui", __name__, template_folder="templates")


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@blueprint.get("/")
def index() -> Response:
    return redirect(url_for("ui.status"))


@blueprint.get("/status")
def status() -> str:
    state_name = request.args.get("state") or None
    state = JobState(state_name) if state_name in {s.value for s in JobState} else None
    store = services().store
    backfills = [progress_view(store, r) for r in store.list_runs(RUN_KIND, limit=5)]
    return render_template("status.html", jobs=store.list_jobs(state, limit=200),
                           counts=store.counts_by_state(), state=state, when=_when,
                           states=[s.value for s in JobState], backfills=backfills)
