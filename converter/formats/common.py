"""Shared pieces of the format modules: the error type and the random-access view every reader stacks on."""

from __future__ import annotations

import os
from typing import Protocol

BytesLike = bytes | bytearray | memoryview

SECTOR = 512


class FormatError(ValueError):
    """A blob (or a write request) violates the overlaybd on-disk format.

    The message always names the blob and the structure at fault (tar header, ZFile header/trailer/block,
    LSMT header/trailer/index entry), so a failed conversion or inspection says exactly what is wrong.
    """


class RandomAccess(Protocol):
    """What each reader layer offers to the one above: a named, sized, randomly readable byte range."""

    name: str
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class FileView:
    """A window [base, base+size) of a file, read with os.pread (thread-safe, no shared file position)."""

    def __init__(self, path: str | os.PathLike[str], base: int = 0, size: int | None = None,
                 *, fd: int | None = None, name: str | None = None) -> None:
        self.name = name if name is not None else os.fspath(path)
        self._owns_fd = fd is None
        self.fd = os.open(path, os.O_RDONLY) if fd is None else fd
        self.base = base
        self.size = os.fstat(self.fd).st_size - base if size is None else size

    def sub(self, base: int, size: int) -> FileView:
        """A narrower window over the same descriptor (the caller keeps this view open)."""
        return FileView(self.name, self.base + base, size, fd=self.fd, name=self.name)

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(f"{self.name}: read of {length} bytes at {offset} is outside the "
                              f"{self.size}-byte blob (truncated?)")
        data = os.pread(self.fd, length, self.base + offset)
        if len(data) != length:
            raise FormatError(f"{self.name}: short read at {offset}: wanted {length} bytes, "
                              f"got {len(data)} (file truncated?)")
        return data

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
