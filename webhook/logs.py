"""Logging setup: JSON lines when stderr is not a terminal (or when asked), readable text otherwise.

Log calls pass context in `extra` (job_id, reference, digest, ...); the JSON formatter emits it as
fields. Secrets never reach a log call: configs hide them from repr and requests are not dumped.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def wants_json(log_format: str) -> bool:
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def json_formatter(cls: type[JsonFormatter] = JsonFormatter) -> JsonFormatter:
    """The one JSON line format of the service (also used for gunicorn's lines, webhook/gunicorn_logging.py)."""
    return cls("%(asctime)s %(levelname)s %(name)s %(message)s",
               rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})


def configure_logging(log_format: str = "auto", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if wants_json(log_format):
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
