"""The TurboOCIv1 output: per source layer a small meta layer mapped onto the untouched original blob.

Reference: turbooci-format.md §1 (blobs, descriptor, manifest, config), §2 (meta layer), §4 (zstd), §6.3
(the originals must be fetchable from the turbo image's own repository). A gzip or plain-tar layer becomes
`turboOCIv1.tar.gz` (the ext4 metadata as a warp LSMT + the gzip index built in the same decompression
pass); a zstd layer has no random-access reader at run time, so it is converted natively inside the same
image (native and turbo layers mix in one overlaybd stack, §2.5) and the result says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

from ..cache import CachedLayer
from ..ext4.layerstream import LayerStream
from ..formats.common import FileView, FormatError
from ..formats.lsmt import LsmtLayer
from ..formats.turbo import (
    GZIP_MAGIC,
    layer_media_type,
    read_turbo_blob,
    target_media_type,
    turbo_annotations,
    write_turbo_blob,
)
from ..formats.warp import MetaLayerWriter
from ..formats.zfile import ZFileReader
from ..image import TURBO_ARTIFACT_TYPE, ConvertedLayer, ImageError, SourceLayer, layer_descriptor, sha256_digest
from ..options import ConvertOptions
from ..transport import Store
from . import LayerBlob, LayerContext, LayerJob, Lower, Output, Upload
from .native import native_job

ZSTD_NOTE = "zstd layer converted natively (TurboOCI has no random-access reader for zstd, turbooci §4)"
MULTI_MEMBER_NOTE = ("multi-member gzip layer (eStargz?) converted natively (a gzip index covers only the first "
                     "member, turbooci §3.6)")


class TurboLayerError(ImageError):
    """A turbo layer could not be produced or reused; the message names the layer."""


def meta_descriptor(digest: str, size: int, source: SourceLayer, compression: str, oci: bool) -> dict[str, object]:
    """The §1.3 layer descriptor of a meta layer."""
    return {"mediaType": layer_media_type(oci), "digest": digest, "size": size,
            "annotations": turbo_annotations(digest, size, source.digest,
                                             target_media_type(source.media_type, compression))}


class _NoFileData:
    """Stands in for an original tar when only metadata is read (rebuilding the filesystem above reused
    layers reads superblock, bitmaps, inodes, directories, extent and EA blocks: all tag 0)."""

    name = "(original layer not needed for metadata)"
    size = 1 << 62

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def close(self) -> None:
        pass


def meta_lower(path: str) -> LsmtLayer:
    """A bare ext4.fs.meta opened as a stack layer whose tag-1 data reads as zeros (the caller closes it)."""
    view = FileView(path)
    try:
        zfile = ZFileReader(view)
        layer = LsmtLayer(zfile, zfile=zfile, on_close=view.close, warp=True)
        layer.attach_remote(_NoFileData())  # type: ignore[arg-type]
        return layer
    except BaseException:
        view.close()
        raise


class TurboJob(LayerJob):
    """One gzip or plain-tar layer: metadata and tag-1 mappings into a MetaLayerWriter."""

    def __init__(self, ctx: LayerContext, opts: ConvertOptions) -> None:
        self.ctx, self.opts = ctx, opts
        self.meta = MetaLayerWriter(f"{ctx.work}.meta")
        self.turbo = self.meta
        self.wants_gzip_index = ctx.compression == "gzip"
        self.copy_source = ctx.original_copy  # set by the pipeline when the target lacks the original

    def finish(self, tar: LayerStream) -> LayerBlob:
        layer = self.ctx.layer
        info = self.meta.close()
        try:
            if info.tar_end > tar.count:
                raise TurboLayerError(f"layer {layer.label}: the meta layer maps tar bytes up to {info.tar_end}, "
                                      f"past the end of the {tar.count}-byte tar")
            index = tar.gzip_index() if self.wants_gzip_index else None
            if self.wants_gzip_index and index is None:
                raise TurboLayerError(f"layer {layer.label}: no gzip index was built for a gzip layer")
            blob = write_turbo_blob(f"{self.ctx.work}.turbo.tar.gz", info.path, index)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(info.path)
        descriptor = meta_descriptor(blob.digest, blob.size, layer, self.ctx.compression, self.opts.oci)
        uploads = [Upload(blob.path, blob.digest, blob.size)]
        if self.copy_source is not None:
            uploads.insert(0, Upload(self.copy_source, layer.digest, layer.size))  # the original first
        return LayerBlob(ConvertedLayer(blob.digest, blob.size, descriptor, blob.diff_id), uploads, "turbo")

    def abort(self) -> None:
        self.meta.abort()
        if self.copy_source is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.copy_source)


class TurboOutput(Output):
    kind = "turbo"
    artifact_type = TURBO_ARTIFACT_TYPE

    def __init__(self, dst: Store, tag: str, opts: ConvertOptions, src: Store) -> None:
        super().__init__(dst, tag, opts)
        self.src = src
        self.native_layers: set[str] = set()  # source digests to convert natively (multi-member gzip)
        self.originals_copied = 0  # original blobs this run mounted into the target
        self._lock = threading.Lock()  # index children convert in parallel

    def cache_key(self, bytes_key: str) -> str:
        return sha256_digest(f"{bytes_key} turbo=ociv1".encode())

    def start_layer(self, ctx: LayerContext) -> LayerJob:
        if ctx.compression == "zstd":
            return native_job(ctx, self.opts, ZSTD_NOTE)
        if ctx.layer.digest in self.native_layers:
            return native_job(ctx, self.opts, MULTI_MEMBER_NOTE)
        return TurboJob(ctx, self.opts)

    def needs_original(self, layer: SourceLayer) -> bool:
        return not self.has_original(layer)

    def ready_for_reuse(self, layer: SourceLayer) -> bool:
        return self.has_original(layer)

    def has_original(self, layer: SourceLayer) -> bool:
        """The original blob is (now) in the target repository: already there, or cross-mounted from the
        source repository of the same registry (turbooci §6.3). Otherwise the pipeline copies it."""
        if self.dst.blob_size(layer.digest) == layer.size:
            return True
        same_registry = (self.dst.same_registry_mounts and self.src.same_registry_mounts
                         and self.dst.cache_registry == self.src.cache_registry)
        if same_registry and self.dst.mount_blob(layer.digest, self.src.repository):
            with self._lock:
                self.originals_copied += 1
            return True
        return False

    def reused(self, layer: SourceLayer, hit: CachedLayer, work: Path) -> tuple[ConvertedLayer, Lower]:
        """Read the reused blob back (meta blobs are small): a turbo archive gives its diff_id (sha256 of the
        inner tar), its compression (a gzip index member or not) and its ext4.fs.meta for the rebuild; a
        native blob (a zstd layer) is itself the lower layer."""
        path = self.dst.fetch_blob(hit.digest, hit.size, str(work))
        with open(path, "rb") as f:
            if f.read(2) != GZIP_MAGIC:
                native = ConvertedLayer(hit.digest, hit.size)
                return ConvertedLayer(hit.digest, hit.size, layer_descriptor(native, self.opts.oci)), \
                    Lower(path, temporary=path == str(work))
        meta_path = f"{work}.meta"
        try:
            blob = read_turbo_blob(path)
            try:
                blob.meta.seek(0)
                with open(meta_path, "wb") as out:
                    shutil.copyfileobj(blob.meta, out, 1 << 20)
            finally:
                blob.close()
        except FormatError as exc:
            raise TurboLayerError(f"layer {layer.label}: reused blob {hit.digest} is not a usable turboOCIv1 "
                                  f"archive: {exc}") from exc
        finally:
            if path == str(work):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        compression = "gzip" if blob.gzip_index is not None else "none"
        descriptor = meta_descriptor(hit.digest, hit.size, layer, compression, self.opts.oci)
        return ConvertedLayer(hit.digest, hit.size, descriptor, blob.diff_id), Lower(meta_path, meta=True)
