"""An image pushed by skopeo, copied by our client (mount and upload), read back by skopeo byte-identical."""

from __future__ import annotations

import subprocess

from converter.registry import MANIFEST_TYPES, OCI_INDEX, RegistryClient
from tests.harness import oci
from tests.registry_helpers import client_for, skopeo_raw, small_image


def copy_image(src: RegistryClient, src_repo: str, dst: RegistryClient, dst_repo: str, tag: str,
               *, mount: bool) -> list[str]:
    """Copy tag and everything under it; returns how each blob got there ("mount" or "upload")."""
    how = []
    top = src.get_manifest(src_repo, tag)
    children = [d["digest"] for d in top.json()["manifests"]] if top.media_type == OCI_INDEX else []
    for digest in children:
        manifest = src.get_manifest(src_repo, digest)
        body = manifest.json()
        for desc in [body["config"], *body["layers"]]:
            if mount and desc["mediaType"] != oci.OCI_CONFIG and dst.mount_blob(dst_repo, desc["digest"], src_repo):
                how.append("mount")
                continue
            with src.open_blob(src_repo, desc["digest"], desc["size"]) as stream:
                dst.upload_blob(dst_repo, stream, digest=desc["digest"], size=desc["size"])
            how.append("upload")
        assert manifest.media_type in MANIFEST_TYPES
        dst.put_manifest(dst_repo, digest, manifest.raw, manifest.media_type)
    dst.put_manifest(dst_repo, tag, top.raw, top.media_type)
    return how


def test_skopeo_round_trip(registry_factory, oci_image_builder, push_image, tmp_path) -> None:
    images = [small_image("amd64"), small_image("arm64", b"arm64 bytes\n")]
    built = oci_image_builder(images, name="multi", attestation=True)
    src_reg = registry_factory()
    other_reg = registry_factory(auth="htpasswd", tls=True)
    assert push_image(built, src_reg, "src/app:v1") == built.digest

    with client_for(src_reg) as src, client_for(other_reg) as other:
        how = copy_image(src, "src/app", src, "dst/app", "v1", mount=True)  # same registry: mounts
        assert how.count("mount") == 6 and how.count("upload") == 4  # 4 layers + 2 in-toto; 4 configs
        assert copy_image(src, "src/app", other, "far/app", "v1", mount=False).count("upload") == 10

    for reg, repo in ((src_reg, "dst/app"), (other_reg, "far/app")):
        assert skopeo_raw(reg, f"{repo}:v1") == built.raw
        out = tmp_path / f"out-{repo.replace('/', '-')}"
        subprocess.run(["skopeo", "copy", "--all", "--preserve-digests", *oci.skopeo_tls_args(reg, "src-"),
                        f"docker://{reg.host}/{repo}:v1", f"oci:{out}:v1"],
                       check=True, capture_output=True, env=oci.skopeo_env(tmp_path / "cache"))
        pulled = {f"sha256:{p.name}": p.read_bytes() for p in (out / "blobs" / "sha256").iterdir()}
        assert pulled == built.blobs
