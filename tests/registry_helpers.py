"""Helpers shared by the tests/test_registry_*.py files."""

from __future__ import annotations

import json
import subprocess

from converter.registry import OCI_MANIFEST, RegistryClient, RetryPolicy
from tests.harness import layers as L
from tests.harness import oci

# Fast retries so fault tests take fractions of a second.
FAST_RETRY = RetryPolicy(attempts=5, total=30.0, initial=0.05, max_wait=2.0)


def client_for(reg, *, host: str | None = None, **options) -> RegistryClient:
    """A client for a harness registry, trusting its CA and using its credentials."""
    options.setdefault("retry", FAST_RETRY)
    if reg.username:
        options.setdefault("credentials", f"{reg.username}:{reg.password}")
    if reg.tls:
        options.setdefault("ca_file", reg.ca_file)
    return RegistryClient(host or reg.host, plain_http=not reg.tls, docker_config="/nonexistent", **options)


def small_image(arch: str = "amd64", text: bytes = b"hello\n") -> oci.Image:
    return oci.Image([[L.dir("app"), L.file("app/hello.txt", text)], [L.file("etc/motd", b"motd " + text)]],
                     architecture=arch, config={"Cmd": ["/app/hello.txt"]})


def oci_manifest(config: bytes, layers: list[bytes], **extra) -> bytes:
    """A canonical OCI image manifest for blobs that are already uploaded."""
    desc = [{"mediaType": oci.LAYER_TYPES["oci"]["gzip"], "digest": oci.sha256(b), "size": len(b)} for b in layers]
    return oci.canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.sha256(config),
                                          "size": len(config)},
                               "layers": desc, **extra})


def skopeo_raw(reg, reference: str) -> bytes:
    cmd = ["skopeo", "inspect", "--raw", *oci.skopeo_tls_args(reg, ""), f"docker://{reg.host}/{reference}"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def media_type(raw: bytes) -> str:
    return json.loads(raw)["mediaType"]
