"""gunicorn's own log lines follow the service's `log_format`: JSON objects (error log and access log) with
`json`, gunicorn's plain lines with `text`. The production-install and container tests check the same on
running services; these check the pieces (the settings' choice, the formatters' fields)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from gunicorn.config import Config as GunicornConfig

from webhook.gunicorn_logging import JsonLogger

ROOT = Path(__file__).resolve().parents[1]


def settings_logger_class(tmp_path: Path, log_format: str) -> str:
    env = {**os.environ, "OBD_WEBHOOK_LOG_FORMAT": log_format, "OBD_WEBHOOK_DATA_DIR": str(tmp_path)}
    env.pop("OBD_WEBHOOK_CONFIG", None)
    result = subprocess.run([sys.executable, "-c", "import webhook.gunicorn_settings as s; print(s.logger_class)"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_settings_choose_gunicorns_logger_by_log_format(tmp_path: Path) -> None:
    assert settings_logger_class(tmp_path, "json") == "webhook.gunicorn_logging.JsonLogger"
    assert settings_logger_class(tmp_path, "text") == "gunicorn.glogging.Logger"
    # auto: JSON when stderr is not a terminal (a pipe here), as for the service's own lines
    assert settings_logger_class(tmp_path, "auto") == "webhook.gunicorn_logging.JsonLogger"


def test_json_logger_writes_error_and_access_lines_as_json(tmp_path: Path) -> None:
    cfg = GunicornConfig()
    cfg.set("errorlog", str(tmp_path / "error.log"))
    cfg.set("accesslog", str(tmp_path / "access.log"))
    logger = JsonLogger(cfg)
    logger.info("Booting worker with pid: %s", 42)
    logger.error("Worker (pid:%s) was sent SIGKILL!", 43)
    environ = {"REQUEST_METHOD": "POST", "RAW_URI": "/hooks/distribution?x=1", "PATH_INFO": "/hooks/distribution",
               "QUERY_STRING": "x=1", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.1.2.3",
               "HTTP_USER_AGENT": "Docker-Distribution-API-Server/2.8.2", "HTTP_AUTHORIZATION": "Bearer s3cr3t-token"}
    request = SimpleNamespace(headers=[("AUTHORIZATION", "Bearer s3cr3t-token"), ("USER-AGENT", "x")])
    response = SimpleNamespace(status="200 OK", sent=27, headers=[("Content-Type", "application/json")])
    logger.access(response, request, environ, datetime.timedelta(milliseconds=12))
    for handler in logger.error_log.handlers + logger.access_log.handlers:
        handler.flush()

    errors = [json.loads(line) for line in (tmp_path / "error.log").read_text().splitlines()]
    assert [(r["logger"], r["level"], r["message"]) for r in errors] == [
        ("gunicorn.error", "INFO", "Booting worker with pid: 42"),
        ("gunicorn.error", "ERROR", "Worker (pid:43) was sent SIGKILL!")]
    assert all("time" in r for r in errors)

    access_text = (tmp_path / "access.log").read_text()
    (access,) = [json.loads(line) for line in access_text.splitlines()]
    assert access["logger"] == "gunicorn.access"
    assert access["message"] == "POST /hooks/distribution?x=1 HTTP/1.1"
    assert {k: access[k] for k in ("remote_addr", "method", "path", "query", "status", "response_bytes",
                                   "duration_ms", "user_agent")} == {
        "remote_addr": "10.1.2.3", "method": "POST", "path": "/hooks/distribution", "query": "x=1", "status": 200,
        "response_bytes": 27, "duration_ms": 12, "user_agent": "Docker-Distribution-API-Server/2.8.2"}
    assert "s3cr3t" not in access_text  # request headers and the environment are never logged
