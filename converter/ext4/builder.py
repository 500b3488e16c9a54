"""The ext4 side of a conversion: one filesystem, built layer by layer.

    builder = ImageBuilder(vsize=64 << 30, fs_uuid=...)
    for layer in layers:
        with LayerBlobWriter(...) as sink:          # or any BlockSink
            builder.apply_layer(layer_stream, sink, label="2/5 sha256:…")

The first layer also carries the mkfs output. Each apply writes the layer's file data as it streams,
then exactly the metadata blocks that layer changed. After a failed apply the builder refuses further
work: the in-memory filesystem holds a half-applied layer.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

from .apply import LayerApplier, LayerApplyError, LayerStats, RemoteSink
from .fs import BlockSink, Filesystem
from .layerstream import LayerStream
from .load import Disk, load_filesystem

DEFAULT_VSIZE = 64 << 30


def derive_fs_ids(seed: bytes) -> tuple[bytes, bytes]:
    """A filesystem UUID and htree hash seed derived from image identity (e.g. the first chain ID)."""
    digest = hashlib.sha256(b"obd-autoconvert ext4 ids\0" + seed).digest()
    uuid = bytearray(digest[:16])
    uuid[6] = (uuid[6] & 0x0F) | 0x50  # RFC 4122 version 5 (name-based) layout
    uuid[8] = (uuid[8] & 0x3F) | 0x80
    return bytes(uuid), digest[16:32]


class ImageBuilder:
    def __init__(self, vsize: int = DEFAULT_VSIZE, *, fs_uuid: bytes = bytes(16), hash_seed: bytes = bytes(16)) -> None:
        self.vsize = vsize
        self._fs_uuid = fs_uuid
        self._hash_seed = hash_seed
        self.fs: Filesystem | None = None
        self.layers_applied = 0
        self._failed: str | None = None

    @classmethod
    def from_disk(cls, disk: Disk) -> ImageBuilder:
        """Continue an existing filesystem: lower layers converted before, or a mke2fs base layer.

        `disk` serves reads of the virtual disk (a StackedReader over the lower blobs, a RawDisk, ...).
        """
        fs = load_filesystem(disk)
        builder = cls(fs.geo.blocks_count * 4096, fs_uuid=fs.sb.s_uuid, hash_seed=fs.sb.s_hash_seed)
        builder.fs = fs
        return builder

    def apply_layer(self, stream: BinaryIO | LayerStream, sink: BlockSink | None, label: str | None = None, *,
                    turbo: RemoteSink | None = None) -> LayerStats:
        """Apply one layer. `sink` gets the native blocks (metadata and file data); `turbo`, a TurboOCI meta
        layer writer, gets the metadata and the tag-1 mappings of file data (TurboOCI §2.6). Give either or
        both: with both, one pass over the tar feeds both outputs (the block layout is the same)."""
        if self._failed is not None:
            raise RuntimeError(f"the filesystem is unusable after a failed layer: {self._failed}")
        label = label or str(self.layers_applied + 1)
        try:
            if self.fs is None:
                self.fs = Filesystem.mkfs(self.vsize, uuid=self._fs_uuid, hash_seed=self._hash_seed)
            self.fs.applying(True)
            try:
                stats = LayerApplier(self.fs, sink, label, turbo).apply(stream)
            finally:
                self.fs.applying(False)
        except LayerApplyError as exc:
            self._failed = str(exc)
            raise
        except Exception as exc:
            self._failed = str(exc)
            raise LayerApplyError(label, None, str(exc)) from exc
        self.layers_applied += 1
        return stats
