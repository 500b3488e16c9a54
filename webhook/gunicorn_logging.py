"""gunicorn's own log lines in the service's log format: with JSON logs (`log_format: json`, or `auto`
off a terminal), gunicorn's error log (start, worker boots and exits, timeouts) and its access log (off
unless `--access-logfile` is given, e.g. in GUNICORN_CMD_ARGS) are JSON lines too, so every stream has
one format. Selected by `logger_class` in webhook/gunicorn_settings.py.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from gunicorn.glogging import Logger
from pythonjsonlogger.json import JsonFormatter

from webhook.logs import ClipFilter, json_formatter

# gunicorn's access log atoms -> JSON fields. Request headers and the environment (also atoms) are left
# out on purpose: they may carry credentials.
ACCESS_FIELDS = {"h": "remote_addr", "m": "method", "U": "path", "q": "query", "H": "protocol", "s": "status",
                 "B": "response_bytes", "M": "duration_ms", "f": "referer", "a": "user_agent"}


class AccessJsonFormatter(JsonFormatter):
    """One JSON object per request: the request line as the message, the atoms as fields."""

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        atoms = record.args
        if isinstance(atoms, Mapping):
            log_data["message"] = atoms.get("r", log_data.get("message"))
            for atom, field in ACCESS_FIELDS.items():
                value = atoms.get(atom)
                if value not in (None, "", "-"):
                    log_data[field] = int(value) if field == "status" and str(value).isdigit() else value


class JsonLogger(Logger):
    """gunicorn's Logger, with its handlers' formatters replaced by the service's JSON format."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(json_formatter())
            handler.addFilter(ClipFilter())  # bounded lines, as for the service's own loggers
        for handler in self.access_log.handlers:
            handler.setFormatter(json_formatter(AccessJsonFormatter))
