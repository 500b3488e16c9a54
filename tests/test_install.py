"""The production install works as shipped: every runtime import comes from `[project.dependencies]`, and a
wheel installed into a fresh virtualenv without extras runs `obd-webhook serve` (gunicorn's gevent worker
included) and `obd-convert` end to end against a real registry.

The development install (`pip install -e '.[test]'`) cannot show a missing dependency: the test extras
bring packages (pytest brings `packaging`, which gunicorn's gevent worker imports) that an operator's
install does not have. These tests fail when a runtime dependency is removed from pyproject.toml.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import gunicorn.workers
import pytest
import requests
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness.install import ROOT, build_wheel, production_venv, wheel_requirements
from tests.harness.oci import build_layout, push_image
from tests.harness.service_e2e import push_and_judge_conversion, registry_notifying, service_config
from tests.registry_helpers import client_for
from tests.test_pipeline_registry import VSIZE_GIB, app_image, layer_blobs, pull_and_judge
from tests.test_webhook_redis import RedisServer
from tests.test_webhook_support import SECRET, free_port, wait_until

OWN_PACKAGES = {"converter", "webhook"}
# The gunicorn worker classes the service can be configured with (config.HTTP_WORKER_CLASSES).
GUNICORN_WORKER_MODULES = ("ggevent", "gthread")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return production_venv(wheel, tmp_path_factory.mktemp("production") / "venv")


def operator_env(venv: Path, home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: nothing of the test virtualenv or the checkout (no PYTHONPATH)."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(home),
            "TMPDIR": str(home), "LANG": "C.UTF-8", **extra}


# --- the declaration -------------------------------------------------------------------------------


def imported_top_level_modules(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module -> files importing it, over every import statement (also those inside functions)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def distributions_of(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Third-party modules -> the distributions providing them (as installed in the test environment)."""
    providers = importlib.metadata.packages_distributions()
    result = {}
    for module, files in modules.items():
        if module in sys.stdlib_module_names or module in OWN_PACKAGES or module == "__future__":
            continue
        assert module in providers, f"{module} (imported by {sorted(files)}) is provided by no installed package"
        result[module] = {canonicalize_name(d) for d in providers[module]}
    return result


def runtime_requirements(wheel: Path) -> list[Requirement]:
    requirements = [Requirement(line) for line in wheel_requirements(wheel)]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution the requirements install (extras followed), read from installed metadata."""
    closure: set[str] = set()
    pending = [(r.name, set(r.extras)) for r in requirements]
    while pending:
        name, extras = pending.pop()
        key = canonicalize_name(name)
        if key in closure and not extras:
            continue
        closure.add(key)
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                pending.append((req.name, set(req.extras)))
    return closure


def test_every_runtime_import_is_a_declared_dependency(wheel: Path) -> None:
    sources = sorted(p for package in OWN_PACKAGES for p in (ROOT / package).rglob("*.py"))
    imported = distributions_of(imported_top_level_modules(sources))
    declared = {canonicalize_name(r.name) for r in runtime_requirements(wheel)}
    undeclared = {module: dists for module, dists in imported.items() if not dists & declared}
    assert not undeclared, f"imported by converter/ or webhook/ but not in [project.dependencies]: {undeclared}"
    assert imported, "no third-party import found: the scan is broken"


def test_gunicorn_worker_classes_import_only_installed_dependencies(wheel: Path) -> None:
    """What gunicorn imports to load our worker classes (the gevent worker imports `packaging`) must come
    with the declared dependencies, not with the test extras."""
    closure = dependency_closure(runtime_requirements(wheel))
    workers = Path(gunicorn.workers.__file__).parent
    imported = distributions_of(imported_top_level_modules([workers / f"{m}.py" for m in GUNICORN_WORKER_MODULES]))
    missing = {module: dists for module, dists in imported.items() if not dists & closure}
    assert not missing, f"gunicorn's worker classes need packages that [project.dependencies] does not bring: {missing}"
    assert "packaging" in imported and "gevent" in imported


IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import converter, webhook
names = [p.__name__ for p in (converter, webhook)]
for package in (converter, webhook):
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
from gunicorn.util import load_class
for uri in ("gevent", "gthread"):  # resolved as gunicorn resolves `worker_class`
    load_class(uri, default="gunicorn.workers.sync.SyncWorker", section="gunicorn.workers")
print(json.dumps({"modules": names, "files": [sys.modules[n].__file__ for n in names]}))
"""


def test_every_module_imports_in_the_production_venv(venv: Path, tmp_path: Path) -> None:
    env = operator_env(venv, tmp_path / "home", OBD_WEBHOOK_DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run([str(venv / "bin" / "python"), "-c", IMPORT_EVERYTHING], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = json.loads(result.stdout)
    expected = {"converter." + str(p.relative_to(ROOT / "converter").with_suffix("")).replace("/", ".")
                for p in (ROOT / "converter").rglob("*.py") if p.name != "__init__.py"}
    assert expected <= set(imported["modules"]) and "webhook.gunicorn_logging" in imported["modules"]
    # The installed wheel was imported, not the checkout.
    assert all(f.startswith(str(venv)) for f in imported["files"]), imported["files"][:3]


# --- running it ------------------------------------------------------------------------------------


class VenvServe:
    """`<venv>/bin/obd-webhook serve`, started like an operator starts it."""

    def __init__(self, venv: Path, tmp_path: Path, port: int, env: dict[str, str]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout, self.stderr = tmp_path / "serve.out", tmp_path / "serve.err"
        self.env = operator_env(venv, tmp_path / "home", OBD_WEBHOOK_LISTEN=f"127.0.0.1:{self.port}", **env)
        self.argv = [str(venv / "bin" / "obd-webhook"), "serve"]
        self.cwd = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> VenvServe:
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self._ready, timeout=60, interval=0.2, what=f"serve from the production venv ({self.stderr})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.stderr.read_text()[-3000:]}")
        try:
            return requests.get(self.url + "/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise
        return self.proc.returncode


def json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line in {path.name}: {line!r}") from None
    return records


def test_serve_from_the_production_venv_converts_a_registry_push(venv: Path, tmp_path: Path, registry_factory) -> None:
    # The registry is configured with the service's address, the service with the registry's.
    port = free_port()
    registry = registry_notifying(registry_factory, f"http://127.0.0.1:{port}", SECRET)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(service_config(registry, str(tmp_path / "cache"), str(tmp_path))))
    service = VenvServe(venv, tmp_path, port, {
        "OBD_WEBHOOK_CONFIG": str(config), "OBD_WEBHOOK_DATA_DIR": str(tmp_path / "data"),
        "OBD_WEBHOOK_SECRETS": SECRET, "OBD_WEBHOOK_LOG_FORMAT": "json", "OBD_WEBHOOK_POLL_INTERVAL_SECONDS": "0.2",
        # gunicorn's access log, off by default, switched on the way gunicorn documents: JSON too
        "GUNICORN_CMD_ARGS": "--access-logfile=-"})
    try:
        service.start()
        push_and_judge_conversion(service.url, SECRET, registry, tmp_path)
    finally:
        code = service.stop()
    assert code == 0, service.stderr.read_text()[-3000:]
    # One format per stream: the service's, gunicorn's error log (stderr) and access log (stdout).
    errors, access = json_lines(service.stderr), json_lines(service.stdout)
    loggers = {r["logger"] for r in errors}
    assert {"webhook.cli", "gunicorn.error"} <= loggers, loggers
    assert any(r["logger"] == "gunicorn.error" and r["message"].startswith("Booting worker") for r in errors)
    hooks = [r for r in access if r.get("path") == "/hooks/distribution"]
    assert hooks and all(r["logger"] == "gunicorn.access" and r["method"] == "POST" for r in hooks)
    assert {r["status"] for r in hooks} == {200}
    assert SECRET not in service.stdout.read_text() + service.stderr.read_text()


def test_obd_convert_from_the_production_venv(venv: Path, tmp_path: Path, registry) -> None:
    built = build_layout(tmp_path / "img", app_image())
    source_digest = push_image(built, registry, "cli/app:v1")
    env = operator_env(venv, tmp_path / "home")
    result = subprocess.run(
        [str(venv / "bin" / "obd-convert"), "-r", f"{registry.host}/cli/app", "-i", "v1", "--plain",
         "--vsize", str(VSIZE_GIB), "--cache-dir", str(tmp_path / "cache"), "-d", str(tmp_path), "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["ok"] and out["pushed"] and out["source_digest"] == source_digest
    client = client_for(registry)
    assert client.head_manifest("cli/app", "v1_obd").digest == out["target_digest"]
    pull_and_judge(client, "cli/app", out["target_digest"], layer_blobs(built, built.manifests[0]), tmp_path,
                   oci_types=False)


# The moment a worker's shutdown could hang, made certain: the worker's pubsub thread has seen its
# unsubscribe and sleeps until it is subscribed again (RQ passes 60 s) when the worker stops it.
PUBSUB_STOP_PROBE = """
import sys, threading, time
from redis import Redis
from rq import Queue, Worker
connection = Redis.from_url(sys.argv[1])
worker = Worker([Queue("probe", connection=connection)], connection=connection)
worker.subscribe()
worker.pubsub.unsubscribe()
deadline = time.monotonic() + 10
while worker.pubsub.subscribed and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # the thread is back in get_message, waiting for a subscription
stopping = threading.Thread(target=worker.unsubscribe, daemon=True)
stopping.start()
stopping.join(10)
print("stuck" if stopping.is_alive() else "stopped")
"""


def test_rq_worker_shutdown_does_not_wait_for_the_pubsub_threads_sleep(venv: Path, tmp_path: Path) -> None:
    """With redis 8.2 and RQ 3.0, a worker's warm shutdown waited up to 60 s for its pubsub thread (in about
    half the stops), past docker's and podman's stop timeouts: the declared versions must not."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        result = subprocess.run([str(venv / "bin" / "python"), "-c", PUBSUB_STOP_PROBE, server.url], cwd=tmp_path,
                                env=operator_env(venv, tmp_path / "home"), capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "stopped", "RQ worker shutdown blocked by the redis pubsub thread"


def test_redis_workers_from_the_production_venv_exit_on_sigterm(venv: Path, tmp_path: Path) -> None:
    """`obd-webhook worker` (queue: redis) as a container runs it: SIGTERM, warm shutdown, exit status 0."""
    server = RedisServer(tmp_path / "redis").start()
    workers = []
    try:
        env = operator_env(venv, tmp_path / "home", OBD_WEBHOOK_QUEUE="redis", OBD_WEBHOOK_REDIS_URL=server.url,
                           OBD_WEBHOOK_DATA_DIR=str(tmp_path / "data"), OBD_WEBHOOK_SECRETS=SECRET,
                           OBD_WEBHOOK_LOG_FORMAT="json")
        for i in range(2):
            log = tmp_path / f"worker-{i}.log"
            with open(log, "wb") as out:
                workers.append((subprocess.Popen([str(venv / "bin" / "obd-webhook"), "worker"], env=env, cwd=tmp_path,
                                                 stdout=out, stderr=out, start_new_session=True), log))
        for _proc, log in workers:
            wait_until(lambda log=log: "Listening on" in log.read_text(), timeout=60, what=f"RQ worker ({log})")
        for proc, _log in workers:
            proc.send_signal(signal.SIGTERM)
        for proc, log in workers:
            try:
                assert proc.wait(30) == 0, log.read_text()[-2000:]
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker still running 30 s after SIGTERM:\n{log.read_text()[-2000:]}") from None
            assert all(json.loads(line) for line in log.read_text().splitlines() if line.strip())
    finally:
        for proc, _log in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        server.stop()
