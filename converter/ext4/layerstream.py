"""The uncompressed tar of a layer blob, as large immutable chunks decompressed ahead by a helper thread.

    with LayerStream(blob, hash_content=True) as tar:      # gzip, zstd or plain: detected by magic bytes
        reader = TarReader(tar)                            # slices the chunks without copying them
        ...
        tar.drain()
        diff_id = "sha256:" + tar.hexdigest()

Turbo conversions ask for the gzip index of the layer in the same pass: `LayerStream(blob,
gzip_index=True)` decompresses gzip through formats/gzstream.py (zlib with Z_BLOCK in a helper process,
recording overlaybd's checkpoints) instead of ISA-L, and `gzip_index()` returns the gzip.meta bytes after
the end (None for a plain tar or zstd layer). A gzip blob with data after its first member then fails
(MultiMemberError): overlaybd's index covers only the first member.

Why not a file-like stream: every `read()` of a buffered stream copies, and the ext4 builder used to copy
each byte of a layer three times before it reached the compressor. Chunks are `bytes`, so the tar reader
hands out views of them and file data reaches the compression slots with a single copy.

Why big chunks: ISA-L and zstd release the GIL while they decompress, but the helper needs the GIL back
between calls, and while the builder runs Python each hand-off waits up to the interpreter's switch
interval (5 ms). With 1 MiB reads the helper spent more time waiting than inflating; CHUNK_BYTES reads
make the waits rare. Measured against a thread that never releases the GIL: 1 MiB reads took 5x as
long as alone, 8 MiB reads 1.6x, 16 MiB 1.15x; on the /usr layer 8 and 16 MiB convert equally fast,
and 8 MiB keeps ~60 MB less memory in flight. The sha256 of the content (the layer's diff_id) is
computed on the helper thread as well: hashlib releases the GIL for large buffers, so it costs the
builder nothing.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

from ..formats.gzstream import GzipIndexStream

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

CHUNK_BYTES = 8 << 20
QUEUE_CHUNKS = 2  # decompressed ahead of the reader, besides the one being filled


def _chunk_reader(raw: BinaryIO, chunk_bytes: int,
                  gzip_index: bool = False) -> tuple[str, Callable[[], bytes], GzipIndexStream | None]:
    """(compression name, a function returning the next piece of uncompressed data, b"" at the end, the
    indexing decompressor when a gzip index was asked for)."""
    buffered: BinaryIO = raw if hasattr(raw, "peek") else io.BufferedReader(raw, 1 << 20)  # type: ignore[arg-type]
    magic = buffered.peek(4)[:4]  # type: ignore[attr-defined]
    if magic.startswith(GZIP_MAGIC) and gzip_index:
        indexed = GzipIndexStream(buffered, chunk_bytes=chunk_bytes)
        return "gzip", indexed.read, indexed
    if magic.startswith(GZIP_MAGIC):
        from isal import igzip

        # The reader class behind isal's own threaded gzip reader: it takes the size of its compressed
        # input reads, which public IGzipFile fixes at 128 KiB (one GIL hand-off each).
        gz = igzip._IGzipReader(buffered, buffersize=max(chunk_bytes, 1 << 20))  # it must hold a gzip header
        return "gzip", lambda: gz.read(chunk_bytes), None
    if magic == ZSTD_MAGIC:
        import zstandard

        # zstd:chunked layers (podman's default) are many small frames: read across them into full chunks
        zst = zstandard.ZstdDecompressor().stream_reader(buffered, read_size=chunk_bytes, read_across_frames=True)
        return "zstd", lambda: zst.read(chunk_bytes), None
    return "none", lambda: buffered.read(chunk_bytes), None


class LayerStream:
    """Decompresses `raw` on a helper thread; `next_chunk()` returns the uncompressed data in order.

    An error of the decompressor or of `raw` is raised by the next_chunk() call that would have returned
    the data after it. close() stops the helper (it finishes the read it is in) and does not close `raw`.
    """

    def __init__(self, raw: BinaryIO, *, hash_content: bool = False, chunk_bytes: int = CHUNK_BYTES,
                 gzip_index: bool = False) -> None:
        self.compression, self._read, self._indexed = _chunk_reader(raw, chunk_bytes, gzip_index)
        self._hash = hashlib.sha256() if hash_content else None
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._ended = False
        self.count = 0  # uncompressed bytes handed out so far
        self._thread = threading.Thread(target=self._produce, name="obd-layer-decompress", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        item: bytes | BaseException
        try:
            while not self._stop.is_set():
                item = self._read()
                if self._hash is not None and item:
                    self._hash.update(item)
                if not self._put(item) or not item:
                    return
        except BaseException as exc:  # raised in the reading thread by next_chunk()
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def next_chunk(self) -> bytes:
        """The next piece of uncompressed data (any size), b"" once the end is reached."""
        if self._ended:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if not item:
            self._ended = True
        self.count += len(item)
        return item

    def drain(self) -> None:
        """Read to the end (the tar reader stops at the end-of-archive blocks; padding may follow)."""
        while self.next_chunk():
            pass

    def hexdigest(self) -> str:
        """sha256 of the whole uncompressed content; call after the end was reached."""
        if self._hash is None:
            raise RuntimeError("LayerStream was created without hash_content")
        if not self._ended:
            raise RuntimeError("LayerStream.hexdigest() before the end of the content")
        self._thread.join()
        return self._hash.hexdigest()

    def gzip_index(self) -> bytes | None:
        """The gzip.meta of a gzip layer read with `gzip_index=True` (turbooci §3), None for a plain tar or
        zstd layer or without gzip_index; call after the end was reached."""
        if self._indexed is None:
            return None
        if not self._ended:
            raise RuntimeError("LayerStream.gzip_index() before the end of the content")
        self._thread.join()
        return self._indexed.index_file()

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a helper waiting to put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._indexed is not None:
            self._indexed.stop()  # a helper waiting for the child's next chunk gets an error and ends
        self._thread.join()
        if self._indexed is not None:
            self._indexed.close()

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
