"""gunicorn settings for the webhook front end, derived from the service configuration.

Used by `obd-webhook serve` (`gunicorn -c python:webhook.gunicorn_settings`) and re-exported by the
repository's top-level `gunicorn.conf.py`, so `gunicorn -c gunicorn.conf.py` works from a checkout.
"""

from __future__ import annotations

from webhook.config import load_config
from webhook.logs import wants_json

_config = load_config()

wsgi_app = "webhook.app:create_app_from_env()"
bind = [_config.listen]
# A request is JSON parsing plus one short SQLite transaction: a few processes, each serving many
# connections, either as greenlets (gevent, the default) or as threads (gthread).
worker_class = _config.http_worker_class
workers = _config.http_workers
threads = _config.http_threads
worker_connections = _config.http_connections
# Distribution waits 1 s for an answer and Harbor 3 s; a request that takes longer is already failed.
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = None
errorlog = "-"
# With JSON logs, gunicorn's own lines are JSON too (webhook/gunicorn_logging.py).
logger_class = "webhook.gunicorn_logging.JsonLogger" if wants_json(_config.log_format) else "gunicorn.glogging.Logger"
loglevel = _config.log_level.lower()
proc_name = "obd-webhook"
# gunicorn >= 25 opens a control socket under $HOME by default; several instances would share it.
control_socket_disable = True
