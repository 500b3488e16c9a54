"""Helpers shared by the webhook tests: payload builders, conversion functions, service launchers.

The conversion functions are real implementations of the `ConvertFn` hook (they copy images with
skopeo, or fail in controlled ways), selected in subprocesses through `convert_callable`; the
worker and store under test are never replaced. The few tests at the bottom check the helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

from converter.errors import PermanentError, TransientError
from webhook.conversion import ConversionRequest, ConversionResult

ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
SECRET = "test-secret-0123456789abcdef"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DISTRIBUTION_V1 = "application/vnd.docker.distribution.events.v1+json"
AUTH = {"Authorization": f"Bearer {SECRET}"}


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- payloads, shaped like the captures in registry-events.md / test-infra.md ---------------------


def distribution_event(repository: str = "demo/app", tag: str | None = "v1", digest: str | None = None,
                       media_type: str = OCI_MANIFEST, action: str = "push", event_id: str | None = None,
                       host: str = "127.0.0.1:5101", useragent: str = "skopeo/1.9.3",
                       actor: str | None = None, references: list[dict[str, Any]] | None = None
                       ) -> dict[str, Any]:
    digest = digest or digest_of(f"{repository}:{tag}:{uuid.uuid4()}")
    target: dict[str, Any] = {
        "mediaType": media_type, "size": 555, "digest": digest, "length": 555, "repository": repository,
        "url": f"http://{host}/v2/{repository}/manifests/{digest}",
    }
    if tag is not None:
        target["tag"] = tag
    if references is not None:
        target["references"] = references
    return {
        "id": event_id or str(uuid.uuid4()),
        "timestamp": "2026-11-28T09:46:02.523800865Z",
        "action": action,
        "target": target,
        "request": {"id": str(uuid.uuid4()), "addr": "127.0.0.1:52104", "host": host, "method": "PUT",
                    "useragent": useragent},
        "actor": {"name": actor} if actor else {},
        "source": {"addr": "vm:5101", "instanceID": "04b951fe-d84e-4886-9cb3-10b016af7e7c"},
    }


def envelope(*events: dict[str, Any]) -> bytes:
    # Distribution pretty-prints with 3-space indents (json.MarshalIndent).
    return json.dumps({"events": list(events)}, indent=3).encode()


def harbor_default(tag: str, digest: str, repo: str = "test-webhook/debian", kind: str = "PUSH_ARTIFACT",
                   operator: str = "admin", host: str = "hub.harbor.com") -> dict[str, Any]:
    sep = "@" if tag == digest else ":"
    namespace, _, name = repo.partition("/")
    return {
        "type": kind, "occur_at": 1586922308, "operator": operator,
        "event_data": {
            "resources": [{"digest": digest, "tag": tag, "resource_url": f"{host}/{repo}{sep}{tag}"}],
            "repository": {"date_created": 1586922308, "name": name, "namespace": namespace,
                           "repo_full_name": repo, "repo_type": "private"},
        },
    }


def harbor_cloudevent(tag: str, digest: str, repo: str = "library/busybox",
                      kind: str = "harbor.artifact.pushed", host: str = "harbor.dev",
                      operator: str = "admin") -> dict[str, Any]:
    sep = "@" if tag == digest else ":"
    namespace, _, name = repo.partition("/")
    return {
        "specversion": "1.0", "requestid": str(uuid.uuid4()), "id": str(uuid.uuid4()),
        "source": "/projects/1/webhook/policies/3", "type": kind, "datacontenttype": "application/json",
        "time": "2023-03-06T06:08:43Z",
        "data": {
            "resources": [{"digest": digest, "tag": tag, "resource_url": f"{host}/{repo}{sep}{tag}"}],
            "repository": {"date_created": 1677053165, "name": name, "namespace": namespace,
                           "repo_full_name": repo, "repo_type": "public"},
        },
        "operator": operator,
    }


# --- conversion functions (ConvertFn implementations) ---------------------------------------------


def _append(path: str, record: dict[str, Any]) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def recording_convert(job: ConversionRequest) -> ConversionResult:
    """Takes $OBD_TEST_CONVERT_SECONDS, then records the finished conversion in $OBD_TEST_RECORD."""
    record = os.environ["OBD_TEST_RECORD"]
    _append(record, {"event": "start", "job": job.job_id, "digest": job.digest, "pid": os.getpid(),
                     "ppid": os.getppid()})
    time.sleep(float(os.environ.get("OBD_TEST_CONVERT_SECONDS", "0")))
    _append(record, {"event": "done", "job": job.job_id, "digest": job.digest, "pid": os.getpid(),
                     "ppid": os.getppid()})
    # a job that also publishes a TurboOCI image reports that image's digest too (a stand-in value)
    turbo = job.options.get("turbo_tag")
    details = {"turbo_digest": "sha256:" + hashlib.sha256(str(turbo).encode()).hexdigest()} if turbo else {}
    return ConversionResult(target_ref=job.target_ref, target_digest=job.digest, bytes_written=1, details=details)


def skopeo_copy_convert(job: ConversionRequest) -> ConversionResult:
    """Publishes the pushed image unchanged as `<tag>_obd` with skopeo (a stand-in for the pipeline
    that has the same registry-visible effect: a push of the target tag by the service)."""
    work = Path(os.environ.get("TMPDIR", "/tmp"))
    digest_file = work / f"obd-{job.job_id}.digest"
    # A private blob-info cache (see tests/harness/oci.py skopeo_env) keeps registry events deterministic.
    env = {**os.environ, "_CONTAINERS_ROOTLESS_UID": "1000", "XDG_DATA_HOME": str(work / "obd-skopeo-cache")}
    proc = subprocess.run(
        ["skopeo", "copy", "--all", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false",
         "--digestfile", str(digest_file), f"docker://{job.source_ref}", f"docker://{job.target_ref}"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    if proc.returncode != 0:
        message = f"skopeo copy failed: {proc.stderr.strip()[-500:]}"
        # The same split the pipeline makes: refused by the registry's policy is permanent.
        if any(word in proc.stderr for word in ("denied", "unauthorized", "DENIED", "UNAUTHORIZED")):
            raise PermanentError(message)
        raise TransientError(message)
    target_digest = digest_file.read_text().strip()
    digest_file.unlink()
    return ConversionResult(target_ref=job.target_ref, target_digest=target_digest)


def recording_skopeo_convert(job: ConversionRequest) -> ConversionResult:
    """`skopeo_copy_convert`, recorded in $OBD_TEST_RECORD like `recording_convert` (who did what)."""
    record = os.environ["OBD_TEST_RECORD"]
    _append(record, {"event": "start", "job": job.job_id, "pid": os.getpid(), "ppid": os.getppid()})
    result = skopeo_copy_convert(job)
    _append(record, {"event": "done", "job": job.job_id, "pid": os.getpid(), "ppid": os.getppid()})
    return result


def flaky_convert(job: ConversionRequest) -> ConversionResult:
    """Fails with TransientError the first $OBD_TEST_FAILURES attempts of each job, then succeeds."""
    failures = int(os.environ.get("OBD_TEST_FAILURES", "2"))
    if job.attempt <= failures:
        raise TransientError(f"registry answered 503 (attempt {job.attempt})")
    return ConversionResult(target_ref=job.target_ref, target_digest=job.digest, bytes_written=10)


def permanent_convert(job: ConversionRequest) -> ConversionResult:
    raise PermanentError(f"unsupported image {job.source_ref}: config media type is not an image config")


# --- running the service ------------------------------------------------------------------------


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve a Flask app over real HTTP on 127.0.0.1 (threaded werkzeug server); yields the base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ServeProcess:
    """A real `obd-webhook serve` subprocess in its own session (so kill -9 can take it all down)."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"
        self.env = {
            **os.environ,
            "OBD_WEBHOOK_DATA_DIR": str(data_dir),
            "OBD_WEBHOOK_LISTEN": f"127.0.0.1:{self.port}",
            "OBD_WEBHOOK_SECRETS": SECRET,
            "OBD_WEBHOOK_POLL_INTERVAL_SECONDS": "0.1",
            "OBD_WEBHOOK_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        }
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115  (kept open for the child's lifetime)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "webhook.cli", "serve", *self.args], env=self.env, stdout=log,
            stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(ROOT),
        )
        log.close()
        wait_until(self._ready, timeout=60, what=f"obd-webhook serve on {self.url} (log {self.log_path})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}: {self.log()[-3000:]}")
        try:
            # Connecting succeeds as soon as gunicorn's master listens; the answer waits for a worker
            # to boot, which takes seconds on a busy machine.
            return requests.get(self.url + "/readyz", timeout=5).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        """SIGKILL the whole process group, like a container runtime killing the container."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        # Grandchildren (gunicorn workers) are in the same group; wait for the port to be free.
        wait_until(self._port_free, timeout=10, what="port released after kill -9")

    def _port_free(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) != 0

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- checks of the helpers themselves -------------------------------------------------------------


def test_flaky_convert_fails_then_succeeds(monkeypatch: Any) -> None:
    monkeypatch.setenv("OBD_TEST_FAILURES", "2")
    job = ConversionRequest("j", "r:5000", "a/b", "v1", digest_of("x"), "v1_obd")
    for attempt in (1, 2):
        try:
            flaky_convert(ConversionRequest(**{**vars(job), "attempt": attempt}))
        except TransientError as exc:
            assert f"attempt {attempt}" in str(exc)
        else:
            raise AssertionError("expected a transient failure")
    result = flaky_convert(ConversionRequest(**{**vars(job), "attempt": 3}))
    assert result.target_ref == "r:5000/a/b:v1_obd"


def test_distribution_event_shape_matches_reference() -> None:
    event = distribution_event(tag=None)
    assert "tag" not in event["target"]
    assert event["target"]["url"].endswith(event["target"]["digest"])
    assert json.loads(envelope(event))["events"][0]["id"] == event["id"]
