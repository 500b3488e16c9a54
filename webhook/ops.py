"""Operational endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import sqlite3

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from webhook.app import services

blueprint = Blueprint("ops", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz() -> Response | tuple[Response, int]:
    try:
        services().store.ping()
    except sqlite3.Error as exc:
        return jsonify(status="not ready", error=f"job store: {exc}"), 503
    return jsonify(status="ready")


@blueprint.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(services().metrics), mimetype=CONTENT_TYPE_LATEST)
