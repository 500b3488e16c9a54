"""ZFile (reference §2): block-compressed container, parallel streaming writer and random-access reader.

Layout: header (512 B) | block payloads, each followed by a 4-byte raw CRC32C when verify = 1 |
jump table (u32 stored length per block, CRC included) | trailer (512 B). Blocks are raw LZ4 blocks (no
frame, no size prefix) or zstd frames; there is no "stored" escape.
"""

from __future__ import annotations

import functools
import io
import os
import queue
import struct
import sys
import threading
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import BinaryIO

import crc32c as _crc32c
import lz4.block
import zstandard

from . import zworkers
from .common import BytesLike, FormatError, RandomAccess
from .crc import ZFILE_BLOCK_CRC_SEED, crc32c_raw

ZF_MAGIC0 = b"ZFile\x00\x01\x00"
ZF_MAGIC1 = b"tuji.yyf@Alibaba"
ZF_HT_SPACE = 512  # header and trailer each occupy 512 bytes
ZF_HEADER_STRUCT_SIZE = 96  # the `size` field

FLAG_SHIFT_HEADER = 0  # 1 = header, 0 = trailer
FLAG_SHIFT_TYPE = 1  # 1 = data file
FLAG_SHIFT_SEALED = 2
FLAG_SHIFT_HEADER_OVERWRITE = 3  # the header holds the final index info; readers skip the trailer
FLAG_SHIFT_CALC_DIGEST = 4  # the digest (and index_crc) fields are valid
FLAG_SHIFT_IDX_COMP = 5  # never set by the builder, ignored by the reader

HEADER_FLAGS_FINAL = 0x1B  # header, data, overwrite, digest (what `overlaybd-commit -z` leaves)
TRAILER_FLAGS_FINAL = 0x16  # data, sealed, digest

ALGO_LZ4 = 1
ALGO_ZSTD = 2
ALGORITHMS = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
ZSTD_LEVEL = 3  # what ZSTD_compress is called with
DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 65536
MAX_READ_BLOCK = 65536  # the reader decompresses from a 64 KiB buffer: no stored block may be larger
JUMP_GROUP_BYTES = 65536  # jump table groups cover 64 KiB of input with u16 deltas
MAX_GROUP_DELTA = 65535
MAX_ZFILE_INDEX_SIZE = 1_000_000_000
CRC_SIZE = 4
BATCH_BYTES = zworkers.BATCH_BYTES  # input per compression task (threads or worker processes)
# Input after which a writer moves compression from threads to worker processes (zworkers.py): small
# blobs do not pay for starting the workers, large ones stop fighting the caller for the GIL.
PROCESS_THRESHOLD = 16 << 20
READ_BATCH_BLOCKS = 256  # blocks per decompression task in large reads

_HT = struct.Struct("<8s16sIIQQQQIIIBBBBIIB7x")
assert _HT.size == ZF_HEADER_STRUCT_SIZE
_DIGEST_OFFSET = 28
_U32 = struct.Struct("<I")
_MASK = 0xFFFFFFFF
_BLOCK_SEED_IN = ~ZFILE_BLOCK_CRC_SEED & _MASK  # crc32c_raw inlined in the hot loops (see crc.py)
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"  # array("I") is native-endian, the jump table is LE
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


@dataclass(frozen=True)
class ZFileHeaderTrailer:
    """The 96-byte HeaderTrailer (§2.2) in a 512-byte block."""

    flags: int
    index_offset: int = 0  # bytes
    index_size: int = 0  # number of blocks
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    algo: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: int = 1
    digest: int = 0
    size: int = ZF_HEADER_STRUCT_SIZE
    reserved: int = 0
    padding: int = 0
    reserved2: int = 0
    magic0: bytes = ZF_MAGIC0
    magic1: bytes = ZF_MAGIC1

    def has(self, shift: int) -> bool:
        return bool(self.flags >> shift & 1)

    def _raw(self, digest: int) -> bytes:
        return _HT.pack(self.magic0, self.magic1, self.size, digest, self.flags, self.index_offset,
                        self.index_size, self.original_file_size, self.index_crc, self.reserved,
                        self.block_size, self.algo, self.level, self.use_dict, self.padding, self.reserved2,
                        self.dict_size, self.verify).ljust(ZF_HT_SPACE, b"\0")

    def pack(self) -> bytes:
        """The 512-byte block; with the digest flag set the digest is computed over it (digest field 0)."""
        if not self.has(FLAG_SHIFT_CALC_DIGEST):
            return self._raw(self.digest)
        return self._raw(crc32c_raw(self._raw(0)))

    @classmethod
    def unpack(cls, raw: BytesLike) -> ZFileHeaderTrailer:
        (magic0, magic1, size, digest, flags, index_offset, index_size, original_file_size, index_crc,
         reserved, block_size, algo, level, use_dict, padding, reserved2, dict_size,
         verify) = _HT.unpack_from(raw)
        return cls(flags=flags, index_offset=index_offset, index_size=index_size,
                   original_file_size=original_file_size, index_crc=index_crc, block_size=block_size,
                   algo=algo, level=level, use_dict=use_dict, dict_size=dict_size, verify=verify,
                   digest=digest, size=size, reserved=reserved, padding=padding, reserved2=reserved2,
                   magic0=magic0, magic1=magic1)


def compute_digest(raw512: BytesLike) -> int:
    """The digest a 512-byte header/trailer block should carry: raw CRC32C with the digest field zeroed."""
    block = bytearray(raw512[:ZF_HT_SPACE])
    block[_DIGEST_OFFSET:_DIGEST_OFFSET + 4] = bytes(4)
    return crc32c_raw(block)


def is_zfile(raw: BytesLike) -> bool:
    """What overlaybd's is_zfile tests first: both magics and the header bit."""
    if len(raw) < ZF_HEADER_STRUCT_SIZE:
        return False
    ht = ZFileHeaderTrailer.unpack(raw)
    return ht.magic0 == ZF_MAGIC0 and ht.magic1 == ZF_MAGIC1 and ht.has(FLAG_SHIFT_HEADER)


def check_jump_lengths(lengths: array, first_block: int, block_size: int, verify: bool, where: str) -> None:
    """The reader's constraints on stored block lengths (§2.6.4/5); `lengths` starts at a group boundary."""
    floor = CRC_SIZE if verify else 0
    group = JUMP_GROUP_BYTES // block_size
    if not lengths:
        return
    longest = max(lengths)
    if floor < min(lengths) and longest <= MAX_READ_BLOCK:
        if group <= 1 or longest * (group - 1) < MAX_GROUP_DELTA:
            return  # no group can reach the u16 limit: always so for LZ4/zstd output of 4 KiB blocks
        import numpy as np  # here, not at the top: worker processes import this module, and most calls end above

        table = np.frombuffer(lengths, dtype=np.uint32)
        # u16 deltas: the stored lengths of the first group-1 blocks of every group sum to < 65535
        padded = np.zeros(-(-len(table) // group) * group, dtype=np.uint64)
        padded[:len(table)] = table
        if int(padded.reshape(-1, group)[:, :-1].sum(axis=1).max()) < MAX_GROUP_DELTA:
            return
    # something is wrong: find the first offender, for the message
    for i, n in enumerate(lengths):
        if n <= floor or n > MAX_READ_BLOCK:
            raise FormatError(f"{where}: block {first_block + i} has stored length {n}; overlaybd needs "
                              f"{floor} < length <= {MAX_READ_BLOCK}")
    if group > 1:
        for g in range(0, len(lengths), group):
            total = sum(lengths[g:g + group - 1])
            if total >= MAX_GROUP_DELTA:
                raise FormatError(f"{where}: blocks {first_block + g}..{first_block + g + group - 2} store "
                                  f"{total} bytes; the jump table's u16 deltas need < {MAX_GROUP_DELTA}")


# ----------------------------------------------------------------------------------------------------------
# Writer

_zstd_local = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_zstd_local, "comp", None)
    if comp is None:  # (de)compressor objects are not thread-safe: one per thread
        comp = _zstd_local.comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return comp


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_zstd_local, "dec", None)
    if dec is None:
        dec = _zstd_local.dec = zstandard.ZstdDecompressor()
    return dec


def compress_batch(chunk: BytesLike, block_size: int, algo: int, verify: bool) -> tuple[list[bytes], array]:
    """Compress `chunk` block by block: (payloads, each followed by its CRC, in order; stored lengths).

    Runs on worker threads; the compressors and crc32c release the GIL while they work. The parts are
    not joined here: the writer hands them to one writev, saving a copy of the whole output."""
    mv = memoryview(chunk)
    parts: list[bytes] = []
    lengths = array("I")
    crc = _crc32c.crc32c
    pack = _U32.pack
    compress = _zstd_compressor().compress if algo == ALGO_ZSTD else _LZ4_BLOCK
    for i in range(0, len(mv), block_size):
        c = compress(mv[i:i + block_size])
        parts.append(c)
        if verify:
            parts.append(pack(crc(c, _BLOCK_SEED_IN) ^ _MASK))
        lengths.append(len(c) + CRC_SIZE * verify)
    return parts, lengths


def compress_batch_into(region: BytesLike, in_off: int, n: int, out_off: int, limit: int, block_size: int,
                        algo: int, verify: bool) -> array:
    """compress_batch for the worker processes: compresses region[in_off:in_off + n] block by block and
    writes the payloads (each followed by its CRC) into region from out_off on, never past `limit`;
    returns the stored lengths. Same compressor calls, so the same bytes as compress_batch, without
    building a list of parts that would then be copied into the region one by one."""
    view = memoryview(region)
    lengths = array("I")
    crc = _crc32c.crc32c
    put_u32 = _U32.pack_into
    compress = _zstd_compressor().compress if algo == ALGO_ZSTD else _LZ4_BLOCK
    pos = out_off
    tail = CRC_SIZE if verify else 0
    for i in range(in_off, in_off + n, block_size):
        c = compress(view[i:min(i + block_size, in_off + n)])
        end = pos + len(c)
        if end + tail > limit:
            raise FormatError(f"compressed batch exceeds its output room of {limit - out_off} bytes")
        view[pos:end] = c
        if verify:
            put_u32(view, end, crc(c, _BLOCK_SEED_IN) ^ _MASK)
        pos = end + tail
        lengths.append(len(c) + tail)
    return lengths


# LZ4_compress_default output: a raw block, no frame, no size prefix (§2.5); partial keeps the call in C
_LZ4_BLOCK = functools.partial(lz4.block.compress, store_size=False)


@dataclass(frozen=True)
class ZFileStats:
    zfile_size: int
    blocks: int
    original_size: int


class ZFileWriter:
    """Compresses a byte stream into a ZFile written to the seekable `out`, starting at its position.

    Input is cut into BATCH_BYTES tasks. The first PROCESS_THRESHOLD bytes are compressed by a thread
    pool (at most 2 x workers tasks in flight, written in submission order by a writer thread); after
    that, by `workers` worker processes (zworkers.py) if this process's workers are free, else still by
    threads. `processes`: None = that automatic switch, True = workers from the first byte, False =
    threads only. Every path compresses each block the same way, so the output does not depend on it.
    The header is a placeholder until close(), which writes the jump table and the trailer and then
    patches the header with the final info (flags 0x1B).
    """

    def __init__(self, out: BinaryIO, *, block_size: int = DEFAULT_BLOCK_SIZE, algorithm: str = "lz4",
                 workers: int | None = None, verify: bool = True, processes: bool | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise FormatError(f"unknown ZFile algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
        if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0):
            raise FormatError(f"ZFile block_size {block_size} must be a power of two in "
                              f"[{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]")
        self._out = out
        self._start = out.tell()
        self.block_size = block_size
        self.algo = ALGORITHMS[algorithm]
        self.verify = verify
        workers = workers or os.cpu_count() or 1
        self._batch = max(BATCH_BYTES, block_size)
        self._workers = workers
        self._process_after = None if processes is False else 0 if processes else PROCESS_THRESHOLD
        self._procs: zworkers.CompressWorkers | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zfile")
        # Compressed batches are written, in submission order, by one writer thread, so the caller (the
        # ext4 builder) never waits on a write; the bounded queue keeps at most 2 x workers batches in flight.
        self._inflight: queue.Queue[Future[tuple[list[bytes], array]] | None] = queue.Queue(maxsize=2 * workers)
        self._writer_error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="zfile-writer", daemon=True)
        self._pending: list[memoryview] = []  # input not handed to the compressors yet, < one batch
        self._pending_bytes = 0
        self._table = array("I")
        self._in_bytes = 0
        self._payload_bytes = 0
        # an unbuffered file gets the compressed parts by os.writev; anything else by write()
        self._fd = out.fileno() if isinstance(out, io.FileIO) else None
        out.write(bytes(ZF_HT_SPACE))
        self._writer.start()

    def write(self, data: BytesLike) -> None:
        """Append bytes. Immutable `bytes` (or views of them) are kept by reference until their batch is
        handed to the compressors; anything else is copied first, so the caller may reuse its buffer."""
        mv = memoryview(data).cast("B")
        if not isinstance(mv.obj, bytes):
            mv = memoryview(mv.tobytes())
        while len(mv):
            room = self._batch - self._pending_bytes
            if len(mv) < room:
                self._pending.append(mv)
                self._pending_bytes += len(mv)
                return
            self._pending.append(mv[:room])
            self._pending_bytes += room
            mv = mv[room:]
            self._submit_pending()

    def _submit_pending(self) -> None:
        pieces, size = self._pending, self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        if self._writer_error is not None:
            raise self._writer_error
        if self._process_after is not None and self._in_bytes >= self._process_after:
            self._process_after = None  # one try per writer
            self._start_processes()
        self._in_bytes += size
        if self._procs is not None:
            if self._procs.full:
                self._emit_view(*self._procs.collect())
            self._procs.submit(pieces, self.block_size, self.algo, self.verify)
            return
        chunk = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._inflight.put(self._pool.submit(compress_batch, chunk, self.block_size, self.algo, self.verify))

    def _start_processes(self) -> None:
        procs = zworkers.lease(self._workers)
        if procs is None:
            return  # another writer of this process has them: stay on threads
        # Batches already given to threads come first in the file: let the writer thread finish them.
        self._finish_writer()
        self._pool.shutdown()
        self._procs = procs
        if self._writer_error is not None:
            raise self._writer_error

    def _emit_view(self, payloads: memoryview, lengths: array) -> None:
        if self._fd is None:
            self._out.write(payloads)
        else:
            _writev_all(self._fd, [payloads])
        self._payload_bytes += len(payloads)
        self._table.extend(lengths)

    def _write_loop(self) -> None:
        while True:
            future = self._inflight.get()
            if future is None:
                return
            if self._writer_error is not None:
                continue  # drain after a failure so the producer never blocks
            try:
                self._emit(*future.result())
            except BaseException as exc:  # handed to the producer thread, raised there
                self._writer_error = exc

    def _finish_writer(self) -> None:
        self._inflight.put(None)
        self._writer.join()

    def _emit(self, parts: list[bytes], lengths: array) -> None:
        if self._fd is None:
            self._out.write(b"".join(parts))
        else:
            _writev_all(self._fd, parts)
        self._payload_bytes += sum(lengths)
        self._table.extend(lengths)

    def close(self) -> ZFileStats:
        if self._pending:
            self._submit_pending()
        if self._procs is not None:
            while self._procs.pending:
                self._emit_view(*self._procs.collect())
            zworkers.release(self._procs)
            self._procs = None
        self._finish_writer()
        self._pool.shutdown()
        if self._writer_error is not None:
            raise self._writer_error
        check_jump_lengths(self._table, 0, self.block_size, self.verify, "ZFile writer")
        table = self._table.tobytes() if _LITTLE_ENDIAN_HOST else _le_table(self._table)
        index_offset = ZF_HT_SPACE + self._payload_bytes
        info = ZFileHeaderTrailer(flags=HEADER_FLAGS_FINAL, index_offset=index_offset,
                                  index_size=len(self._table), original_file_size=self._in_bytes,
                                  index_crc=crc32c_raw(table), block_size=self.block_size, algo=self.algo,
                                  verify=int(self.verify))
        self._out.write(table)
        self._out.write(replace(info, flags=TRAILER_FLAGS_FINAL).pack())
        end = self._out.tell()
        self._out.seek(self._start)
        self._out.write(info.pack())
        self._out.seek(end)
        return ZFileStats(zfile_size=end - self._start, blocks=len(self._table), original_size=self._in_bytes)

    def abort(self) -> None:
        self._writer_error = self._writer_error or FormatError("ZFile writer aborted")
        if self._procs is not None:
            zworkers.release(self._procs, broken=True)
            self._procs = None
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._writer.is_alive():
            self._finish_writer()


def _writev_all(fd: int, parts: list[bytes]) -> None:
    """writev the parts, at most IOV_MAX per call, resuming after partial writes."""
    pending: list[BytesLike] = list(parts)
    i = 0
    while i < len(pending):
        n = os.writev(fd, pending[i:i + _IOV_MAX])
        if n <= 0:
            raise OSError(f"writev wrote nothing ({n}) with {len(pending) - i} parts left")
        while i < len(pending) and n >= len(pending[i]):
            n -= len(pending[i])
            i += 1
        if n:
            pending[i] = memoryview(pending[i])[n:]


def _le_table(table: array) -> bytes:
    swapped = array("I", table)
    swapped.byteswap()
    return swapped.tobytes()


# ----------------------------------------------------------------------------------------------------------
# Reader


_read_pool_lock = threading.Lock()
_read_executor: ThreadPoolExecutor | None = None


def _read_pool() -> ThreadPoolExecutor:
    """One decompression pool for all readers (a stack may hold up to 255 of them), sized to the cores."""
    global _read_executor
    with _read_pool_lock:
        if _read_executor is None:
            _read_executor = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="zfile-read")
        return _read_executor


class ZFileReader:
    """Random-access decompressing view of a ZFile, validated as overlaybd's load_jump_table does (§2.6).

    Header and trailer digests and the index CRC are checked at open when the digest flag says they are
    valid; per-block CRCs are checked on every read when `verify_blocks` (and the file's verify byte) is set.
    """

    def __init__(self, view: RandomAccess, *, verify_blocks: bool = True) -> None:
        self.view = view
        self.name = view.name
        if view.size < 2 * ZF_HT_SPACE:
            raise FormatError(f"{self.name}: ZFile of {view.size} bytes is too small for header and trailer")
        self.header = self._load_ht(0, "header", want_header=True)
        self.trailer: ZFileHeaderTrailer | None = None
        if self.header.has(FLAG_SHIFT_HEADER_OVERWRITE):
            self.info, self.info_source = self.header, "header"
        else:
            if not self.header.has(FLAG_SHIFT_TYPE):
                raise FormatError(f"{self.name}: ZFile header: flags {self.header.flags:#x} lack the data bit")
            self.trailer = self._load_ht(view.size - ZF_HT_SPACE, "trailer", want_header=False)
            self.info, self.info_source = self.trailer, "trailer"
        self._check_info()
        self.block_size = self.info.block_size
        self.size = self.info.original_file_size
        self.verify = bool(self.info.verify) and verify_blocks
        self._load_jump_table()

    def _load_ht(self, offset: int, what: str, *, want_header: bool) -> ZFileHeaderTrailer:
        raw = self.view.pread(offset, ZF_HT_SPACE)
        ht = ZFileHeaderTrailer.unpack(raw)
        where = f"{self.name}: ZFile {what} (at byte {offset})"
        if ht.magic0 != ZF_MAGIC0 or ht.magic1 != ZF_MAGIC1:
            raise FormatError(f"{where}: bad magic")
        if ht.has(FLAG_SHIFT_HEADER) != want_header:
            raise FormatError(f"{where}: flags {ht.flags:#x} have the header bit "
                              f"{'clear' if want_header else 'set'}")
        if ht.has(FLAG_SHIFT_CALC_DIGEST) and compute_digest(raw) != ht.digest:
            raise FormatError(f"{where}: digest mismatch (stored {ht.digest:#010x}, "
                              f"computed {compute_digest(raw):#010x})")
        if not want_header and not (ht.has(FLAG_SHIFT_TYPE) and ht.has(FLAG_SHIFT_SEALED)):
            raise FormatError(f"{where}: flags {ht.flags:#x} lack the data or sealed bit")
        return ht

    def _check_info(self) -> None:
        info, where = self.info, f"{self.name}: ZFile {self.info_source}"
        if info.index_size > MAX_ZFILE_INDEX_SIZE:
            raise FormatError(f"{where}: index_size {info.index_size} exceeds {MAX_ZFILE_INDEX_SIZE}")
        if not (0 < info.block_size <= MAX_BLOCK_SIZE and info.block_size & (info.block_size - 1) == 0):
            raise FormatError(f"{where}: block_size {info.block_size} is not a power of two <= {MAX_BLOCK_SIZE}")
        if info.algo not in (ALGO_LZ4, ALGO_ZSTD):
            raise FormatError(f"{where}: unsupported compression algo {info.algo} (1 = LZ4, 2 = ZSTD)")
        if info.use_dict or info.dict_size:
            raise FormatError(f"{where}: dictionaries (use_dict {info.use_dict}, dict_size {info.dict_size}) "
                              f"are not supported")
        n, bs, orig = info.index_size, info.block_size, info.original_file_size
        if not (n - 1) * bs < orig <= n * bs and not (n == 0 and orig == 0):
            raise FormatError(f"{where}: original_file_size {orig} does not match {n} blocks of {bs} bytes")
        if info.index_offset + 4 * n > self.view.size:
            raise FormatError(f"{where}: jump table ({n} entries at byte {info.index_offset}) lies beyond the "
                              f"end of the {self.view.size}-byte file (truncated?)")

    def _load_jump_table(self) -> None:
        info, where = self.info, f"{self.name}: ZFile jump table"
        raw = self.view.pread(info.index_offset, 4 * info.index_size)
        if info.has(FLAG_SHIFT_CALC_DIGEST) and crc32c_raw(raw) != info.index_crc:
            raise FormatError(f"{where}: index_crc mismatch (stored {info.index_crc:#010x}, "
                              f"computed {crc32c_raw(raw):#010x})")
        lengths = array("I")
        lengths.frombytes(raw)
        if not _LITTLE_ENDIAN_HOST:
            lengths.byteswap()
        check_jump_lengths(lengths, 0, info.block_size, bool(info.verify), where)
        self.offsets = array("Q", [ZF_HT_SPACE + info.dict_size])
        pos = self.offsets[0]
        for n in lengths:
            pos += n
            self.offsets.append(pos)
        if pos != info.index_offset:
            raise FormatError(f"{where}: stored lengths end at byte {pos} but index_offset is {info.index_offset}")

    @property
    def blocks(self) -> int:
        return len(self.offsets) - 1

    def decode_blocks(self, first: int, last: int, *, verify: bool | None = None) -> bytes:
        """Decompress blocks first..last-1 and return them joined; large spans are cut into READ_BATCH_BLOCKS
        pieces decoded on a thread pool (os.pread, crc32c and the decompressors release the GIL)."""
        verify = self.verify if verify is None else verify
        if last - first <= READ_BATCH_BLOCKS or (os.cpu_count() or 1) < 2:
            return b"".join(self._decode_span(first, last, verify))
        spans = range(first, last, READ_BATCH_BLOCKS)
        parts = _read_pool().map(lambda b: self._decode_span(b, min(b + READ_BATCH_BLOCKS, last), verify), spans)
        return b"".join(block for part in parts for block in part)

    def _decode_span(self, first: int, last: int, verify: bool) -> list[bytes]:
        offsets = self.offsets
        base = offsets[first]
        raw = memoryview(self.view.pread(base, offsets[last] - base))
        bs, crc_len = self.block_size, CRC_SIZE if self.info.verify else 0
        check_crc = verify and crc_len
        out = []
        crc = _crc32c.crc32c
        lz4_decompress = lz4.block.decompress if self.info.algo == ALGO_LZ4 else None
        end = offsets[first] - base
        for b in range(first, last):
            start, end = end, offsets[b + 1] - base
            payload = raw[start:end - crc_len]
            if check_crc and crc(payload, _BLOCK_SEED_IN) ^ _MASK != _U32.unpack_from(raw, end - crc_len)[0]:
                stored = _U32.unpack_from(raw, end - crc_len)[0]
                raise FormatError(f"{self.name}: ZFile block {b} (bytes {base + start}..{base + end}): "
                                  f"CRC32C mismatch (stored {stored:#010x}, computed "
                                  f"{crc32c_raw(payload, ZFILE_BLOCK_CRC_SEED):#010x})")
            try:
                if lz4_decompress is not None:
                    data = lz4_decompress(payload, uncompressed_size=bs)
                else:
                    data = _zstd_decompressor().decompress(payload, max_output_size=bs)
            except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
                raise FormatError(f"{self.name}: ZFile block {b} (bytes {base + start}..{base + end}): "
                                  f"does not decompress: {exc}") from None
            if len(data) != bs and len(data) != self.size - b * bs:
                raise FormatError(f"{self.name}: ZFile block {b}: decompressed to {len(data)} bytes, "
                                  f"expected {min(bs, self.size - b * bs)}")
            out.append(data)
        return out

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(f"{self.name}: ZFile read of {length} bytes at {offset} is outside the "
                              f"{self.size}-byte original (truncated?)")
        if not length:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs + 1
        data = self.decode_blocks(first, last)
        skip = offset - first * bs
        return data[skip:skip + length] if skip or len(data) != length else data

    def verify_all_blocks(self, batch: int = 1024) -> int:
        """Check every block's CRC and decompression; return the number of blocks checked."""
        for first in range(0, self.blocks, batch):
            self.decode_blocks(first, min(first + batch, self.blocks), verify=True)
        return self.blocks

    def close(self) -> None:
        self.view.close()
