"""The native overlaybd output: every layer a full LSMT/ZFile blob (overlaybd-format.md §3, §8)."""

from __future__ import annotations

from pathlib import Path

from ..cache import CachedLayer
from ..ext4.layerstream import LayerStream
from ..formats.layer import LayerBlobWriter
from ..image import OBD_ARTIFACT_TYPE, ConvertedLayer, SourceLayer
from ..options import ConvertOptions
from . import LayerBlob, LayerContext, LayerJob, Lower, Output, Upload


class NativeJob(LayerJob):
    """One layer as a native blob: metadata and file data written by the builder."""

    def __init__(self, ctx: LayerContext, opts: ConvertOptions, *, note: str = "") -> None:
        self.writer = LayerBlobWriter(f"{ctx.work}.obd", virtual_size=ctx.vsize, uuid=ctx.layer.uuid,
                                      parent_uuid=ctx.parent_uuid, algorithm=opts.algorithm,
                                      block_size=opts.block_size)
        self.native = self.writer
        self.note = note

    def finish(self, tar: LayerStream) -> LayerBlob:
        info = self.writer.close()
        return LayerBlob(ConvertedLayer(info.digest, info.size), [Upload(info.path, info.digest, info.size)],
                         "native", self.note)

    def abort(self) -> None:
        self.writer.abort()


def native_job(ctx: LayerContext, opts: ConvertOptions, note: str = "") -> NativeJob:
    return NativeJob(ctx, opts, note=note)


class NativeOutput(Output):
    kind = "overlaybd"
    artifact_type = OBD_ARTIFACT_TYPE

    def start_layer(self, ctx: LayerContext) -> LayerJob:
        return NativeJob(ctx, self.opts)

    def reused(self, layer: SourceLayer, hit: CachedLayer, work: Path) -> tuple[ConvertedLayer, Lower]:
        path = self.dst.fetch_blob(hit.digest, hit.size, str(work))
        return ConvertedLayer(hit.digest, hit.size), Lower(path, temporary=path == str(work))
