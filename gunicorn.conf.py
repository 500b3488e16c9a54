"""gunicorn configuration for the webhook front end: `gunicorn -c gunicorn.conf.py`.

Settings come from the service configuration (YAML file named by OBD_WEBHOOK_CONFIG and OBD_WEBHOOK_*
environment variables); see webhook/gunicorn_settings.py. `obd-webhook serve` uses the same settings.
"""

from webhook.gunicorn_settings import (  # noqa: F401  (gunicorn reads these module globals)
    accesslog,
    bind,
    control_socket_disable,
    errorlog,
    graceful_timeout,
    keepalive,
    logger_class,
    loglevel,
    proc_name,
    threads,
    timeout,
    worker_class,
    worker_connections,
    workers,
    wsgi_app,
)
