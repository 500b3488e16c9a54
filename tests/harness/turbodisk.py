"""A reference model of how overlaybd reads a TurboOCI stack, as a block sink for the ext4 builder.

`TurboRawDisk` is a raw disk image that takes one layer's metadata writes (tag 0) and tag-1 mappings in
call order, copying each mapped range from the layer's uncompressed tar. Layers applied one after the
other onto the same image give what overlaybd's stack gives: per sector, the topmost layer that wrote or
mapped it wins, and unmapped sectors keep what the lower layers left (TurboOCI §2.5). It checks the
rules a real reader depends on: 512-aligned offsets, mappings inside the tar.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import zstandard

from converter.ext4 import RawDisk

SECTOR = 512


def uncompressed(layer: bytes) -> bytes:
    """The layer's tar (gzip, zstd or plain)."""
    if layer[:2] == b"\x1f\x8b":
        return gzip.decompress(layer)
    if layer[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(layer)).read()
    return layer


class TurboRawDisk(RawDisk):
    """The stacked disk of a turbo image, built layer by layer; `layer_tar` is the current layer's tar."""

    def __init__(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        super().__init__(path, size)
        self.tar = b""
        self.mappings: list[tuple[int, int, int]] = []  # this layer's (disk offset, length, tar offset)
        self.meta_writes = 0

    def start_layer(self, layer: bytes) -> None:
        self.tar = uncompressed(layer)
        self.mappings = []
        self.meta_writes = 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert offset % SECTOR == 0 and len(data) % SECTOR == 0, (offset, len(data))
        self.meta_writes += 1
        super().write(offset, data)

    def map_remote(self, offset: int, length: int, tar_offset: int) -> None:
        assert offset % SECTOR == 0 and tar_offset % SECTOR == 0 and length > 0, (offset, length, tar_offset)
        sectors = -(-length // SECTOR) * SECTOR
        assert tar_offset + sectors <= len(self.tar), f"tag-1 range past the tar: {tar_offset}+{sectors}"
        self.mappings.append((offset, length, tar_offset))
        super().write(offset, self.tar[tar_offset : tar_offset + sectors])


def apply_turbo(builder: object, disk: TurboRawDisk, layer: bytes, label: str) -> None:
    disk.start_layer(layer)
    builder.apply_layer(io.BytesIO(layer), None, label=label, turbo=disk)  # type: ignore[attr-defined]


def sectors_of(path: Path) -> int:
    return os.stat(path).st_size // SECTOR
