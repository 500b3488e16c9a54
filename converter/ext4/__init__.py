"""Native ext4 filesystem builder: mkfs and OCI layer apply, writing only the blocks each layer changes."""

from .apply import LayerApplyError, LayerStats, RemoteSink
from .builder import DEFAULT_VSIZE, ImageBuilder, derive_fs_ids
from .fs import BlockSink, Ext4Error, Filesystem, FilesystemFullError
from .load import load_filesystem
from .rawdisk import RawDisk

__all__ = [
    "DEFAULT_VSIZE",
    "BlockSink",
    "Ext4Error",
    "Filesystem",
    "FilesystemFullError",
    "ImageBuilder",
    "LayerApplyError",
    "LayerStats",
    "RawDisk",
    "RemoteSink",
    "derive_fs_ids",
    "load_filesystem",
]
