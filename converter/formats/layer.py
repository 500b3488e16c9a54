"""The one-pass layer pipeline: blocks in -> LSMT -> ZFile -> tar -> file, with sha256 and size of the blob.

Everything is streamed: LSMT data goes out in arrival order, compressed by the ZFile writer's thread pool
while the caller keeps producing blocks. The few fields only known at the end (ZFile header info, PAX size
record) are placeholders patched in place at close; the sha256 then needs one read of the finished blob,
because SHA-256 cannot be resumed once its first block changes (see docs/formats.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
from dataclasses import dataclass

from .common import BytesLike, CommitOnExit, FormatError
from .lsmt import HT_SPACE, LsmtWriter
from .stack import open_layer
from .tarwrap import WRAPPERS, tar_suffix
from .zfile import DEFAULT_BLOCK_SIZE, ZFileWriter

WRAPPER_CHOICES = ("pax", "ustar", "none")
HASH_WINDOW = 32 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


@dataclass(frozen=True)
class BlobInfo:
    path: str
    digest: str  # "sha256:<hex>"
    size: int  # bytes of the final blob (tar-wrapped zfile)
    lsmt_size: int
    data_bytes: int  # bytes in the LSMT data section, rewritten (dead) data included
    index_entries: int  # real LSMT index entries, padding excluded


def sha256_file(fd: int) -> str:
    """sha256 of a whole file, hashed straight from the page cache through HASH_WINDOW-sized mmaps: no
    copy into a Python buffer, and at most one window counted into RSS (one mmap of the whole blob would
    count all of it). hashlib releases the GIL and uses SHA-NI through OpenSSL."""
    h = hashlib.sha256()
    size = os.fstat(fd).st_size
    for offset in range(0, size, HASH_WINDOW):
        with mmap.mmap(fd, min(HASH_WINDOW, size - offset), access=mmap.ACCESS_READ, offset=offset) as window:
            window.madvise(mmap.MADV_SEQUENTIAL)
            h.update(window)
    return "sha256:" + h.hexdigest()


class _FullWriteFile(io.FileIO):
    """An unbuffered file whose write() never stops short (a raw write may write less than asked)."""

    def write(self, data: BytesLike) -> int:  # type: ignore[override]
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += super().write(mv[done:]) or 0
        return done


class LayerBlobWriter(CommitOnExit):
    """Writes one overlaybd layer blob (reference §6 steps 2-4) to `path`.

    write()/zero() take byte offsets and lengths that are multiples of 512; later writes win. close()
    finishes the blob and returns its BlobInfo; abort() (or leaving a `with` block by an exception) removes
    the partial file. `compress=False` leaves out the ZFile stage; `wrapper` is "pax" (overlaybd-commit -t),
    "ustar" (Go archive/tar form) or "none".
    """

    def __init__(self, path: str | os.PathLike[str], *, virtual_size: int, uuid: str | None = None,
                 parent_uuid: str | None = None, user_tag: bytes = b"", algorithm: str = "lz4",
                 block_size: int = DEFAULT_BLOCK_SIZE, workers: int | None = None, compress: bool = True,
                 wrapper: str = "pax") -> None:
        if wrapper not in WRAPPER_CHOICES:
            raise FormatError(f"unknown tar wrapper {wrapper!r}; choose one of {WRAPPER_CHOICES}")
        self.path = os.fspath(path)
        self._wrapper = wrapper
        self._zfile: ZFileWriter | None = None
        self._done = False
        self.info: BlobInfo | None = None  # set by close()
        # unbuffered: the ZFile writer passes whole compressed batches to os.writev. An existing file is
        # replaced, not truncated: ext4 flushes a truncated-and-rewritten file on close (auto_da_alloc),
        # which cost 0.2 s per GiB of blob here.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._file = _FullWriteFile(self.path, "x+")
        try:
            self._data_offset = WRAPPERS[wrapper][0] if wrapper != "none" else 0
            self._file.write(bytes(self._data_offset))  # tar headers: patched at close
            if compress:
                self._zfile = ZFileWriter(self._file, block_size=block_size, algorithm=algorithm,
                                          workers=workers)
            sink = self._zfile.write if self._zfile else self._file.write
            self._lsmt = LsmtWriter(sink, virtual_size=virtual_size, uuid=uuid, parent_uuid=parent_uuid,
                                    user_tag=user_tag)
        except BaseException:
            self.abort()
            raise

    def write(self, offset: int, data: BytesLike) -> None:
        self._lsmt.write(offset, data)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the blob in its file so far (output still being compressed not included)."""
        return self._file.tell()

    def zero(self, offset: int, length: int) -> None:
        self._lsmt.zero(offset, length)

    def close(self) -> BlobInfo:
        if self._done:
            raise FormatError(f"{self.path}: layer blob writer already finished")
        try:
            stats = self._lsmt.close()
            if self._zfile is not None:
                self._zfile.close()
            payload = self._file.tell() - self._data_offset
            if self._wrapper != "none":
                self._file.write(tar_suffix(payload))
                self._file.seek(0)
                self._file.write(WRAPPERS[self._wrapper][1](payload))
            self._file.flush()
            size = os.fstat(self._file.fileno()).st_size
            digest = sha256_file(self._file.fileno())
            self._file.close()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.info = BlobInfo(path=self.path, digest=digest, size=size, lsmt_size=stats.lsmt_size,
                             data_bytes=stats.data_bytes, index_entries=stats.index_entries)
        return self.info

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._zfile is not None:
            self._zfile.abort()
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def wrap_blob(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, wrapper: str = "ustar") -> BlobInfo:
    """Validate an existing layer (e.g. the official ext4_64 base layer, a bare ZFile) and write it to `dst`
    inside a tar wrapper, as the convertor's uploadBaseLayer does (§3.2, plain ustar by default).

    The payload size is known up front here, so the prefix is final and the copy is hashed on the fly:
    one read of the source, one write, no second pass."""
    if wrapper not in ("pax", "ustar"):
        raise FormatError(f"wrap_blob needs a tar wrapper ('pax' or 'ustar'), not {wrapper!r}")
    with open_layer(src) as layer:
        if layer.wrapper is not None and layer.wrapper.form != "none":
            raise FormatError(f"{os.fspath(src)}: already tar-wrapped ({layer.wrapper.form})")
        stats = (layer.size, layer.trailer.index_offset - HT_SPACE, len(layer))
    dst_path = os.fspath(dst)
    h = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fin, _FullWriteFile(dst_path, "w") as fout:
            payload = os.fstat(fin.fileno()).st_size
            for piece in (WRAPPERS[wrapper][1](payload), *iter(lambda: fin.read(HASH_WINDOW), b""),
                          tar_suffix(payload)):
                h.update(piece)
                fout.write(piece)
                size += len(piece)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst_path)
        raise
    return BlobInfo(path=dst_path, digest="sha256:" + h.hexdigest(), size=size, lsmt_size=stats[0],
                    data_bytes=stats[1], index_entries=stats[2])
