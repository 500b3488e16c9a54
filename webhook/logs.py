"""Logging setup: JSON lines when stderr is not a terminal (or when asked), readable text otherwise.

Log calls pass context in `extra` (job_id, reference, digest, ...); the JSON formatter emits it as
fields. Secrets never reach a log call: configs hide them from repr and requests are not dumped.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from webhook.limits import clip

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# LogRecord's own attributes; every other attribute came from `extra`.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class ClipFilter(logging.Filter):
    """Clips the message and every string passed in `extra` (errors quote image content and event
    values, which anyone who can push chooses), so no log line grows beyond a few KB per field."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = clip(record.msg)
        if record.args:
            record.args = tuple(clip(a) if isinstance(a, str) else a for a in record.args) \
                if isinstance(record.args, tuple) else record.args
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, key, clip(value))
        return True


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
    handler.addFilter(ClipFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
