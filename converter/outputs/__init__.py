"""Output kinds: what a conversion publishes for each source image (native overlaybd, TurboOCI).

One module per kind, each with an `Output` subclass behind this small interface. The pipeline owns the
rest (reading sources, the ext4 builder, uploads, the reuse cache, indexes) and drives every requested
output from ONE builder pass per layer: the filesystem and its block allocation do not depend on the kind,
only what happens to file data does (native: written; turbo: mapped to the original tar). So
`--overlaybd T1 --turboOCI T2` decompresses and applies each source layer once.

Per source layer: `start_layer(ctx)` -> a `LayerJob` whose sinks the builder writes into, then
`job.finish(tar)` -> a `LayerBlob` (descriptor, diff_id, files to upload). Per image: `image_manifest()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache import CachedLayer
from ..ext4 import BlockSink, RemoteSink
from ..ext4.layerstream import LayerStream
from ..image import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    ConvertedLayer,
    SourceImage,
    SourceLayer,
    derive_key,
    rewrite_config,
    rewrite_manifest,
)
from ..options import ConvertOptions
from ..transport import Store

__all__ = ["LayerBlob", "LayerContext", "LayerJob", "Lower", "Output", "Upload"]


@dataclass(frozen=True)
class LayerContext:
    """What an output needs to know to convert one source layer."""

    layer: SourceLayer
    parent_uuid: str | None  # the previous layer's UUID (None for the first layer)
    vsize: int  # bytes
    compression: str  # detected from the blob's magic: "gzip", "zstd" or "none"
    work: Path  # a per-layer file prefix in the run's temp dir
    original_copy: str | None = None  # where the pipeline copies the source blob (a target lacks it)


@dataclass(frozen=True)
class Upload:
    """A local file the target needs (a converted blob, or a copy of an original layer)."""

    path: str
    digest: str
    size: int
    delete: bool = True  # a temp file of this run (False: someone else's, e.g. a layout's own blob)


@dataclass(frozen=True)
class Lower:
    """A local file of a converted lower layer, for rebuilding the filesystem above a reused prefix:
    a native blob, or a turbo layer's ext4.fs.meta (only its metadata is read)."""

    path: str
    meta: bool = False
    temporary: bool = True  # fetched into the run's temp dir (False: a layout's own blob file)


@dataclass
class LayerBlob:
    """One layer of the converted image: its manifest entry plus the files still to upload (in order)."""

    layer: ConvertedLayer
    uploads: list[Upload] = field(default_factory=list)
    format: str = "native"  # "native" | "turbo": how this layer is stored in the output
    note: str = ""  # e.g. why a layer of a turbo image is native


class LayerJob(ABC):
    """The sinks of one output for one layer. `native` gets native blocks (metadata and file data),
    `turbo` a TurboOCI meta layer (metadata and tag-1 mappings); `copy_source`, if set, is where the
    pipeline copies the raw source blob while reading it (originals a turbo target lacks)."""

    native: BlockSink | None = None
    turbo: RemoteSink | None = None
    copy_source: str | None = None
    wants_gzip_index: bool = False

    @abstractmethod
    def finish(self, tar: LayerStream) -> LayerBlob:
        """After the builder and the source reached their ends: close the writers, build the blob."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything partial (a failed layer publishes nothing)."""


class Output(ABC):
    """One kind of converted image, published at `dst` (tag `tag`)."""

    kind: str  # "overlaybd" | "turbo"
    artifact_type: str

    def __init__(self, dst: Store, tag: str, opts: ConvertOptions) -> None:
        self.dst, self.tag, self.opts = dst, tag, opts
        self.bytes_key = ""
        self.output_key = ""

    def set_keys(self, bytes_key: str) -> None:
        """`bytes_key` digests the byte-shaping options (the base layer included); each kind derives its own
        cache key and annotation from it, so native and turbo results never mix."""
        self.bytes_key = self.cache_key(bytes_key)
        self.output_key = derive_key(self.bytes_key, oci=self.opts.oci, referrer=self.opts.referrer)

    def cache_key(self, bytes_key: str) -> str:
        return bytes_key

    @abstractmethod
    def start_layer(self, ctx: LayerContext) -> LayerJob:
        """The sinks for this layer (called before the builder reads it)."""

    def needs_original(self, layer: SourceLayer) -> bool:
        """Whether the target still lacks this source layer's original blob (then the pipeline copies it
        while reading it)."""
        return False

    def ready_for_reuse(self, layer: SourceLayer) -> bool:
        """Whether a cached result for this layer can be used in this target (everything it needs is there)."""
        return True

    @abstractmethod
    def reused(self, layer: SourceLayer, hit: CachedLayer, work: Path) -> tuple[ConvertedLayer, Lower]:
        """A layer converted before (cache hit present in the target): its manifest entry, and the local file
        to rebuild the filesystem from (`work` is a temp path for it)."""

    def image_manifest(self, image: SourceImage, layers: list[ConvertedLayer], annotations: Mapping[str, str],
                       subject: Mapping[str, Any] | None) -> tuple[bytes, bytes, str]:
        """(config, manifest, manifest media type) of the converted image."""
        config = rewrite_config(image.config, layers)
        raw = rewrite_manifest(image, config, layers, oci=self.opts.oci, annotations=annotations, subject=subject,
                               artifact_type=self.artifact_type)
        return config, raw, OCI_MANIFEST if self.opts.oci else DOCKER_MANIFEST
