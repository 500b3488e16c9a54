"""The container image, built from `Dockerfile` with Debian's podman and run as an operator runs it (the
commands of the README's "Run it in a container"; tests/harness/container.py says why each flag).

The base image is debootstrapped once per machine and cached (tests/harness/cache.py); the image build
uses podman's layer cache, keyed by the content of what it copies. Measured on 2 cores: from scratch
(debootstrap and image build included) 3.8 minutes with the machine loaded by other work (load average 6),
about 2.5 on a quiet one (debootstrap 90 s, build 45 s); with the caches about 20 seconds, 45 after a
change of the sources.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.harness import container as C
from tests.harness.service_e2e import push_and_judge_conversion, registry_notifying, service_config
from tests.test_webhook_support import SECRET, free_port, wait_until

UID = 10001


@pytest.fixture(scope="module")
def image() -> str:
    built, _log = C.build_image()
    return built


class Containers:
    """Containers and volumes of one test, removed at the end whatever happened."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.volumes: list[str] = []

    def volume(self) -> str:
        name = f"obd-test-data-{uuid.uuid4().hex[:10]}"
        C.podman("volume", "create", name)
        self.volumes.append(name)
        return name

    def run(self, image: str, port: int, *, volume: str, config: Path | None = None,
            env: dict[str, str] | None = None) -> Container:
        name = f"obd-test-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        argv = C.run_command(image, name, volume=volume, config=str(config) if config else None,
                             env={"OBD_WEBHOOK_LISTEN": f"127.0.0.1:{port}", **(env or {})}, network_host=True)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        started = Container(name, f"http://127.0.0.1:{port}")
        wait_until(started.healthy, timeout=90, interval=0.3, what=f"/healthz of container {name}")
        return started

    def remove(self) -> None:
        for name in self.names:
            C.podman("rm", "--force", "--time", "0", name, check=False)
        for volume in self.volumes:
            C.podman("volume", "rm", "--force", volume, check=False)


class Container:
    def __init__(self, name: str, url: str) -> None:
        self.name, self.url = name, url

    def state(self) -> dict:
        return json.loads(C.podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def healthy(self) -> bool:
        state = self.state()
        if state["Status"] != "running":
            raise AssertionError(f"container {self.name} is {state['Status']} (exit {state['ExitCode']}):\n"
                                 f"{self.logs()[-3000:]}")
        try:
            return requests.get(self.url + "/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def logs(self) -> str:
        result = C.podman("logs", self.name)
        return result.stdout + result.stderr

    def exec(self, *argv: str) -> str:
        return C.podman("exec", self.name, *argv).stdout

    def stop(self) -> dict:
        """`podman stop` as an operator types it: SIGTERM, then the container's own stop timeout."""
        C.podman("stop", self.name, timeout=C.STOP_TIMEOUT_SECONDS + 30)
        return self.state()


@pytest.fixture
def containers() -> Iterator[Containers]:
    made = Containers()
    yield made
    made.remove()


def test_image_runs_as_non_root_with_a_healthcheck_and_sigterm(image: str) -> None:
    config = json.loads(C.podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == "obd"
    # --format docker: the OCI image format has no field for a HEALTHCHECK and drops it.
    assert C.podman("image", "inspect", "--format", "{{.ManifestType}}", image).stdout.strip() == \
        "application/vnd.docker.distribution.manifest.v2+json"
    health = json.loads(C.podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout)
    assert health["Test"][0] == "CMD" and "/healthz" in " ".join(health["Test"])
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["obd-webhook"] and config["Cmd"] == ["serve"]
    assert "/data" in config["Volumes"] and "OBD_WEBHOOK_DATA_DIR=/data" in config["Env"]


def test_container_converts_a_push_to_the_host_registry_and_stops_gracefully(image: str, containers: Containers,
                                                                             registry_factory, tmp_path: Path) -> None:
    port = free_port()
    registry = registry_notifying(registry_factory, f"http://127.0.0.1:{port}", SECRET)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(service_config(registry, cache_dir="/data/cache", work_dir="/tmp")))
    service = containers.run(image, port, volume=containers.volume(), config=config,
                             env={"OBD_WEBHOOK_SECRETS": SECRET, "OBD_WEBHOOK_POLL_INTERVAL_SECONDS": "0.2"})

    # Every process of the container runs as the image's user, not root.
    pids = C.podman("top", service.name, "hpid").stdout.split()[1:]  # host pids
    assert pids
    for pid in pids:
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split("\n")[0].split()
        assert set(uids) == {str(UID)}, (pid, uids)
    assert service.exec("id", "-u").strip() == str(UID)
    # The image's HEALTHCHECK command passes in the running container.
    health = C.podman("healthcheck", "run", service.name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr

    push_and_judge_conversion(service.url, SECRET, registry, tmp_path)
    # The secret came from the environment: nothing generated, nothing printed.
    assert service.exec("ls", "-A", "/data").split().count("webhook-secret") == 0

    state = service.stop()
    assert state["Status"] == "exited" and state["ExitCode"] == 0, service.logs()[-3000:]
    lines = [line for line in service.logs().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # JSON only: the service's lines and gunicorn's
    assert {"gunicorn.error", "webhook.cli"} <= {r["logger"] for r in records}
    assert records[-1]["message"] == "obd-webhook stopped"
    assert SECRET not in "\n".join(lines)


def test_container_generates_its_secret_into_the_data_volume_once(image: str, containers: Containers) -> None:
    volume = containers.volume()
    port = free_port()
    first = containers.run(image, port, volume=volume)
    secret = first.exec("cat", "/data/webhook-secret").strip()
    assert len(secret) >= 32
    assert re.search(rf"^\s+{re.escape(secret)}$", first.logs(), re.MULTILINE)  # printed once for the operator
    api = first.url + "/api/v1/conversions"
    assert requests.get(api, headers={"Authorization": f"Bearer {secret}"}, timeout=5).status_code == 200
    assert requests.get(api, headers={"Authorization": f"Bearer {SECRET}"}, timeout=5).status_code == 401
    assert first.stop()["ExitCode"] == 0

    # A new container on the same volume keeps the secret and does not print it again.
    second = containers.run(image, free_port(), volume=volume)
    assert second.exec("cat", "/data/webhook-secret").strip() == secret
    assert secret not in second.logs()
    assert requests.get(second.url + "/api/v1/conversions", headers={"Authorization": f"Bearer {secret}"},
                        timeout=5).status_code == 200
    assert second.stop()["ExitCode"] == 0


# --- the README shows exactly these commands -------------------------------------------------------

README = C.ROOT / "README.md"


def readme_container_commands() -> list[list[str]]:
    text = README.read_text()
    section = text.split("## Run it in a container", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```sh\n")[1:]]
    (block,) = [b for b in blocks if "podman run" in b]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


def test_readme_runs_the_commands_of_this_test() -> None:
    commands = readme_container_commands()

    def find(*prefix: str) -> list[str]:
        matching = [c for c in commands if c[:len(prefix)] == list(prefix)]
        assert len(matching) == 1, f"README: expected one `{' '.join(prefix)}` command, found {len(matching)}"
        return matching[0]

    assert find("debootstrap") == C.debootstrap_command("rootfs")
    assert find("tar") == C.tar_command("rootfs", "debian-python.tar")
    assert find("podman", "import") == C.import_command("localhost/debian-python:bookworm", "debian-python.tar")
    assert find("podman", "build") == C.build_command("obd-autoconvert", "localhost/debian-python:bookworm")
    assert find("podman", "run") == C.run_command("obd-autoconvert", "obd", volume="obd-data",
                                                  config="/etc/obd-autoconvert.yml",
                                                  env={"OBD_WEBHOOK_LISTEN": "127.0.0.1:8080"}, network_host=True)
    assert find("podman", "stop") == ["podman", "stop", "obd"]
    assert find("podman", "healthcheck", "run") == ["podman", "healthcheck", "run", "obd"]
