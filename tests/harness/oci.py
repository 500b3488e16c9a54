"""Write deterministic OCI image layouts from Python-described layers, and push them with skopeo.

A layout holds one image (OCI or Docker v2s2 manifest) or a multi-arch index (OCI index or
Docker manifest list), optionally with a BuildKit-style attestation manifest. The same input
always gives the same digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from converter.image import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tests.harness import layers as L

IN_TOTO = "application/vnd.in-toto+json"

LAYER_TYPES = {
    "oci": {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
            "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
            "none": "application/vnd.oci.image.layer.v1.tar"},
    "docker": {"gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
               "none": "application/vnd.docker.image.rootfs.diff.tar"},
}
EPOCH = "1970-01-01T00:00:00Z"
REF_NAME = "org.opencontainers.image.ref.name"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Layer:
    """A layer from entries (serialised with ``layers.make_tar``) or from a ready tar."""

    entries: Sequence[L.Entry] = ()
    compression: str = "gzip"
    tar: bytes | None = None

    def uncompressed(self) -> bytes:
        return self.tar if self.tar is not None else L.make_tar(self.entries)


@dataclass
class Image:
    layers: Sequence[Layer | Sequence[L.Entry]]
    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    config: dict = field(default_factory=dict)  # the image config's "config" (Cmd, Env, Labels, ...)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> dict:
        platform = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            platform["variant"] = self.variant
        return platform


@dataclass
class BuiltImage:
    """The layout on disk plus everything a test needs to assert on."""

    layout: Path
    name: str  # the layout's ref name (org.opencontainers.image.ref.name)
    digest: str  # top-level manifest or index digest
    media_type: str
    raw: bytes  # top-level manifest or index bytes
    manifests: list[bytes]  # image manifests (one for a single image; children of an index)
    blobs: dict[str, bytes]  # every blob, by digest
    kind: str = "oci"

    @property
    def source(self) -> str:
        """The skopeo source reference of this image."""
        return f"oci:{self.layout}:{self.name}" if self.kind == "oci" else f"dir:{self.layout}"


class _Writer:
    """Stores blobs as an OCI layout, or for Docker images as skopeo's ``dir:`` transport.

    skopeo's ``oci:`` transport only resolves OCI manifests and indexes, so Docker v2s2 images
    and manifest lists go to a ``dir:`` directory: blobs named by their hex digest, the top
    manifest in ``manifest.json`` and list children in ``<hex>.manifest.json``.
    """

    def __init__(self, layout: Path, kind: str):
        self.layout, self.kind = layout, kind
        self.blobs: dict[str, bytes] = {}
        if kind == "oci":
            (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        else:
            layout.mkdir(parents=True, exist_ok=True)
            (layout / "version").write_text("Directory Transport Version: 1.1\n")

    def put(self, media_type: str, data: bytes, **extra) -> dict:
        digest = sha256(data)
        if self.kind == "oci":
            path = self.layout / "blobs" / "sha256" / digest[7:]
        elif media_type in (DOCKER_MANIFEST, DOCKER_LIST):
            path = self.layout / f"{digest[7:]}.manifest.json"
        else:
            path = self.layout / digest[7:]
        path.write_bytes(data)
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def _write_image(writer: _Writer, image: Image, kind: str) -> dict:
    descriptors, diff_ids, history = [], [], []
    for layer in image.layers:
        layer = layer if isinstance(layer, Layer) else Layer(entries=layer)
        if layer.compression not in LAYER_TYPES[kind]:
            raise ValueError(f"{kind} images cannot carry {layer.compression!r} layers")
        tar = layer.uncompressed()
        diff_ids.append(sha256(tar))
        blob = L.compress(tar, layer.compression)
        descriptors.append(writer.put(LAYER_TYPES[kind][layer.compression], blob))
        history.append({"created": EPOCH, "created_by": "tests.harness.oci"})
    config = {"created": EPOCH, **image.platform, "config": image.config,
              "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": history}
    config_desc = writer.put(OCI_CONFIG if kind == "oci" else DOCKER_CONFIG, canonical_json(config))
    manifest: dict = {"schemaVersion": 2, "mediaType": OCI_MANIFEST if kind == "oci" else DOCKER_MANIFEST,
                      "config": config_desc, "layers": descriptors}
    if image.annotations:
        manifest["annotations"] = image.annotations
    return writer.put(manifest["mediaType"], canonical_json(manifest))


def _write_attestation(writer: _Writer, subject: dict) -> dict:
    """A BuildKit-style attestation manifest (unknown/unknown platform, in-toto layer) for ``subject``."""
    statement = {"_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://slsa.dev/provenance/v0.2",
                 "subject": [{"name": "image", "digest": {"sha256": subject["digest"][7:]}}], "predicate": {}}
    layer = writer.put(IN_TOTO, canonical_json(statement),
                       annotations={"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"})
    rootfs = {"type": "layers", "diff_ids": [layer["digest"]]}
    config = writer.put(OCI_CONFIG, canonical_json({"architecture": "unknown", "os": "unknown", "config": {},
                                                    "rootfs": rootfs}))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}
    return writer.put(OCI_MANIFEST, canonical_json(manifest),
                      platform={"architecture": "unknown", "os": "unknown"},
                      annotations={"vnd.docker.reference.type": "attestation-manifest",
                                   "vnd.docker.reference.digest": subject["digest"]})


def build_layout(layout: Path, images: Image | Sequence[Image], *, name: str = "latest", kind: str = "oci",
                 index: bool | None = None, attestation: bool = False) -> BuiltImage:
    """Write ``images`` as an OCI image layout at ``layout`` under ref name ``name``.

    Docker images (``kind="docker"``) go to the skopeo ``dir:`` directory ``layout/name``.

    ``kind``: "oci" (OCI media types) or "docker" (v2s2 manifests, manifest list). A list of
    images, ``index=True`` or ``attestation=True`` gives an index/list with one child per image
    (plus an attestation manifest per image, OCI only).
    """
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown image kind {kind!r} (oci or docker)")
    if attestation and kind != "oci":
        raise ValueError("attestation manifests need kind='oci'")
    single = isinstance(images, Image)
    images = [images] if single else list(images)
    if index is None:
        index = not single or attestation
    layout = Path(layout) if kind == "oci" else Path(layout) / name
    writer = _Writer(layout, kind)
    children = []
    for image in images:
        desc = _write_image(writer, image, kind)
        children.append({**desc, "platform": image.platform} if index else desc)
    manifests = [writer.blobs[c["digest"]] for c in children]
    if attestation:
        children += [_write_attestation(writer, child) for child in list(children)]
    if index:
        top_type = OCI_INDEX if kind == "oci" else DOCKER_LIST
        top = writer.put(top_type, canonical_json({"schemaVersion": 2, "mediaType": top_type,
                                                   "manifests": children}))
    else:
        top = children[0]
    if kind == "oci":
        ref = {**top, "annotations": {REF_NAME: name}}
        index_path = layout / "index.json"
        existing = json.loads(index_path.read_text())["manifests"] if index_path.exists() else []
        existing = [m for m in existing if m.get("annotations", {}).get(REF_NAME) != name]
        index_path.write_bytes(canonical_json({"schemaVersion": 2, "manifests": [*existing, ref]}))
    else:
        (layout / "manifest.json").write_bytes(writer.blobs[top["digest"]])
    return BuiltImage(layout, name, top["digest"], top["mediaType"], writer.blobs[top["digest"]],
                      manifests, writer.blobs, kind)


def skopeo_tls_args(registry, prefix: str) -> list[str]:
    """``--dest-``/``--src-`` TLS and credential flags for a harness ``Registry``."""
    args = ([f"--{prefix}cert-dir", str(registry.cert_dir)] if registry.tls
            else [f"--{prefix}tls-verify=false"])
    if registry.username:
        args += [f"--{prefix}creds", f"{registry.username}:{registry.password}"]
    return args


def skopeo_env(cache_dir: Path) -> dict[str, str]:
    """Environment giving skopeo a private blob-info cache.

    As root skopeo keeps one cache in /var/lib/containers/cache for every run; a blob seen in
    another repository of the same host:port is then mounted instead of pushed, which makes the
    registry's events depend on earlier tests. containers/image treats a process whose
    _CONTAINERS_ROOTLESS_UID is non-zero as rootless and keeps its cache under XDG_DATA_HOME.
    """
    return {**os.environ, "_CONTAINERS_ROOTLESS_UID": "1000", "XDG_DATA_HOME": str(cache_dir)}


def push_image(built: BuiltImage, registry, reference: str, *, format: str | None = None,
               all_platforms: bool = True, extra_args: Sequence[str] = ()) -> str:
    """``skopeo copy`` a built layout to ``<registry>/<reference>``; returns the pushed digest.

    ``format``: None keeps the manifests as built; "v2s2" or "oci" converts (skopeo --format).
    """
    workdir = built.layout.parent
    digest_file = workdir / f".{built.layout.name}.{built.name}.digest"
    cmd = ["skopeo", "copy", "--retry-times", "0", "--digestfile", str(digest_file),
           *skopeo_tls_args(registry, "dest-")]
    if all_platforms:
        cmd.append("--all")
    if format:
        cmd += ["--format", format]
    else:  # otherwise skopeo recompresses uncompressed layers and the digests change
        cmd.append("--preserve-digests")
    cmd += [*extra_args, built.source, f"docker://{registry.host}/{reference}"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=skopeo_env(workdir / ".skopeo-cache"),
                         timeout=120)
    if run.returncode != 0:
        raise RuntimeError(f"skopeo copy to {reference} failed ({run.returncode}): {run.stderr.strip()}")
    return digest_file.read_text().strip()
