"""Flask application factory. Nothing happens at import time; everything hangs off `create_app`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import Flask, Response, current_app, jsonify, request
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import HTTPException

from webhook.auth import authorized
from webhook.backend import JobBackend
from webhook.config import Config, ConfigError, ensure_secret, load_config
from webhook.metrics import make_registry
from webhook.store import JobStore

log = logging.getLogger("webhook.app")
PUBLIC_ENDPOINTS = frozenset({"ops.healthz", "ops.readyz", "static"})


@dataclass(frozen=True)
class Services:
    """What request handlers need, reachable as `services()` inside a request."""

    config: Config
    store: JobBackend
    metrics: CollectorRegistry


def services() -> Services:
    return current_app.extensions["obd_webhook"]


def create_app(config: Config, store: JobBackend | None = None) -> Flask:
    """Build the WSGI app for `config`. `store` defaults to the SQLite store under `config.data_dir`."""
    if not config.secrets:
        raise ConfigError("no webhook secret configured: every hook and API call needs one "
                          "(set `secrets`, OBD_WEBHOOK_SECRETS, or call ensure_secret() first)")
    from webhook import api, hooks, lifecycle_api, ops, ui  # blueprints import `services` from here

    if store is None and config.queue == "redis":
        from webhook.redis_queue import backend_for  # only redis deployments need redis and rq

        store = backend_for(config)
    store = store or JobStore(config.db_path, synchronous=config.sqlite_synchronous)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["obd_webhook"] = Services(config, store, make_registry(store))
    app.register_blueprint(ops.blueprint)
    app.register_blueprint(hooks.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(lifecycle_api.blueprint)
    app.register_blueprint(ui.blueprint)

    @app.before_request
    def require_secret() -> Response | tuple[Response, int] | None:
        if request.endpoint in PUBLIC_ENDPOINTS:
            return None
        if request.endpoint == "ops.metrics" and not config.metrics_require_auth:
            return None
        if authorized(request.headers.get("Authorization"), config.secrets):
            return None
        log.warning("unauthorized request", extra={"path": request.path, "remote": request.remote_addr,
                                                   "has_authorization": "Authorization" in request.headers})
        response = jsonify(error="unauthorized: send the webhook secret in the Authorization header")
        # Browsers get a login prompt for the status page (the secret is the password).
        response.headers["WWW-Authenticate"] = 'Basic realm="obd-webhook"'
        return response, 401

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=exc.description or exc.name), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error", extra={"path": request.path})
        return jsonify(error="internal error; see the service log"), 500

    return app


def create_app_from_env() -> Flask:
    """Entry point for gunicorn (`webhook.app:create_app_from_env()`): config from file + environment."""
    from webhook.logs import configure_logging

    config, _ = ensure_secret(load_config())
    configure_logging(config.log_format, config.log_level)
    return create_app(config)
