"""ZFile block compression in worker processes: the ZFile writer's way around the GIL.

Why processes and not threads: lz4 and crc32c release the GIL for each 4 KiB block, so a compression
thread needs the GIL back once per block. Next to a thread that runs Python all the time (the ext4
builder), every one of those hand-offs waits for the holder's switch interval, and compression threads
crawl while burning CPU in the hand-offs (measured on the /usr layer from a plain tar: 14.9 s with
threads, 9.0 s with these workers; two threads compressing alone are already slower than one). A worker
process has a GIL of its own.

How: one shared-memory region (a memfd mapped by the parent and every worker) cut into slots; a slot
holds one input batch and room for its compressed output. The parent copies a batch into a free slot
and sends the worker a small request over a pipe; the worker compresses it block by block with
`compress_batch_into` (the thread path's `compress_batch`, writing straight into the slot: the same
compressor calls, so both produce the same bytes) and answers with the stored lengths. There are no
helper threads in the parent: the writer collects answers in submission order when it needs a slot or
finishes. Workers are plain `python -c` children running `worker_main`, started once per process and
leased to one writer at a time; they exit when their request pipe closes, so a dying parent cannot
leave them behind, and the memfd has no name that could leak.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
from array import array
from collections import deque

from .common import FormatError

log = logging.getLogger("converter.formats.zworkers")

BATCH_BYTES = 1 << 20  # input per request: 256 blocks of 4 KiB amortise the per-request overhead
# Output room per slot: LZ4 may grow a block by size/255 + 16 bytes, zstd by size/256 + ~80; plus the CRC.
OUTPUT_BYTES = BATCH_BYTES + (BATCH_BYTES // 4096) * 128 + 4096
SLOT_BYTES = BATCH_BYTES + OUTPUT_BYTES
SLOTS_PER_WORKER = 3

_REQUEST = struct.Struct("<QIQIIB")  # input offset, input length, output offset, block size, algo, verify
_REPLY = struct.Struct("<BI")  # status (0 ok, 1 error), payload length; payload: lengths or a message
_OK, _ERROR = 0, 1


def read_exact(fd: int, n: int) -> bytes:
    """Exactly `n` bytes from pipe `fd` (EOFError if it closes first)."""
    parts = []
    while n:
        part = os.read(fd, n)
        if not part:
            raise EOFError
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """All of `data` to pipe `fd`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ----------------------------------------------------------------------------------------------------
# Worker side


def worker_main(memfd: int, size: int, requests: int, replies: int) -> None:
    from .zfile import compress_batch_into  # the worker imports the format code only once it runs

    # Ctrl-C reaches the whole process group: the parent decides what happens (it aborts the blob and
    # closes the pipes, which ends the workers); a worker dying on its own would only add a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    region = mmap.mmap(memfd, size)
    try:
        while True:
            try:
                request = read_exact(requests, _REQUEST.size)
            except EOFError:
                return  # the parent closed the pipe (finished, or died)
            in_off, n, out_off, block_size, algo, verify = _REQUEST.unpack(request)
            try:
                lengths = compress_batch_into(region, in_off, n, out_off, out_off + OUTPUT_BYTES, block_size, algo,
                                              bool(verify))
                payload, status = lengths.tobytes(), _OK
            except Exception as exc:  # reported to the writer, which raises it
                payload, status = f"{type(exc).__name__}: {exc}".encode(), _ERROR
            write_all(replies, _REPLY.pack(status, len(payload)) + payload)
    finally:
        with contextlib.suppress(BufferError):  # a view of a failed batch may still be referenced
            region.close()


# ----------------------------------------------------------------------------------------------------
# Parent side


class _Worker:
    def __init__(self, memfd: int, size: int) -> None:
        req_r, self.requests = os.pipe()
        self.replies, rep_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from converter.formats.zworkers import worker_main; "
                 "worker_main(*map(int, sys.argv[1:]))", str(memfd), str(size), str(req_r), str(rep_w)],
                pass_fds=(memfd, req_r, rep_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                close_fds=True, env=child_env())
        except BaseException:
            os.close(self.requests)
            os.close(self.replies)
            raise
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.outstanding = 0

    def died(self) -> FormatError:
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        return FormatError(f"ZFile compression worker {self.proc.pid} exited unexpectedly (exit status {code})")

    def close(self) -> None:
        os.close(self.requests)  # EOF: the worker returns
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.replies)


def child_env() -> dict[str, str]:
    """The parent's environment, with the directory `converter` is imported from on PYTHONPATH (so a
    checkout that is not installed works too)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join([root, path])}


class CompressWorkers:
    """`count` worker processes sharing one region of `count` x SLOTS_PER_WORKER slots."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.slots = count * SLOTS_PER_WORKER
        self.size = self.slots * SLOT_BYTES
        memfd = os.memfd_create("obd-zfile-slots", os.MFD_CLOEXEC)
        self._workers: list[_Worker] = []
        try:
            os.ftruncate(memfd, self.size)
            self.region = mmap.mmap(memfd, self.size)
            for _ in range(count):
                self._workers.append(_Worker(memfd, self.size))
        except BaseException:
            for worker in self._workers:
                worker.close()
            raise
        finally:
            os.close(memfd)  # the mapping and the workers keep the memory
        self.view = memoryview(self.region)
        self._free = list(range(self.slots))
        self._order: deque[tuple[int, _Worker]] = deque()

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(w.proc.poll() is None for w in self._workers)

    @property
    def pending(self) -> int:
        return len(self._order)

    def submit(self, pieces: list[memoryview], block_size: int, algo: int, verify: bool) -> None:
        """Start compressing the concatenation of `pieces` (at most BATCH_BYTES in all): they are copied
        into a free slot, the only copy of the data on its way to the workers. The caller must collect()
        first when no slot is free (`full`)."""
        slot = self._free.pop()
        base = pos = slot * SLOT_BYTES
        view = self.view
        for piece in pieces:
            end = pos + len(piece)
            view[pos:end] = piece
            pos = end
        length = pos - base
        worker = min(self._workers, key=lambda w: w.outstanding)  # the least busy: batches differ in cost
        try:
            write_all(worker.requests, _REQUEST.pack(base, length, base + BATCH_BYTES, block_size, algo,
                                                      int(verify)))
        except BrokenPipeError:
            raise worker.died() from None
        worker.outstanding += 1
        self._order.append((slot, worker))

    @property
    def full(self) -> bool:
        return not self._free

    def collect(self) -> tuple[memoryview, array]:
        """Wait for the oldest request: (its compressed payloads, as one view into the slot; stored
        lengths). The view is valid until the next submit()."""
        slot, worker = self._order.popleft()
        try:
            status, length = _REPLY.unpack(read_exact(worker.replies, _REPLY.size))
            payload = read_exact(worker.replies, length)
        except EOFError:
            raise worker.died() from None
        worker.outstanding -= 1
        self._free.append(slot)
        if status != _OK:
            raise FormatError(f"ZFile compression worker failed: {payload.decode(errors='replace')}")
        lengths = array("I")
        lengths.frombytes(payload)
        start = slot * SLOT_BYTES + BATCH_BYTES
        return self.view[start:start + sum(lengths)], lengths

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []
        self.view.release()
        self.region.close()


# One set of workers per process, lent to one writer at a time (a second concurrent writer, e.g. another
# platform of a multi-arch image, uses threads). Started on first use, kept for the next layers.
_lease = threading.Lock()
_shared: CompressWorkers | None = None


def lease(count: int) -> CompressWorkers | None:
    """The process's workers (started now if needed) for the caller's exclusive use, or None if another
    writer holds them. Give them back with release()."""
    global _shared
    if not _lease.acquire(blocking=False):
        return None
    try:
        if _shared is not None and (_shared.count != count or not _shared.alive):
            _shared.close()
            _shared = None
        if _shared is None:
            _shared = CompressWorkers(count)
        return _shared
    except OSError as exc:  # e.g. a process limit: threads still work, only slower
        log.warning("cannot start ZFile compression workers, compressing in threads: %s", exc)
        _lease.release()
        return None
    except BaseException:
        _lease.release()
        raise


def release(workers: CompressWorkers, *, broken: bool = False) -> None:
    """Return leased workers. `broken`: requests may still be in flight (an aborted writer), so the
    workers are stopped instead of reused."""
    global _shared
    if broken or workers.pending:
        workers.close()
        if _shared is workers:
            _shared = None
    _lease.release()


@atexit.register
def _shutdown() -> None:
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None
