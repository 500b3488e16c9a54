"""The deployment examples (deploy/) stay in step with the code: their configuration loads through the
service's own config loader, the registry notifies the webhook with the secret the webhook expects, the
containers run the real commands, every Kubernetes manifest passes the Kubernetes schemas and the compose
file the compose-spec schema and `podman-compose config`, and every stop timeout outlasts the service's
own shutdown. (The image itself is built and run by tests/test_container.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.harness.container import STOP_TIMEOUT_SECONDS
from webhook.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# `serve` sends SIGTERM to its children, waits shutdown_grace_seconds + this, then kills (webhook/cli.py).
SERVE_KILL_MARGIN_SECONDS = 10


def test_docker_compose_runs_registry_redis_front_end_and_two_workers(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"registry", "redis", "webhook", "worker"}
    assert services["webhook"]["command"] == ["serve", "--no-workers"]
    assert services["worker"]["command"] == ["worker"] and services["worker"]["deploy"]["replicas"] == 2
    assert "--appendonly" in services["redis"]["command"]
    env = services["webhook"]["environment"]
    config = load_config(DEPLOY / "webhook-config.yml", env={"OBD_WEBHOOK_SECRETS": env["OBD_WEBHOOK_SECRETS"]})
    assert config.queue == "redis" and config.redis_url == "redis://redis:6379/0"
    assert config.registries["localhost:5000"].endpoint == "http://registry:5000"
    registry = yaml.safe_load((DEPLOY / "registry-config.yml").read_text())
    (endpoint,) = registry["notifications"]["endpoints"]
    assert endpoint["url"] == "http://webhook:8080/hooks/distribution"
    assert endpoint["headers"]["Authorization"] == [f"Bearer {env['OBD_WEBHOOK_SECRETS']}"]


def test_kubernetes_manifests(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "obd-autoconvert.yaml").read_text()))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Deployment", "Secret", "Secret", "Service", "Service"]
    by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    webhook = by_name["obd-webhook"]["spec"]["template"]["spec"]["containers"][0]
    worker_spec = by_name["obd-worker"]["spec"]["template"]["spec"]
    worker = worker_spec["containers"][0]
    assert webhook["args"] == ["serve", "--no-workers"] and worker["args"] == ["worker"]
    assert {v["name"] for v in worker_spec["volumes"]} >= {"work", "registry-auth", "config"}
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config_file = tmp_path / "config.yml"
    config_file.write_text(configmap["data"]["config.yml"])
    config = load_config(config_file, env={"OBD_WEBHOOK_SECRETS": "x" * 32})
    assert config.queue == "redis" and config.redis_url == "redis://obd-redis:6379/0"
    assert config.rules[0].options["work_dir"] == "/work"
    assert set(config.registries) == {"registry.example.com"}  # without it only loopback registries are allowed
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert services == {"obd-webhook", "obd-redis"}


# --- schemas ---------------------------------------------------------------------------------------


def kubernetes_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_passes_the_kubernetes_schemas(manifest: Path) -> None:
    version = kubernetes_validate.latest_version()
    documents = kubernetes_documents(manifest)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)  # raises ValidationError


def test_kubernetes_validation_rejects_a_misspelled_field() -> None:
    """The validator is not vacuous: the worker Deployment with one misspelled key is refused."""
    (worker,) = [d for d in kubernetes_documents(DEPLOY / "kubernetes" / "obd-autoconvert.yaml")
                 if d["metadata"]["name"] == "obd-worker"]
    spec = worker["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, kubernetes_validate.latest_version(), strict=True)


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def test_compose_file_passes_the_compose_spec_schema(tmp_path: Path) -> None:
    result = check_compose_schema(DEPLOY / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and the check is not vacuous: a misspelled key is refused.
    broken = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    broken["services"]["worker"]["stop_grace_periods"] = broken["services"]["worker"].pop("stop_grace_period")
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    refused = check_compose_schema(tmp_path / "docker-compose.yml")
    assert refused.returncode == 1 and "stop_grace_periods" in refused.stdout + refused.stderr


def test_podman_compose_resolves_the_example() -> None:
    result = subprocess.run([sys.executable, "-m", "podman_compose", "-f", str(DEPLOY / "docker-compose.yml"),
                             "config"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    assert set(services) == {"registry", "redis", "webhook", "worker"}
    for name in ("webhook", "worker"):
        assert Path(services[name]["build"]["context"]).resolve() == ROOT  # builds this repository's Dockerfile
        assert services[name]["image"] == "obd-autoconvert:latest"
    mounted = [v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if isinstance(v, str)]
    for source in (m for m in mounted if m.startswith((".", "/"))):
        assert (DEPLOY / source).resolve().is_file(), f"compose mounts {source}, which does not exist"


# --- grace periods ---------------------------------------------------------------------------------


def compose_seconds(duration: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"unsupported compose duration {duration!r}"
    hours, minutes, seconds = (int(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_every_stop_timeout_outlasts_the_service_shutdown() -> None:
    """SIGTERM gives running conversions shutdown_grace_seconds and `serve` kills what is left after the
    margin: the runtime's SIGKILL must come later, wherever the image runs (docker/podman default 10 s)."""
    service_shutdown = Config().shutdown_grace_seconds + SERVE_KILL_MARGIN_SECONDS
    assert service_shutdown < STOP_TIMEOUT_SECONDS

    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    ours = {name: s for name, s in services.items() if s.get("image", "").startswith("obd-autoconvert")}
    assert set(ours) == {"webhook", "worker"}
    for name, service in ours.items():
        assert compose_seconds(service["stop_grace_period"]) == STOP_TIMEOUT_SECONDS, name

    deployments = [d for m in MANIFESTS for d in kubernetes_documents(m) if d["kind"] == "Deployment"]
    ours_k8s = [d for d in deployments if d["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "obd-autoconvert")]
    assert {d["metadata"]["name"] for d in ours_k8s} == {"obd-webhook", "obd-worker"}
    for deployment in ours_k8s:
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == STOP_TIMEOUT_SECONDS

    # A Dockerfile cannot set a stop timeout: its usage line and the docs name the flag.
    assert f"--stop-timeout {STOP_TIMEOUT_SECONDS}" in (ROOT / "Dockerfile").read_text()
    assert f"--stop-timeout {STOP_TIMEOUT_SECONDS}" in (ROOT / "docs" / "webhook.md").read_text()
