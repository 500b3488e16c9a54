"""deploy/docker-compose.yml, started as its header says (with podman-compose): the registry notifies the
front end by its compose name, the front end queues in Redis, one of the two workers converts, and
`<tag>_obd` appears in the registry; then the service containers stop cleanly.

The file is used unchanged. An override file only swaps images: the project's image built by the
container test's harness (instead of `build: ..`, which needs the podman flags of README "Run it in a
container"), and stand-ins for Docker Hub's `registry:2` and `redis:7` built from Debian's packages
(tests/harness/standins/). The compose file publishes fixed host ports: 5000 (registry) and 8080
(webhook) must be free.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.harness import container as C
from tests.harness.service_e2e import RegistryAddress, push_and_judge_conversion
from tests.test_deploy_examples import compose_seconds
from tests.test_webhook_support import wait_until

COMPOSE_FILE = C.ROOT / "deploy" / "docker-compose.yml"
SERVICE_URL = "http://127.0.0.1:8080"
# Images are pushed as localhost:5000, the name webhook-config.yml maps to the registry service.
REGISTRY = RegistryAddress("localhost:5000")


def compose_secret() -> str:
    return yaml.safe_load(COMPOSE_FILE.read_text())["x-obd"]["environment"]["OBD_WEBHOOK_SECRETS"]


class ComposeProject:
    def __init__(self, override: Path) -> None:
        self.name = f"obdtest{uuid.uuid4().hex[:8]}"
        self.base = [sys.executable, "-m", "podman_compose", "-p", self.name, "-f", str(COMPOSE_FILE),
                     "-f", str(override), "--podman-run-args", " ".join(C.RUN_FLAGS)]

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, cwd=C.ROOT)
        output = result.stdout[-3000:] + result.stderr[-3000:]
        assert result.returncode == 0, f"podman-compose {' '.join(args)}:\n{output}"
        return result

    def containers(self) -> dict[str, dict]:
        listed = C.podman("ps", "--all", "--filter", f"label=io.podman.compose.project={self.name}",
                          "--format", "json").stdout
        return {c["Names"][0]: c for c in json.loads(listed or "[]")}

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{C.podman('logs', name, check=False).stderr[-2000:]}"
                         for name in self.containers())

    def remove(self) -> None:
        volumes = set()
        for name in self.containers():
            inspected = json.loads(C.podman("inspect", name, check=False).stdout or "[]")
            volumes |= {m["Name"] for c in inspected for m in c.get("Mounts", []) if m.get("Type") == "volume"}
        subprocess.run([*self.base, "down", "--volumes", "--timeout", "1"], capture_output=True, timeout=300,
                       cwd=C.ROOT)
        for volume in volumes:  # the anonymous /data volumes of the workers too
            C.podman("volume", "rm", "--force", volume, check=False)


def resolves(container: str, host: str) -> bool:
    probe = f"import socket; socket.getaddrinfo({host!r}, 6379)"
    return C.podman("exec", container, "python", "-c", probe, check=False).returncode == 0


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def project(tmp_path: Path) -> Iterator[ComposeProject]:
    for port in (5000, 8080):
        assert port_free(port), f"port {port} is in use: the compose example publishes it"
    image, _log = C.build_image()
    standins = C.standin_images()
    override = tmp_path / "override.yml"
    override.write_text(yaml.safe_dump({"services": {
        "registry": {"image": standins["registry"]}, "redis": {"image": standins["redis"]},
        "webhook": {"image": image}, "worker": {"image": image}}}))
    made = ComposeProject(override)
    yield made
    made.remove()


def test_compose_example_converts_a_push_end_to_end(project: ComposeProject, tmp_path: Path) -> None:
    project.compose("up", "--detach", "--no-build")
    try:
        wait_until(lambda: requests.get(SERVICE_URL + "/healthz", timeout=5).ok if not port_free(8080) else False,
                   timeout=90, interval=0.5, what="the compose front end on :8080")
        running = {name: c["State"] for name, c in project.containers().items()}
        assert sorted(running) == sorted(f"{project.name}_{s}" for s in
                                         ("registry_1", "redis_1", "webhook_1", "worker_1", "worker_2")), running
        assert set(running.values()) == {"running"}, running

        push_and_judge_conversion(SERVICE_URL, compose_secret(), REGISTRY, tmp_path, repo="compose/app")
    except BaseException:
        print(project.logs())
        raise

    # The image's HEALTHCHECK passes on the front end; the workers (no HTTP) have it switched off.
    webhook = f"{project.name}_webhook_1"
    assert C.podman("healthcheck", "run", webhook, check=False).returncode == 0
    for worker in (f"{project.name}_worker_1", f"{project.name}_worker_2"):
        health = json.loads(C.podman("inspect", "--format", "{{json .Config.Healthcheck}}", worker).stdout)
        assert health is None or health.get("Test") == ["NONE"], health

    # The front end and the workers stop on SIGTERM within their stop_grace_period, exit status 0.
    # One at a time, each with the file's stop_grace_period (podman-compose does not make it the containers'
    # stop timeout). A stopping worker tells Redis it is gone, looking `redis` up again; after a container
    # of the network stops, Debian 12's aardvark-dns answers lookups only after a moment (seen here: workers
    # stopped together or back to back failed "Temporary failure in name resolution"; after the last one,
    # lookups failed for 30-50 s), so each worker is stopped once its lookups work. The front end looks
    # nothing up to stop.
    grace = int(compose_seconds(yaml.safe_load(COMPOSE_FILE.read_text())["x-obd"]["stop_grace_period"]))
    for name in (f"{project.name}_worker_1", f"{project.name}_worker_2", f"{project.name}_webhook_1"):
        if "_worker_" in name:
            wait_until(lambda name=name: resolves(name, "redis"), timeout=60, interval=0.5, what=f"DNS in {name}")
        C.podman("stop", "--time", str(grace), name, timeout=grace + 30)
    stopped = {name: c for name, c in project.containers().items() if "_webhook_" in name or "_worker_" in name}
    assert len(stopped) == 3
    assert {(c["State"], c["ExitCode"]) for c in stopped.values()} == {("exited", 0)}, project.logs()
