"""Shared pieces of the format modules: the error type, the random-access view every reader stacks on, and the
commit-or-abort context of the blob writers."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Protocol, TypeVar

BytesLike = bytes | bytearray | memoryview

SECTOR = 512

_Writer = TypeVar("_Writer", bound="CommitOnExit")


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


class CommitOnExit:
    """Context manager of a blob writer: a clean exit commits (close()), an exception aborts (abort()).
    The writer sets `_done` once it is closed or aborted."""

    _done: bool

    def close(self) -> object:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.close()
