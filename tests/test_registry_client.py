"""The registry client against real docker-registry instances: auth variants, manifests, blobs, TLS."""

from __future__ import annotations

import io
import json
import os
import stat
import time

import pytest

from converter.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    AuthError,
    DigestMismatchError,
    NotFoundError,
    RegistryClient,
    RegistryError,
    TLSError,
)
from tests.harness import oci
from tests.harness.tls import make_cert
from tests.registry_helpers import client_for, oci_manifest, skopeo_raw, small_image

CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


def open_uploads(reg, repo: str) -> list:
    """Upload sessions the registry still holds (a cancelled one keeps only its hash state)."""
    return list((reg.workdir / f"storage/docker/registry/v2/repositories/{repo}/_uploads").glob("*/data"))


def pieces(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("variant", ["registry", "registry_tls_basic", "registry_token"])
def test_push_and_pull_through_each_auth_variant(variant, request) -> None:
    reg = request.getfixturevalue(variant)
    layer = os.urandom(300_000)
    with client_for(reg, chunk_size=64 * 1024) as client:
        client.ping()
        # A stream whose digest is unknown until its end: POST + PATCH chunks + PUT ?digest=.
        layer_digest = client.upload_blob("team/app", pieces(layer, 10_000))
        assert layer_digest == oci.sha256(layer)
        assert client.upload_blob("team/app", CONFIG) == oci.sha256(CONFIG)
        raw = oci_manifest(CONFIG, [layer])
        assert client.put_manifest("team/app", "v1", raw, OCI_MANIFEST) == oci.sha256(raw)

        manifest = client.get_manifest("team/app", "v1")
        assert (manifest.raw, manifest.media_type, manifest.digest) == (raw, OCI_MANIFEST, oci.sha256(raw))
        assert client.get_manifest("team/app", manifest.digest).raw == raw
        head = client.head_manifest("team/app", "v1")
        assert (head.digest, head.size, head.media_type) == (manifest.digest, len(raw), OCI_MANIFEST)
        assert client.head_manifest("team/app", "v2") is None
        assert client.blob_exists("team/app", layer_digest) == len(layer)
        with client.open_blob("team/app", layer_digest, len(layer)) as stream:
            assert b"".join(stream) == layer
        assert client.list_tags("team/app") == ["v1"]
    assert skopeo_raw(reg, "team/app:v1") == raw  # a real client reads what we pushed

    if reg.token_server:  # pull-only work asks for pull only; pushes for pull,push
        reg.token_server.issued.clear()
        with client_for(reg) as reader:
            reader.get_manifest("team/app", "v1")
        assert [i["access"] for i in reg.token_server.issued] == [
            [{"type": "repository", "name": "team/app", "actions": ["pull"]}]]


@pytest.mark.parametrize("variant", ["registry_tls_basic", "registry_token"])
def test_wrong_password_fails_fast(variant, request) -> None:
    reg = request.getfixturevalue(variant)
    started = time.monotonic()
    with client_for(reg, credentials="alice:wrong") as client, pytest.raises(AuthError) as err:
        client.get_manifest("team/app", "v1")
    assert time.monotonic() - started < 5
    assert "wrong" not in str(err.value)  # the secret is never in a message
    if variant == "registry_tls_basic":
        assert err.value.status == 401 and err.value.errors[0].code == "UNAUTHORIZED"
    else:
        assert "token server" in str(err.value) and "refused credentials" in str(err.value)


def test_token_expiring_mid_transfer(registry_factory) -> None:
    reg = registry_factory(auth="token")
    # JWTs expire 57 s in the past: with the registry's 60 s leeway they live 2-3 s, while the client
    # is told they last 5 minutes, so it only learns of the expiry from a 401 in the middle of an upload.
    reg.token_server.lifetime, reg.token_server.advertised_lifetime = -57, 300
    data = os.urandom(10 * 65536)

    def slow():
        for piece in pieces(data, 65536):
            time.sleep(0.45)
            yield piece

    with client_for(reg, chunk_size=65536) as client:
        digest = client.upload_blob("slow/blob", slow())
        with client.open_blob("slow/blob", digest) as stream:
            assert stream.read() == data
    push_tokens = [i for i in reg.token_server.issued if i["access"][0]["actions"] == ["pull", "push"]]
    assert len(push_tokens) >= 2, "the token was never refreshed"


def test_manifest_kinds_from_skopeo(registry, oci_image_builder, push_image) -> None:
    images = [small_image("amd64"), small_image("arm64", b"arm\n")]
    built = {
        "oci": oci_image_builder(small_image(), name="oci"),
        "index": oci_image_builder(images, name="index", attestation=True),
        "docker": oci_image_builder(small_image(), name="docker", kind="docker"),
        "list": oci_image_builder(images, name="list", kind="docker"),
    }
    expected = {"oci": OCI_MANIFEST, "index": OCI_INDEX, "docker": DOCKER_MANIFEST, "list": DOCKER_LIST}
    with client_for(registry) as client:
        for name, image in built.items():
            push_image(image, registry, f"kinds/{name}:v1")
            manifest = client.get_manifest(f"kinds/{name}", "v1")
            assert (manifest.raw, manifest.digest, manifest.media_type) == (image.raw, image.digest, expected[name])
        # A manifest list is returned whole, never resolved to one platform.
        assert len(client.get_manifest("kinds/list", "v1").json()["manifests"]) == 2
        with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):
            client.get_manifest("kinds/oci", "nope")
        with pytest.raises(DigestMismatchError):
            client.put_manifest("kinds/oci", "sha256:" + "0" * 64, built["oci"].raw, OCI_MANIFEST)


def test_referrers_tag_schema_fallback(registry) -> None:
    with client_for(registry) as client:
        client.upload_blob("ref/app", CONFIG)
        subject_raw = oci_manifest(CONFIG, [])
        subject = client.put_manifest("ref/app", "v1", subject_raw, OCI_MANIFEST)
        sig = oci_manifest(CONFIG, [], artifactType="application/vnd.example.sig",
                           subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_raw)})
        sbom = oci_manifest(CONFIG, [], artifactType="application/spdx+json",
                            subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_raw)})
        descs = []
        for raw, kind in ((sig, "application/vnd.example.sig"), (sbom, "application/spdx+json")):
            descs.append({"mediaType": OCI_MANIFEST, "digest": client.put_manifest("ref/app", oci.sha256(raw), raw,
                                                                                   OCI_MANIFEST),
                          "size": len(raw), "artifactType": kind})
        assert client.referrers("ref/app", subject) == []  # Distribution 2.8 has no referrers API
        index = oci.canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs})
        client.put_manifest("ref/app", subject.replace(":", "-"), index, OCI_INDEX)
        assert client.referrers("ref/app", subject) == descs
        assert client.referrers("ref/app", subject, artifact_type="application/spdx+json") == [descs[1]]


def test_uploads_verify_digest_and_size(registry) -> None:
    data = os.urandom(200_000)
    with client_for(registry, chunk_size=65536) as client:
        with pytest.raises(DigestMismatchError, match="expected sha256:0000"):
            client.upload_blob("v/app", io.BytesIO(data), digest="sha256:" + "0" * 64)
        with pytest.raises(DigestMismatchError, match="200000 bytes, expected 5"):
            client.upload_blob("v/app", data, size=5)
        assert client.blob_exists("v/app", oci.sha256(data)) is None  # nothing half-published
        digest = client.upload_blob("v/app", io.BytesIO(data), digest=oci.sha256(data), size=len(data))
        # Known digest already present: no upload at all.
        assert client.upload_blob("v/app", iter(()), digest=digest) == digest
        with pytest.raises(DigestMismatchError, match="expected 10"), client.open_blob("v/app", digest, 10) as s:
            s.read()
    assert open_uploads(registry, "v/app") == [], "failed uploads were left open"


def test_trusted_digest_skips_local_hashing_but_the_registry_still_checks(registry) -> None:
    data = os.urandom(300_000)
    wrong = "sha256:" + "1" * 64
    with client_for(registry, chunk_size=65536) as client:
        with pytest.raises(RegistryError, match="DIGEST_INVALID"):
            client.upload_blob("t/app", io.BytesIO(data), digest=wrong, size=len(data), trust_digest=True)
        assert client.blob_exists("t/app", wrong) is None
        assert client.blob_exists("t/app", oci.sha256(data)) is None  # nothing committed under any name
        right = oci.sha256(data)
        assert client.upload_blob("t/app", io.BytesIO(data), digest=right, size=len(data), trust_digest=True) == right
        assert client.blob_exists("t/app", right) == len(data)
        with pytest.raises(ValueError, match="needs the digest"):
            client.upload_blob("t/app", io.BytesIO(data), trust_digest=True)


def test_mount_and_copy_fallback(registry) -> None:
    data = os.urandom(100_000)
    with client_for(registry) as client:
        digest = client.upload_blob("m/src", data)
        assert client.mount_blob("m/dst", digest, "m/src") is True
        assert client.blob_exists("m/dst", digest) == len(data)
        other = client.upload_blob("m/other", b"only here")
        assert client.mount_blob("m/dst2", other, "m/src") is False  # not in m/src: declined, 202
        assert open_uploads(registry, "m/dst2") == [], "declined mount leaked an upload session"
        assert client.copy_blob("m/dst3", digest, "m/src") == digest


def test_copy_between_registries_streams(registry_factory) -> None:
    src, dst = registry_factory(), registry_factory(auth="htpasswd", tls=True)
    data = os.urandom(500_000)
    with client_for(src) as a, client_for(dst, chunk_size=65536) as b:
        digest = a.upload_blob("x/app", data)
        with a.open_blob("x/app", digest, len(data)) as stream:
            assert b.upload_blob("y/app", stream, digest=digest, size=len(data)) == digest
        with b.open_blob("y/app", digest) as stream:
            assert stream.read() == data


def test_tls_verification_options(registry_factory, tmp_path) -> None:
    reg = registry_factory(auth="htpasswd", tls=True)
    creds = f"{reg.username}:{reg.password}"
    with RegistryClient(reg.host, credentials=creds) as client, pytest.raises(TLSError, match="certificate"):
        client.ping()  # verified by default: an unknown CA is refused
    for options in ({"cert_dir": reg.cert_dir}, {"insecure": True}, {"ca_file": reg.ca_file}):
        with RegistryClient(reg.host, credentials=creds, **options) as client:
            client.ping()
    # docker's certs.d layout: <dir>/<host:port>/ca.crt
    certs_d = tmp_path / "certs.d" / reg.host
    certs_d.mkdir(parents=True)
    (certs_d / "ca.crt").write_bytes(reg.ca_file.read_bytes())
    with RegistryClient(reg.host, credentials=creds, cert_dir=tmp_path / "certs.d") as client:
        client.ping()


def test_client_certificates(registry_factory, tmp_path) -> None:
    client_ca = make_cert(tmp_path / "clientca", "ca", cn="client-ca")
    reg = registry_factory(tls=True, client_ca=client_ca)
    leaf = make_cert(tmp_path / "client", "client", cn="builder", issuer=client_ca, client=True)
    with RegistryClient(reg.host, ca_file=reg.ca_file) as client, pytest.raises(TLSError):
        client.ping()
    with RegistryClient(reg.host, ca_file=reg.ca_file, client_cert=(leaf.cert_file, leaf.key_file)) as client:
        client.ping()
    certs = tmp_path / "certs"  # certs.d pair: client.cert + client.key next to ca.crt
    certs.mkdir()
    (certs / "ca.crt").write_bytes(reg.ca_file.read_bytes())
    (certs / "client.cert").write_bytes(leaf.cert_file.read_bytes())
    (certs / "client.key").write_bytes(leaf.key_file.read_bytes())
    with RegistryClient(reg.host, cert_dir=certs) as client:
        client.ping()


def test_docker_config_credentials_against_registry(registry_factory, tmp_path, monkeypatch) -> None:
    reg = registry_factory(auth="token")
    helper = tmp_path / "bin" / "docker-credential-testhelper"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread host\necho "{\\"Username\\":\\"alice\\",\\"Secret\\":\\"wonderland\\"}"\n')
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {reg.host: "testhelper"}}))
    with RegistryClient(reg.host, plain_http=True, docker_config=config) as client:
        assert client.upload_blob("cfg/app", b"via helper") == oci.sha256(b"via helper")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    (tmp_path / "dc").mkdir()
    auths = {"auths": {reg.host: {"auth": "YWxpY2U6d29uZGVybGFuZA=="}}}  # alice:wonderland
    (tmp_path / "dc" / "config.json").write_text(json.dumps(auths))
    with RegistryClient(reg.host, plain_http=True) as client:  # default location via $DOCKER_CONFIG
        assert client.blob_exists("cfg/app", oci.sha256(b"via helper")) == len(b"via helper")
    with RegistryClient(reg.host, plain_http=True, docker_config=tmp_path / "none.json") as client, \
            pytest.raises(AuthError):
        client.blob_exists("cfg/app", oci.sha256(b"via helper"))


def test_identity_token_from_docker_config(registry_factory, tmp_path) -> None:
    reg = registry_factory(auth="token")
    reg.token_server.refresh_tokens["idt-0123456789"] = "alice"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {reg.host: {"identitytoken": "idt-0123456789"}}}))
    with RegistryClient(reg.host, plain_http=True, docker_config=config) as client:
        assert client.upload_blob("idt/app", b"via identity token") == oci.sha256(b"via identity token")
    assert {i["grant"] for i in reg.token_server.issued} == {"refresh_token"}
    config.write_text(json.dumps({"auths": {reg.host: {"identitytoken": "revoked"}}}))
    with RegistryClient(reg.host, plain_http=True, docker_config=config) as client, \
            pytest.raises(AuthError, match="refused credentials"):
        client.blob_exists("idt/app", oci.sha256(b"via identity token"))
