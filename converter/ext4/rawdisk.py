"""A block sink that writes straight into a sparse raw disk image (for debugging, tests and dumps)."""

from __future__ import annotations

import os
from types import TracebackType


class RawDisk:
    """Sparse file of the virtual disk size; blocks land at their own offsets."""

    def __init__(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        """Create (truncate to `size`) a new image, or open an existing one when size is None."""
        self.path = os.fspath(path)
        if size is None:
            self._fd = os.open(self.path, os.O_RDWR)
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, size)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
