"""The real-registry harness: notifications from skopeo pushes, the three auth variants, the builder."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest

from tests.harness import layers as L
from tests.harness import oci
from tests.harness.registry import Endpoint

HOOK_SECRET = "Bearer s3cr3t-hook-token"
BLOB = "application/octet-stream"


def small_image(arch: str = "amd64", text: bytes = b"hello\n") -> oci.Image:
    return oci.Image([[L.dir("app"), L.file("app/hello.txt", text)], [L.file("etc/motd", b"motd\n")]],
                     architecture=arch, config={"Cmd": ["/app/hello.txt"]})


def skopeo_raw(registry, reference: str) -> bytes:
    cmd = ["skopeo", "inspect", "--raw", *oci.skopeo_tls_args(registry, ""), f"docker://{registry.host}/{reference}"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def test_skopeo_push_delivers_real_notification(registry_factory, event_receiver, oci_image_builder,
                                                push_image) -> None:
    hook = Endpoint(event_receiver.url, headers={"Authorization": [HOOK_SECRET]})
    reg = registry_factory(notifications=[hook])
    built = oci_image_builder(small_image(), name="single")
    digest = push_image(built, reg, "demo/single:v1")
    assert digest == built.digest

    def manifest_pushed(events: list[dict]) -> bool:
        return any(e["action"] == "push" and e["target"].get("tag") == "v1" for e in events)

    events = event_receiver.wait_for(manifest_pushed)
    event = next(e for e in events if e["action"] == "push" and e["target"].get("tag") == "v1")
    target = event["target"]
    assert target["repository"] == "demo/single"
    assert target["digest"] == built.digest
    assert target["mediaType"] == oci.OCI_MANIFEST
    assert target["size"] == len(built.raw)
    manifest = json.loads(built.raw)
    assert [r["digest"] for r in target["references"]] == [manifest["config"]["digest"]] + [
        layer["digest"] for layer in manifest["layers"]]
    # The layer and config blobs were pushed (not mounted from a stale skopeo cache) before the manifest.
    blob_pushes = [e for e in events if e["action"] == "push" and e["target"]["mediaType"] == BLOB]
    assert len(blob_pushes) == 3
    request = next(r for r in event_receiver.requests if "v1" in r.body.decode())
    assert request.headers["Content-Type"] == "application/vnd.docker.distribution.events.v1+json"
    assert request.headers["Authorization"] == HOOK_SECRET


def test_filters_leave_only_manifest_pushes(registry_factory, event_receiver, oci_image_builder,
                                            push_image) -> None:
    hook = Endpoint(event_receiver.url, ignored_mediatypes=[BLOB], ignore_actions=["pull", "mount", "delete"])
    reg = registry_factory(notifications=[hook])
    images = [small_image("amd64"), small_image("arm64", b"arm\n")]
    built = oci_image_builder(images, name="multi", attestation=True)
    assert push_image(built, reg, "demo/multi:v1") == built.digest
    index = json.loads(built.raw)
    assert len(index["manifests"]) == 4  # two images, two attestation manifests
    events = event_receiver.wait_for(lambda evs: any(e["target"].get("tag") == "v1" for e in evs))
    skopeo_raw(reg, "demo/multi:v1")  # a pull, which the filter drops
    reg.stop()  # stopping flushes nothing new: assert on what was delivered
    events = event_receiver.events
    assert {e["action"] for e in events} == {"push"}
    assert sorted(e["target"]["digest"] for e in events) == sorted(
        [built.digest] + [m["digest"] for m in index["manifests"]])
    assert [e["target"]["mediaType"] for e in events if e["target"].get("tag")] == [oci.OCI_INDEX]


@pytest.mark.parametrize("variant", ["registry", "registry_tls_basic", "registry_token"])
def test_auth_variants_push_and_pull(variant, request, oci_image_builder, push_image, tmp_path) -> None:
    reg = request.getfixturevalue(variant)
    built = oci_image_builder(small_image(), name="img")
    assert push_image(built, reg, "auth/img:v1") == built.digest
    assert skopeo_raw(reg, "auth/img:v1") == built.raw
    out = tmp_path / "pulled"
    subprocess.run(["skopeo", "copy", *oci.skopeo_tls_args(reg, "src-"), f"docker://{reg.host}/auth/img:v1",
                    f"oci:{out}:v1"], check=True, capture_output=True, env=oci.skopeo_env(tmp_path / "cache"))
    for digest, blob in built.blobs.items():
        assert (out / "blobs" / "sha256" / digest[7:]).read_bytes() == blob
    # Without credentials the protected variants refuse.
    url = urllib.request.Request(f"{reg.url}/v2/auth/img/manifests/v1", headers={"Accept": oci.OCI_MANIFEST})
    try:
        urllib.request.urlopen(url, context=reg.ssl_context(), timeout=5).close()
        status = 200
    except urllib.error.HTTPError as err:
        status = err.code
    assert status == (200 if reg.auth == "none" else 401)
    if reg.token_server:
        scopes = [a for issued in reg.token_server.issued for a in issued["access"]]
        assert {"type": "repository", "name": "auth/img", "actions": ["pull", "push"]} in scopes


def test_builder_is_deterministic_and_docker_kinds_push(registry, oci_image_builder, push_image,
                                                        tmp_path) -> None:
    first = oci.build_layout(tmp_path / "a", small_image())
    second = oci.build_layout(tmp_path / "b", small_image())
    assert first.digest == second.digest and first.blobs == second.blobs

    docker = oci_image_builder(small_image(), name="dock", kind="docker")
    assert json.loads(docker.raw)["mediaType"] == oci.DOCKER_MANIFEST
    assert push_image(docker, registry, "demo/dock:v1") == docker.digest
    assert skopeo_raw(registry, "demo/dock:v1") == docker.raw

    images = [small_image("amd64"), small_image("arm64", b"arm")]
    dlist = oci_image_builder(images, name="dlist", kind="docker")
    assert push_image(dlist, registry, "demo/dlist:v1") == dlist.digest
    assert json.loads(skopeo_raw(registry, "demo/dlist:v1"))["mediaType"] == oci.DOCKER_LIST

    converted = json.loads(skopeo_raw(registry, "demo/dlist:v1"))
    assert [m["platform"]["architecture"] for m in converted["manifests"]] == ["amd64", "arm64"]

    mixed = oci_image_builder(oci.Image([oci.Layer([L.file("z", b"z")], compression="zstd"),
                                         oci.Layer([L.file("n", b"n")], compression="none")]), name="mixed")
    assert push_image(mixed, registry, "demo/mixed:v1") == mixed.digest
    layer_types = [d["mediaType"] for d in json.loads(mixed.raw)["layers"]]
    assert layer_types == [oci.LAYER_TYPES["oci"]["zstd"], oci.LAYER_TYPES["oci"]["none"]]

    v2s2 = push_image(oci_image_builder(small_image(), name="conv"), registry, "demo/conv:v1", format="v2s2")
    assert json.loads(skopeo_raw(registry, f"demo/conv@{v2s2}"))["mediaType"] == oci.DOCKER_MANIFEST
    with pytest.raises(ValueError, match="docker images cannot carry 'zstd' layers"):
        zstd_image = oci.Image([oci.Layer([L.file("z")], compression="zstd")])
        oci_image_builder(zstd_image, name="bad", kind="docker")
