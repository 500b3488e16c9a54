"""Helpers for the lifecycle tests: push tiny images and artifacts with our own registry client, build the
service configuration for a harness registry, and run jobs with the real worker and conversion engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from converter.registry import OCI_INDEX, OCI_MANIFEST, RegistryClient
from tests.harness import layers as L
from tests.harness import oci
from tests.registry_helpers import client_for  # noqa: F401 - re-exported for the lifecycle tests
from webhook.config import Config, load_config
from webhook.conversion import default_convert
from webhook.retry import RetryPolicy
from webhook.store import JobStore
from webhook.worker import Worker, WorkerSettings

HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_LAYER = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
VSIZE_GIB = 1  # small filesystems keep conversions fast
SECRET = "test-secret-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {SECRET}"}


def tiny_image(text: str, arch: str = "amd64") -> oci.Image:
    return oci.Image([[L.file("hello.txt", text.encode())]], architecture=arch, config={"Cmd": ["/hello.txt"]})


def push_built(client: RegistryClient, built: oci.BuiltImage, repository: str, tag: str) -> str:
    """Upload every blob of a built layout, its child manifests by digest, then the top one by tag."""
    manifests = {oci.sha256(m) for m in built.manifests}
    for digest, data in built.blobs.items():
        if digest != built.digest and digest not in manifests:
            client.upload_blob(repository, data, digest=digest)
    for raw in built.manifests:
        if oci.sha256(raw) != built.digest:
            client.put_manifest(repository, oci.sha256(raw), raw, json.loads(raw)["mediaType"])
    return client.put_manifest(repository, tag, built.raw, built.media_type)


def push_image_tag(client: RegistryClient, tmp: Path, repository: str, tag: str, text: str,
                   *, multi: bool = False) -> str:
    images: Any = [tiny_image(text, "amd64"), tiny_image(text + " arm", "arm64")] if multi else tiny_image(text)
    built = oci.build_layout(tmp / f"layout-{repository.replace('/', '-')}-{tag}", images)
    return push_built(client, built, repository, tag)


def retag(client: RegistryClient, repository: str, source_tag: str, new_tag: str) -> str:
    manifest = client.get_manifest(repository, source_tag)
    return client.put_manifest(repository, new_tag, manifest.raw, manifest.media_type)


def push_helm_chart(client: RegistryClient, repository: str, tag: str, text: str) -> str:
    """A non-image OCI artifact (helm chart shape: its own config and layer media types)."""
    config = json.dumps({"name": text, "version": "1.0.0"}).encode()
    layer = L.compress(L.make_tar([L.file("chart/Chart.yaml", b"name: " + text.encode())]), "gzip")
    client.upload_blob(repository, config)
    client.upload_blob(repository, layer)
    manifest = oci.canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": HELM_CONFIG, "digest": oci.sha256(config), "size": len(config)},
        "layers": [{"mediaType": HELM_LAYER, "digest": oci.sha256(layer), "size": len(layer)}]})
    return client.put_manifest(repository, tag, manifest, OCI_MANIFEST)


def write_config(registry, tmp: Path, rules: list[dict[str, Any]], **settings: Any) -> Path:
    """A service configuration file reaching the harness registry over plain HTTP, with real conversions
    (tiny filesystems), no rate limit, and small listing pages."""
    options = {"vsize": VSIZE_GIB, "cache_dir": str(tmp / "layer-cache"), "work_dir": str(tmp)}
    data = {"data_dir": str(tmp / "data"), "secrets": [SECRET],
            "rules": [{**rule, "options": {**options, **rule.get("options", {})}} for rule in rules],
            "registries": {registry.host: {"endpoint": f"http://{registry.host}", "insecure": True}},
            "backfill": {"requests_per_second": 0, "page_size": 2, "batch_size": 4}, **settings}
    path = tmp / "webhook.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def service_config(registry, tmp: Path, rules: list[dict[str, Any]], **settings: Any) -> Config:
    return load_config(write_config(registry, tmp, rules, **settings), env={})


def worker_for(store: JobStore, config: Config) -> Worker:
    return Worker(store, default_convert, RetryPolicy(config.retry), WorkerSettings(lease_seconds=120),
                  config.registries, name="test-worker")


def drain(worker: Worker, limit: int = 200) -> list[str]:
    """Run jobs until none is due; returns the ids in the order they ran."""
    ran = []
    for _ in range(limit):
        job = worker.run_once()
        if job is None:
            return ran
        ran.append(job.id)
    raise AssertionError(f"more than {limit} jobs")


def annotations(client: RegistryClient, repository: str, tag: str) -> dict[str, str]:
    return client.get_manifest(repository, tag).json().get("annotations") or {}


def is_index(client: RegistryClient, repository: str, tag: str) -> bool:
    return client.get_manifest(repository, tag).media_type == OCI_INDEX

