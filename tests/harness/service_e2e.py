"""The operator's end-to-end check, shared by the production-install and container tests: a real registry
notifies a running `obd-webhook serve`, an image is pushed with skopeo, and the service publishes a
`<tag>_obd` that is pulled back and judged (overlaybd layers, stacked ext4 e2fsck-clean with the image's
tree), exactly as the pipeline's own tests judge it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.harness.oci import build_layout, push_image
from tests.harness.registry import Endpoint, Registry
from tests.registry_helpers import client_for
from tests.test_pipeline_registry import VSIZE_GIB, app_image, layer_blobs, pull_and_judge
from tests.test_webhook_support import wait_until


@dataclass(frozen=True)
class RegistryAddress:
    """A registry the tests did not start (the compose example's), as the harness functions use one."""

    host: str
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def registry_notifying(registry_factory: Any, service_url: str, secret: str) -> Registry:
    """A registry configured with the notifications block the service prints (`obd-webhook snippets`)."""
    return registry_factory(notifications=[Endpoint(
        url=f"{service_url}/hooks/distribution", headers={"Authorization": [f"Bearer {secret}"]},
        ignored_mediatypes=["application/octet-stream"], ignore_actions=["pull", "mount", "delete"])])


def service_config(registry: Registry, cache_dir: str, work_dir: str) -> dict[str, Any]:
    """The service's YAML configuration: convert everything, reach the plain-HTTP test registry."""
    return {"rules": [{"name": "all", "options": {"vsize": VSIZE_GIB, "cache_dir": cache_dir, "work_dir": work_dir}}],
            "registries": {registry.host: {"endpoint": f"http://{registry.host}", "insecure": True}}}


def jobs(service_url: str, secret: str) -> list[dict[str, Any]]:
    response = requests.get(f"{service_url}/api/v1/conversions?limit=100", timeout=10,
                            headers={"Authorization": f"Bearer {secret}"})
    response.raise_for_status()
    return response.json()["jobs"]


def push_and_judge_conversion(service_url: str, secret: str, registry: Registry | RegistryAddress, tmp_path: Path,
                              repo: str = "ops/app", tag: str = "v1", timeout: float = 180) -> dict[str, Any]:
    """Push a two-layer image; wait for the service's job; judge `<tag>_obd`. Returns the job."""
    built = build_layout(tmp_path / "pushed", app_image())
    push_image(built, registry, f"{repo}:{tag}")

    def finished() -> list[dict[str, Any]] | None:
        listed = jobs(service_url, secret)
        done = [j for j in listed if j["state"] in ("succeeded", "dead")]
        return done if done else None

    (job,) = wait_until(finished, timeout=timeout, interval=0.5, what=f"conversion of {repo}:{tag}")
    assert job["state"] == "succeeded", job.get("last_error")
    assert job["target_ref"] == f"{registry.host}/{repo}:{tag}_obd"
    tags = requests.get(f"{registry.url}/v2/{repo}/tags/list", timeout=10).json()["tags"]
    assert sorted(tags) == [tag, f"{tag}_obd"]
    client = client_for(registry)
    converted = job["result"]["target_digest"]
    assert client.head_manifest(repo, f"{tag}_obd").digest == converted
    pull_and_judge(client, repo, converted, layer_blobs(built, built.manifests[0]), tmp_path, oci_types=False)
    # The service's own push of <tag>_obd reached it too, and was ignored: no second job.
    wait_until(lambda: own_pushes_ignored(service_url, secret) >= 1, timeout=60,
               what="the notification of the service's own push")
    assert len(jobs(service_url, secret)) == 1
    return job


OWN_PUSH_REASONS = ("own_user_agent", "own_actor", "output_tag")


def own_pushes_ignored(service_url: str, secret: str) -> float:
    """Events the service ignored as its own pushes (/metrics)."""
    response = requests.get(f"{service_url}/metrics", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    response.raise_for_status()
    found = re.findall(r'^obd_webhook_events_ignored_total\{reason="(\w+)"\} (\S+)$', response.text, re.M)
    return sum(float(value) for reason, value in found if reason in OWN_PUSH_REASONS)
