"""Image manifests, configs and indexes: what we accept as input and the §8 rewrite into overlaybd form.

Reference: overlaybd-format.md §1.7 (layer UUIDs from chain IDs), §3.2 (base layer), §8 (manifest and config).
Everything here is pure data in, data out: the pipeline fetches and pushes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ImageError  # defined with the other error bases; importable from here as before
from .formats.lsmt import MAX_STACK_LAYERS
from .shape import check_config, check_index, check_manifest, load_json_object

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
# Source layer types we can read: tar, gzip or zstd (the ext4 builder detects the compression itself).
SOURCE_LAYER_TYPES = frozenset({
    OCI_LAYER_TAR, OCI_LAYER_TAR + "+gzip", OCI_LAYER_TAR + "+zstd",
    DOCKER_LAYER_TAR, DOCKER_LAYER_TAR + ".gzip", DOCKER_LAYER_TAR + ".zstd",
})
FOREIGN_LAYER_TYPES = frozenset({"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                                 "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"})

OBD_BLOB_DIGEST = "containerd.io/snapshot/overlaybd/blob-digest"
OBD_BLOB_SIZE = "containerd.io/snapshot/overlaybd/blob-size"
OBD_VERSION = "containerd.io/snapshot/overlaybd/version"
OBD_VERSION_VALUE = "0.1.0"
OBD_ARTIFACT_PREFIX = "application/vnd.containerd.overlaybd."
OBD_ARTIFACT_TYPE = "application/vnd.containerd.overlaybd.native.v1+json"
TURBO_ARTIFACT_TYPE = "application/vnd.containerd.overlaybd.turbo.v1+json"
TURBO_TARGET_DIGEST = "containerd.io/snapshot/overlaybd/turbo-oci/target-digest"
LEGACY_TURBO_TARGET_DIGEST = "containerd.io/snapshot/overlaybd/fastoci/target-digest"
BASE_LAYER_UUID = "C02FB491-B4D4-4904-8684-A014D032AF78"
ZERO_UUID = "00000000-0000-0000-0000-000000000000"

# Our own annotations on the converted manifest or index: "is <tag>_obd up to date?" is one GET.
ANN_SOURCE_DIGEST = "io.github.obd-autoconvert.source.digest"
ANN_OPTIONS_DIGEST = "io.github.obd-autoconvert.options.digest"

ATTESTATION_TYPE_KEY = "vnd.docker.reference.type"
ATTESTATION_TYPE = "attestation-manifest"


class NotAnImageError(ImageError):
    """The source is an artifact (signature, SBOM, chart), or already in overlaybd format."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON with the keys in insertion order (the order our rewrites build)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(diff_id if not chain else sha256_digest(f"{chain[-1]} {diff_id}".encode()))
    return chain


def uuid_from_chain_id(chain_id: str) -> str:
    """§1.7: the first 32 hex digits after "sha256:", grouped 8-4-4-4-12, uppercase."""
    algo, _, hexpart = chain_id.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise ImageError(f"chain ID {chain_id!r} is not a sha256 digest")
    h = hexpart[:32].upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def platform_string(platform: Mapping[str, Any] | None) -> str:
    if not platform:
        return ""
    parts = [platform.get("os", ""), platform.get("architecture", "")]
    if platform.get("variant"):
        parts.append(platform["variant"])
    return "/".join(parts)


def is_attestation(desc: Mapping[str, Any]) -> bool:
    """BuildKit attestation manifests (in-toto provenance/SBOM attached to an index): dropped."""
    if (desc.get("annotations") or {}).get(ATTESTATION_TYPE_KEY) == ATTESTATION_TYPE:
        return True
    platform = desc.get("platform") or {}
    return platform.get("os") == "unknown" and platform.get("architecture") == "unknown"


def platform_matches(platform: Mapping[str, Any] | None, wanted: Sequence[str]) -> bool:
    """`wanted` holds "os/arch[/variant]" strings; a filter without variant matches every variant."""
    if not wanted:
        return True
    have = platform_string(platform)
    return any(have == w or (w.count("/") == 1 and have.startswith(w + "/")) for w in wanted)


# ----------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class SourceLayer:
    index: int
    digest: str
    size: int
    media_type: str
    diff_id: str
    chain_id: str

    @property
    def uuid(self) -> str:
        return uuid_from_chain_id(self.chain_id)

    @property
    def label(self) -> str:
        return f"{self.index + 1} ({self.digest})"


@dataclass(frozen=True)
class SourceImage:
    """One single-platform image manifest with its config, checked for convertibility."""

    digest: str
    media_type: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    config_media_type: str
    layers: tuple[SourceLayer, ...]


def check_not_overlaybd(manifest: Mapping[str, Any], where: str) -> None:
    """§8 detection: overlaybd layer annotations or an overlaybd artifactType."""
    if str(manifest.get("artifactType", "")).startswith(OBD_ARTIFACT_PREFIX):
        raise NotAnImageError(f"{where} is already in overlaybd format (artifactType {manifest['artifactType']})")
    for layer in manifest.get("layers") or []:
        annotations = layer.get("annotations") or {}
        if OBD_BLOB_DIGEST in annotations or OBD_VERSION in annotations or TURBO_TARGET_DIGEST in annotations \
                or LEGACY_TURBO_TARGET_DIGEST in annotations:
            raise NotAnImageError(f"{where} is already in overlaybd format (layer {layer.get('digest')} "
                                  f"has {OBD_BLOB_DIGEST if OBD_BLOB_DIGEST in annotations else OBD_VERSION})")


def parse_manifest(raw: bytes, media_type: str, where: str) -> dict[str, Any]:
    if media_type in DOCKER_SCHEMA1:
        raise ImageError(f"{where}: Docker schema 1 manifests are not supported (push the image again with a "
                         "current client to get schema 2)")
    manifest = load_json_object(raw, where, "manifest")
    if manifest.get("schemaVersion") == 1:
        raise ImageError(f"{where}: Docker schema 1 manifests are not supported")
    # Shape first: everything after this may use the checked fields as the spec types them.
    if media_type in (OCI_INDEX, DOCKER_LIST) or (not media_type and "manifests" in manifest):
        check_index(manifest, where)
    else:
        check_manifest(manifest, where)
    declared = manifest.get("mediaType")
    if declared and media_type and declared != media_type:
        raise ImageError(f"{where}: manifest says mediaType {declared!r} but was served as {media_type!r}")
    return manifest


def check_image_manifest(manifest: Mapping[str, Any], where: str) -> None:
    """Refuse artifacts: anything whose config is not an image config or whose layers are not tar layers."""
    check_not_overlaybd(manifest, where)
    if manifest.get("artifactType"):
        raise NotAnImageError(f"{where} is an artifact ({manifest['artifactType']}), not a container image")
    config = manifest.get("config")
    if not isinstance(config, dict) or "digest" not in config:
        raise ImageError(f"{where}: manifest has no config descriptor")
    if config.get("mediaType") not in (OCI_CONFIG, DOCKER_CONFIG):
        raise NotAnImageError(f"{where} is not a container image (config media type {config.get('mediaType')!r}: "
                              "a signature, SBOM, chart or other artifact)")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ImageError(f"{where}: manifest has no layers")
    for k, layer in enumerate(layers):
        mt = layer.get("mediaType")
        if mt in FOREIGN_LAYER_TYPES:
            raise ImageError(f"{where}: layer {k + 1} ({layer.get('digest')}) is a foreign/non-distributable "
                             f"layer ({mt}); it cannot be downloaded from the registry")
        if mt not in SOURCE_LAYER_TYPES:
            raise NotAnImageError(f"{where}: layer {k + 1} ({layer.get('digest')}) has media type {mt!r}, not a "
                                  "container filesystem layer (a signature, SBOM or other artifact?)")
        if not isinstance(layer.get("digest"), str) or not isinstance(layer.get("size"), int):
            raise ImageError(f"{where}: layer {k + 1} descriptor lacks a digest or size")


def check_layer_count(manifest: Mapping[str, Any], where: str, *, base_layer: bool) -> None:
    """overlaybd opens at most MAX_STACK_LAYERS (255) layers, the base layer of --mkfs=false included:
    a longer image would convert, but no overlaybd (nor our own `dump`) could open it."""
    count = len(manifest.get("layers") or [])
    limit = MAX_STACK_LAYERS - (1 if base_layer else 0)
    if count > limit:
        base = " (--mkfs=false adds the base layer)" if base_layer else ""
        raise ImageError(f"{where}: {count} layers, but overlaybd stacks at most {MAX_STACK_LAYERS}{base}, so at "
                         f"most {limit} may come from the image; squash some layers and push it again")


def source_image(digest: str, media_type: str, manifest: dict[str, Any], config_raw: bytes,
                 where: str) -> SourceImage:
    """Combine a checked manifest with its config; diff_ids must match the layers one to one."""
    config = load_json_object(config_raw, where, "config")
    diff_ids = check_config(config, where)
    layers = manifest["layers"]
    if len(diff_ids) != len(layers):
        raise ImageError(f"{where}: config rootfs.diff_ids has {len(diff_ids)} entries for {len(layers)} layers")
    chains = chain_ids(diff_ids)
    source_layers = tuple(SourceLayer(k, d["digest"], d["size"], d["mediaType"], diff_ids[k], chains[k])
                          for k, d in enumerate(layers))
    return SourceImage(digest, media_type, manifest, config, manifest["config"]["mediaType"], source_layers)


# ----------------------------------------------------------------------------------------- rewriting


@dataclass(frozen=True)
class ConvertedLayer:
    digest: str
    size: int
    # TurboOCI meta layers (and native layers inside a turbo image) bring their own descriptor and diff_id
    descriptor: Mapping[str, Any] | None = None
    diff_id: str | None = None  # default: the digest (a native blob is an uncompressed tar)


def layer_descriptor(layer: ConvertedLayer, oci: bool) -> dict[str, Any]:
    if layer.descriptor is not None:
        return dict(layer.descriptor)
    return {"mediaType": OCI_LAYER_TAR if oci else DOCKER_LAYER_TAR, "digest": layer.digest, "size": layer.size,
            "annotations": {OBD_BLOB_DIGEST: layer.digest, OBD_BLOB_SIZE: str(layer.size),
                            OBD_VERSION: OBD_VERSION_VALUE}}


def rewrite_config(config: Mapping[str, Any], layers: Sequence[ConvertedLayer]) -> bytes:
    """The source config with rootfs.diff_ids replaced by the overlaybd blob digests (for a TurboOCI meta layer,
    the digest of the tar inside it, TurboOCI §1.5); the rest unchanged."""
    out = dict(config)
    out["rootfs"] = {**config["rootfs"], "diff_ids": [layer.diff_id or layer.digest for layer in layers]}
    return canonical(out)


def rewrite_manifest(source: SourceImage, config_raw: bytes, layers: Sequence[ConvertedLayer], *, oci: bool,
                     annotations: Mapping[str, str], subject: Mapping[str, Any] | None = None,
                     artifact_type: str = OBD_ARTIFACT_TYPE) -> bytes:
    """The converted image manifest (§8; TurboOCI §1.4). `annotations` (ours) are added to the source's own."""
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if subject is not None:
        manifest["artifactType"] = artifact_type
    manifest["config"] = {"mediaType": OCI_CONFIG if oci else DOCKER_CONFIG, "digest": sha256_digest(config_raw),
                          "size": len(config_raw)}
    manifest["layers"] = [layer_descriptor(layer, oci) for layer in layers]
    if subject is not None:
        manifest["subject"] = dict(subject)
    merged = {**(source.manifest.get("annotations") or {}), **annotations}
    if merged:
        manifest["annotations"] = merged
    return canonical(manifest)


@dataclass(frozen=True)
class ConvertedChild:
    """A converted child of an index: its source descriptor and the pushed manifest."""

    source: Mapping[str, Any]
    digest: str
    size: int
    media_type: str


def rewrite_index(index: Mapping[str, Any], children: Sequence[ConvertedChild], *, oci: bool,
                  annotations: Mapping[str, str], subject: Mapping[str, Any] | None = None,
                  artifact_type: str = OBD_ARTIFACT_TYPE) -> bytes:
    """The converted index: platform and annotations kept, digest/size/mediaType replaced (§8)."""
    media_type = OCI_INDEX if oci else DOCKER_LIST
    out: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
    if subject is not None:
        out["artifactType"] = artifact_type
    out["manifests"] = [{**child.source, "mediaType": child.media_type, "digest": child.digest, "size": child.size}
                        for child in children]
    if subject is not None:
        out["subject"] = dict(subject)
    merged = {**(index.get("annotations") or {}), **annotations}
    if merged:
        out["annotations"] = merged
    return canonical(out)


def derive_key(bytes_key: str, *, oci: bool, referrer: bool) -> str:
    """The options annotation value: the byte-shaping options plus the output flavour."""
    return sha256_digest(f"{bytes_key} oci={int(oci)} referrer={int(referrer)}".encode())
