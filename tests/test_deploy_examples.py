"""The deployment examples (deploy/) stay in step with the code: their configuration loads through the
service's own config loader, the registry notifies the webhook with the secret the webhook expects, and the
containers run the real commands. (No container runtime here: the files are checked, not started.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from webhook.config import load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


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
