"""The indexing gzip decompressor (gzindex.GzipIndexer) run in a helper process: the turbo path's way
around the GIL.

Why a process: Z_BLOCK makes inflate return at every deflate block boundary, and after each return the
decompressing thread needs the GIL back. Next to a thread that runs Python all the time (the ext4 builder)
every such hand-off waits for the holder's switch interval: measured on a 244 MB ISA-L layer (809 block
boundaries), the indexer alone took 1.6 s, next to a busy Python thread 4.7 s. A child process has a GIL
of its own, and the parent sees one hand-off per CHUNK_BYTES of output, as with the ISA-L path.

How (the pattern of zworkers.py): a memfd shared by parent and child, cut into SLOTS output slots of
chunk_bytes. The child inflates straight into a free slot and answers with its length; the parent copies
the slot into an immutable `bytes` (the one copy of the data) and hands the slot back. The compressed
input is read by the child itself through the blob's file descriptor when it is a regular file (the
parent does nothing per input byte); any other stream is pumped into a pipe by a parent thread. At the
end the child sends gzip.meta; errors come back as their message and are raised by the parent's read().
The child is a plain `python -c` process that exits when its request pipe closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
from typing import BinaryIO

from .common import FormatError
from .gzindex import CHUNK_BYTES, GzipIndexer, MultiMemberError
from .zworkers import child_env, read_exact, write_all  # the same child start and pipe protocol helpers

SLOTS = 3
PIPE_BYTES = 1 << 20
PUMP_BYTES = 32 << 20  # pipe-mode input per read of the source stream

_REPLY = struct.Struct("<BIQ")  # status, slot, length (chunk bytes, or payload bytes that follow)
_CHUNK, _END, _ERROR, _MULTI = 0, 1, 2, 3
_SLOT = struct.Struct("<I")


# ----------------------------------------------------------------------------------------------------
# Child side


def child_main(memfd: int, chunk_bytes: int, slots: int, requests: int, replies: int, source: int,
               offset: int, name: str) -> None:
    """Inflate the blob from fd `source` (at `offset` with pread; -1: read it as a stream) into slots."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt means
    region = mmap.mmap(memfd, chunk_bytes * slots)
    anchor = ctypes.c_char.from_buffer(region)
    base = ctypes.addressof(anchor)
    position = offset

    def read_input(n: int) -> bytes:
        nonlocal position
        if position < 0:
            return os.read(source, n)
        data = os.pread(source, n, position)
        position += len(data)
        return data

    # the header CRC's library loads while the first output is inflated (see gzindex._crc32c_raw)
    threading.Thread(target=lambda: __import__("converter.formats.crc"), daemon=True).start()
    free = list(range(slots))
    indexer = GzipIndexer(read_input, name=name)
    try:
        while True:
            if not free:
                try:
                    free.append(_SLOT.unpack(read_exact(requests, _SLOT.size))[0])
                except EOFError:
                    return  # the parent stopped reading
            slot = free.pop()
            n = indexer.read_into(base + slot * chunk_bytes, chunk_bytes)
            if n:
                write_all(replies, _REPLY.pack(_CHUNK, slot, n))
                continue
            meta = indexer.index_file()
            write_all(replies, _REPLY.pack(_END, 0, len(meta)) + meta)
            return
    except MultiMemberError as exc:
        _report(replies, _MULTI, str(exc))
    except Exception as exc:  # raised by the parent's read()
        _report(replies, _ERROR, str(exc) if isinstance(exc, FormatError) else f"{type(exc).__name__}: {exc}")
    finally:
        indexer.close()
        del anchor
        with contextlib.suppress(BufferError):
            region.close()


def _report(fd: int, status: int, message: str) -> None:
    payload = message.encode()
    with contextlib.suppress(OSError):
        write_all(fd, _REPLY.pack(status, 0, len(payload)) + payload)


# ----------------------------------------------------------------------------------------------------
# Parent side


def _regular_fd(raw: BinaryIO) -> int | None:
    try:
        fd = raw.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None


class GzipIndexStream:
    """read() returns the decompressed gzip blob `raw` (from its current position) in chunks of up to
    `chunk_bytes`, b"" at the end; index_file() then returns its gzip.meta. Errors of the blob raise
    FormatError (MultiMemberError for data after the first member) naming `name`. close() stops the
    child; it does not close `raw`."""

    def __init__(self, raw: BinaryIO, *, name: str = "gzip layer", chunk_bytes: int = CHUNK_BYTES,
                 slots: int = SLOTS) -> None:
        self.name = name
        self._chunk = chunk_bytes
        self._index: bytes | None = None
        self._ended = False
        self._pump: threading.Thread | None = None
        self._pump_error: BaseException | None = None
        self._stop = threading.Event()
        memfd = os.memfd_create("obd-gzindex-slots", os.MFD_CLOEXEC)
        req_r, self._requests = os.pipe()
        self._replies, rep_w = os.pipe()
        fd = _regular_fd(raw)
        src_r = src_w = -1
        if fd is None:
            src_r, src_w = os.pipe()
            with contextlib.suppress(OSError):  # F_SETPIPE_SZ: up to /proc/sys/fs/pipe-max-size (1 MiB)
                fcntl.fcntl(src_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._region: mmap.mmap | None = None
        try:
            os.ftruncate(memfd, chunk_bytes * slots)
            self._region = mmap.mmap(memfd, chunk_bytes * slots)
            source, offset = (fd, raw.tell()) if fd is not None else (src_r, -1)
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from converter.formats.gzstream import child_main; "
                 "a = sys.argv[1:]; child_main(*map(int, a[:-1]), a[-1])",
                 str(memfd), str(chunk_bytes), str(slots), str(req_r), str(rep_w), str(source), str(offset), name],
                pass_fds=(memfd, req_r, rep_w, source), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                close_fds=True, env=child_env())
        except BaseException:
            for f in (self._requests, self._replies, src_w):
                if f >= 0:
                    os.close(f)
            if self._region is not None:
                self._region.close()
            raise
        finally:
            for f in (memfd, req_r, rep_w, src_r):
                if f >= 0:
                    os.close(f)
        self._view = memoryview(self._region)  # type: ignore[arg-type]
        if src_w >= 0:
            self._pump = threading.Thread(target=self._pump_input, args=(raw, src_w), name="obd-gzindex-pump",
                                          daemon=True)
            self._pump.start()

    def _pump_input(self, raw: BinaryIO, fd: int) -> None:
        try:
            while not self._stop.is_set():
                data = raw.read(PUMP_BYTES)
                if not data:
                    break
                write_all(fd, data)
        except BrokenPipeError:
            pass  # the child stopped (error or close); it reports why
        except BaseException as exc:
            self._pump_error = exc
        finally:
            os.close(fd)

    def read(self) -> bytes:
        if self._ended:
            return b""
        try:
            status, slot, n = _REPLY.unpack(read_exact(self._replies, _REPLY.size))
            if status == _CHUNK:
                start = slot * self._chunk
                chunk = bytes(self._view[start:start + n])
                # a child that has sent its last chunk exits without waiting for its slots: a closed pipe
                # here is normal; a child that really died shows as EOF on the next reply
                with contextlib.suppress(BrokenPipeError):
                    write_all(self._requests, _SLOT.pack(slot))
                return chunk
            payload = read_exact(self._replies, n)
        except EOFError:
            raise self._died() from None
        self._ended = True
        if status == _END:
            if self._pump_error is not None:
                raise self._pump_error
            self._index = payload
            return b""
        if self._pump_error is not None:  # the source failed: that is the real problem
            raise self._pump_error
        raise (MultiMemberError if status == _MULTI else FormatError)(payload.decode(errors="replace"))

    def _died(self) -> BaseException:
        self._ended = True
        if self._pump_error is not None:
            return self._pump_error
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        return FormatError(f"{self.name}: gzip index process {self._proc.pid} exited unexpectedly "
                           f"(exit status {code})")

    def index_file(self) -> bytes:
        if self._index is None:
            raise RuntimeError("GzipIndexStream.index_file() before the end of the gzip stream")
        return self._index

    def stop(self) -> None:
        """End the child (a thread blocked in read() then gets an error); safe to call more than once."""
        if self._requests < 0:
            return
        self._stop.set()
        os.close(self._requests)  # EOF: a child waiting for a slot returns
        self._requests = -1
        try:
            self._proc.wait(0 if not self._ended else 5)
        except subprocess.TimeoutExpired:
            self._proc.kill()  # still inflating: it would only notice the closed pipe at its next slot
            self._proc.wait()

    def close(self) -> None:
        """stop(), then release the pipes and the shared memory: no thread may be in read() any more."""
        if self._replies < 0:
            return
        self.stop()
        os.close(self._replies)
        self._replies = -1
        if self._pump is not None:
            self._pump.join()
        self._view.release()
        assert self._region is not None
        self._region.close()

    def __enter__(self) -> GzipIndexStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
