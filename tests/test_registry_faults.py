"""Retries through a fault-injecting proxy in front of a real registry."""

from __future__ import annotations

import os
import time

import pytest

from converter.registry import (
    OCI_MANIFEST,
    AuthError,
    NotFoundError,
    RegistryTransientError,
    UnsupportedManifestError,
)
from tests.harness import oci
from tests.harness.faultproxy import FaultProxy
from tests.registry_helpers import client_for, oci_manifest

CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


@pytest.fixture
def proxied(registry):
    proxy = FaultProxy(int(registry.host.rsplit(":", 1)[1])).start()
    client = client_for(registry, host=proxy.host, chunk_size=65536)
    yield proxy, client
    client.close()
    proxy.stop()


def requests_to(proxy: FaultProxy, method: str, fragment: str) -> list:
    return [entry for entry in proxy.log if entry[0] == method and fragment in entry[1]]


def test_5xx_and_429_are_retried(proxied) -> None:
    proxy, client = proxied
    data = os.urandom(300_000)
    proxy.add("status", method="POST", path="/blobs/uploads/", status=503, times=2)
    proxy.add("status", method="PATCH", status=500, times=2)
    proxy.add("status", method="PUT", path="digest=", status=502, times=1)
    digest = client.upload_blob("f/app", iter([data]))
    assert client.blob_exists("f/app", digest) == len(data)
    assert [e[2] for e in requests_to(proxy, "POST", "/blobs/uploads/")] == [503, 503, 202]
    assert [e[2] for e in requests_to(proxy, "PUT", "digest=")] == [502, 201]

    raw = oci_manifest(client.upload_blob("f/app", CONFIG) and CONFIG, [data])
    client.put_manifest("f/app", "v1", raw, OCI_MANIFEST)
    proxy.add("status", method="GET", path="/manifests/v1", status=429, headers={"Retry-After": "1"})
    started = time.monotonic()
    assert client.get_manifest("f/app", "v1").raw == raw
    assert time.monotonic() - started >= 1.0, "Retry-After was not honoured"


def test_connection_dropped_mid_body(proxied) -> None:
    proxy, client = proxied
    data = os.urandom(400_000)
    proxy.add("drop_request", method="PATCH", times=2)  # upload chunks cut off halfway
    digest = client.upload_blob("d/app", iter([data]))
    assert len([e for e in proxy.log if e[2] == "drop_request"]) == 2
    proxy.add("drop_response", method="GET", path="/blobs/", times=2)  # download resumed with Range
    with client.open_blob("d/app", digest, len(data)) as stream:
        assert stream.read() == data
    resumed = requests_to(proxy, "GET", f"/blobs/{digest}")
    assert [e[2] for e in resumed] == ["drop_response", "drop_response", 206]
    raw = oci_manifest(CONFIG, [data])
    client.upload_blob("d/app", CONFIG)
    client.put_manifest("d/app", "v1", raw, OCI_MANIFEST)
    proxy.add("drop_response", method="GET", path="/manifests/v1")
    assert client.get_manifest("d/app", "v1").raw == raw


def test_permanent_errors_fail_fast_with_the_registry_message(proxied) -> None:
    proxy, client = proxied
    forbidden = b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}'
    proxy.add("respond", method="GET", path="/manifests/locked", status=403, body=forbidden, times=99)
    started = time.monotonic()
    with pytest.raises(AuthError, match="DENIED: requested access to the resource is denied") as err:
        client.get_manifest("p/app", "locked")
    assert err.value.status == 403 and err.value.errors[0].code == "DENIED"
    with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN: manifest unknown") as err:
        client.get_manifest("p/app", "missing")  # the real registry's 404
    assert err.value.errors[0].code == "MANIFEST_UNKNOWN"
    assert time.monotonic() - started < 2
    assert len(requests_to(proxy, "GET", "/manifests/locked")) == 1
    assert len(requests_to(proxy, "GET", "/manifests/missing")) == 1


def test_retry_budget_is_bounded(proxied) -> None:
    proxy, client = proxied
    proxy.add("status", method="GET", path="/manifests/", status=503, times=99)
    with pytest.raises(RegistryTransientError, match=r"HTTP 503 INJECTED.*gave up after 5 attempts") as err:
        client.get_manifest("b/app", "v1")
    assert err.value.status == 503
    assert len(requests_to(proxy, "GET", "/manifests/")) == 5


def test_schema1_and_unknown_types_are_refused(proxied) -> None:
    proxy, client = proxied
    schema1 = b'{"schemaVersion":1,"name":"old/app","tag":"v1","fsLayers":[],"history":[]}'
    proxy.add("respond", method="GET", path="/manifests/old", status=200, body=schema1,
              headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws",
                       "Docker-Content-Digest": oci.sha256(schema1)})
    with pytest.raises(UnsupportedManifestError, match="schema 1"):
        client.get_manifest("old/app", "old")
    proxy.add("respond", method="GET", path="/manifests/odd", status=200, body=b"{}",
              headers={"Content-Type": "application/x-odd"})
    with pytest.raises(UnsupportedManifestError, match="application/x-odd"):
        client.get_manifest("old/app", "odd")


def test_referrers_api_when_the_registry_has_it(proxied) -> None:
    # Distribution 2.8 has no referrers API, so the proxy answers for a registry that does.
    proxy, client = proxied
    subject = "sha256:" + "ab" * 32
    sig = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "01" * 32, "size": 10, "artifactType": "x/sig"}
    sbom = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "02" * 32, "size": 20, "artifactType": "x/sbom"}
    index = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [sig, sbom]})
    proxy.add("respond", method="GET", path=f"/referrers/{subject}$", status=200, body=index,
              headers={"Content-Type": oci.OCI_INDEX})
    assert client.referrers("r/app", subject) == [sig, sbom]
    # The registry ignored the filter (no OCI-Filters-Applied): the client applies it.
    proxy.add("respond", method="GET", path=f"/referrers/{subject}\\?artifactType=x%2Fsbom", status=200,
              body=index, headers={"Content-Type": oci.OCI_INDEX})
    assert client.referrers("r/app", subject, artifact_type="x/sbom") == [sbom]
    # A registry that filtered says so, and its answer is taken as is.
    filtered = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [sig]})
    proxy.add("respond", method="GET", path=f"/referrers/{subject}\\?artifactType=x%2Fsig", status=200,
              body=filtered, headers={"Content-Type": oci.OCI_INDEX, "OCI-Filters-Applied": "artifactType"})
    assert client.referrers("r/app", subject, artifact_type="x/sig") == [sig]
    assert not [e for e in proxy.log if "sha256-" in e[1]], "the tag-schema fallback was used needlessly"
