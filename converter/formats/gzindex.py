"""The overlaybd gzip random-access index, `gzip.meta` (turbooci reference §3): builder and reader.

Layout (§3.2): header (333 B, raw CRC32C) | windows (zlib, back to back) | index area = zlib(N × 29-B entries).
An entry is a deflate block boundary: uncompressed offset `de_pos`, compressed offset `en_pos`, the number
of unused bits of byte en_pos−1 (`bits`), and the 32 KiB of output before de_pos (its `window`).

Builder: `GzipIndexer` is a streaming gzip decompressor. It inflates the blob with zlib's Z_BLOCK flush
(system libz through ctypes, libz.py: Python's zlib module cannot stop at block boundaries), hands out the
decompressed bytes in big chunks and records checkpoints with the exact rule of §3.4, so one pass both
feeds the ext4 builder and produces a `gzip.meta` byte-identical to overlaybd's `create_gz_index`.

Reader: `GzipIndex.parse()` validates every field the runtime checks (§3.5); `GzipIndex.pread()` reads
the uncompressed stream at any offset from the nearest checkpoint (raw inflate primed with inflatePrime,
window as dictionary), like overlaybd's GzFile.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import zlib
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .common import BytesLike, FormatError, RandomAccess
from .libz import (
    DATA_TYPE_BITS,
    DATA_TYPE_BOUNDARY,
    DATA_TYPE_LAST,
    WBITS_GZIP_OR_ZLIB,
    WBITS_RAW,
    Z_BLOCK,
    Z_BUF_ERROR,
    Z_NO_FLUSH,
    Z_STREAM_END,
    Inflater,
)

GZIP_MAGIC = b"\x1f\x8b"
GZ_INDEX_MAGIC = b"ddgzidx\0"
GZ_INDEX_MAJOR = 1
GZ_INDEX_MINOR = 0
DICT_COMPRESS_ALGO_NONE = 0
DICT_COMPRESS_ALGO_ZLIB = 1
DICT_COMPRESS_LEVEL = 6
SPAN = 1 << 20  # create_gz_index's span as turboOCI-apply calls it
WINDOW = 32768
INDEX_ENTRY_SIZE = 29
HEADER_SIZE = 333
RESERVE_SIZE = 256
CHUNK_BYTES = 8 << 20  # decompressed bytes handed out per read()
INPUT_BYTES = 1 << 20  # compressed bytes per read of the source

def _crc32c_raw(data: bytes) -> int:
    """The header CRC (raw CRC32C, crc.py). Imported on first use: the `crc32c` package takes ~80 ms to
    import, which the indexing child (gzstream.py) would otherwise pay before its first output byte."""
    from .crc import crc32c_raw

    return crc32c_raw(data)


_HEADER = struct.Struct(f"<8sBBBbBiiiqqqq{RESERVE_SIZE}sqqI")
_ENTRY = struct.Struct("<qqqBI")
assert _HEADER.size == HEADER_SIZE and _ENTRY.size == INDEX_ENTRY_SIZE
_CRC_OFFSET = HEADER_SIZE - 4


# ----------------------------------------------------------------------------------------------------------
# The format


@dataclass(frozen=True)
class GzIndexHeader:
    """The 333-byte header (§3.3)."""

    index_num: int
    gzip_file_size: int
    index_file_size: int
    uncompress_file_size: int
    index_start: int
    index_area_len: int
    magic: bytes = GZ_INDEX_MAGIC
    major_version: int = GZ_INDEX_MAJOR
    minor_version: int = GZ_INDEX_MINOR
    dict_compress_algo: int = DICT_COMPRESS_ALGO_ZLIB
    dict_compress_level: int = DICT_COMPRESS_LEVEL
    flag: int = 0
    span: int = SPAN
    window: int = WINDOW
    index_size: int = INDEX_ENTRY_SIZE
    crc: int = 0

    def pack(self) -> bytes:
        raw = _HEADER.pack(self.magic, self.major_version, self.minor_version, self.dict_compress_algo,
                           self.dict_compress_level, self.flag, self.span, self.window, self.index_size,
                           self.index_num, self.gzip_file_size, self.index_file_size, self.uncompress_file_size,
                           bytes(RESERVE_SIZE), self.index_start, self.index_area_len, 0)
        return raw[:_CRC_OFFSET] + struct.pack("<I", _crc32c_raw(raw[:_CRC_OFFSET]))

    @classmethod
    def unpack(cls, raw: BytesLike) -> GzIndexHeader:
        (magic, major, minor, algo, level, flag, span, window, index_size, index_num, gzip_size, index_file_size,
         uncompress_size, _reserve, index_start, area_len, crc) = _HEADER.unpack_from(raw)
        return cls(index_num=index_num, gzip_file_size=gzip_size, index_file_size=index_file_size,
                   uncompress_file_size=uncompress_size, index_start=index_start, index_area_len=area_len,
                   magic=magic, major_version=major, minor_version=minor, dict_compress_algo=algo,
                   dict_compress_level=level, flag=flag, span=span, window=window, index_size=index_size, crc=crc)


@dataclass(frozen=True)
class Checkpoint:
    """One index entry (§3.3) before serialisation."""

    de_pos: int  # uncompressed offset
    en_pos: int  # compressed offset: bytes of the blob consumed when inflate stopped at the boundary
    bits: int  # unused bits of byte en_pos - 1
    window_z: bytes | Future[bytes]  # zlib(6) of the 32 KiB of output before de_pos (zero-filled in front)


def compress_window(window: bytes) -> bytes:
    """A window as create_gz_index stores it: deflateInit(level 6) + Z_FINISH, i.e. zlib.compress(w, 6)."""
    return zlib.compress(window, DICT_COMPRESS_LEVEL)


def build_index_file(checkpoints: list[Checkpoint], *, gzip_file_size: int, uncompress_file_size: int) -> bytes:
    """Serialise checkpoints as gzip.meta: the compressed windows back to back, then the entry array."""
    windows = [cp.window_z if isinstance(cp.window_z, bytes) else cp.window_z.result() for cp in checkpoints]
    entries = bytearray()
    pos = HEADER_SIZE
    for cp, win in zip(checkpoints, windows, strict=True):
        entries += _ENTRY.pack(cp.de_pos, cp.en_pos, pos, cp.bits, len(win))
        pos += len(win)
    area = zlib.compress(bytes(entries), DICT_COMPRESS_LEVEL)
    header = GzIndexHeader(index_num=len(checkpoints), gzip_file_size=gzip_file_size,
                           index_file_size=pos + len(area), uncompress_file_size=uncompress_file_size,
                           index_start=pos, index_area_len=len(area))
    return header.pack() + b"".join(windows) + area


# ----------------------------------------------------------------------------------------------------------
# Builder


class _CheckpointRule:
    """record() of create_gz_index (§3.4): keeps the last boundary at or before each span mark.

    The window of a candidate is taken lazily through `window_at(de_pos)` (the indexer still holds that
    output); `capture()` makes the pending candidate's window permanent before its output is dropped."""

    def __init__(self, span: int, window_at: Callable[[int], bytes],
                 compress: Callable[[bytes], bytes | Future[bytes]] = compress_window) -> None:
        self.span = span
        self.target = 0
        self.pending: tuple[int, int, int] | None = None  # (bits, en_pos, de_pos)
        self.pending_window: bytes | None = None
        self.points: list[Checkpoint] = []
        self._window_at = window_at
        self._compress = compress

    def _emit(self, bits: int, en: int, de: int, window: bytes | None) -> None:
        window = window if window is not None else self._window_at(de)
        self.points.append(Checkpoint(de, en, bits, self._compress(window)))

    def record(self, bits: int, en: int, de: int) -> None:
        if de < self.target:
            self.pending, self.pending_window = (bits, en, de), None
            return
        if de > self.target:
            if self.pending is not None:
                self._emit(*self.pending, self.pending_window)
            self.pending, self.pending_window = (bits, en, de), None
            while self.target < de:
                self.target += self.span
        if de == self.target:
            self._emit(bits, en, de, None)
            self.pending, self.pending_window = None, None
            self.target += self.span

    def capture(self, before: int) -> None:
        """Called before output below `before` is dropped: keep the pending window if it needs that output."""
        if self.pending is not None and self.pending_window is None and self.pending[2] - WINDOW < before:
            self.pending_window = self._window_at(self.pending[2])


class GzipIndexer:
    """Decompresses a gzip blob, read from `read_input(n)`, while it builds the blob's gzip.meta (§3.4).

    Output goes wherever the caller says: `read_into(address, room)` inflates straight into that memory
    (a shared-memory slot in gzstream.py), `read()` returns bytes. Only the first gzip member is read
    (§3.6): data after it raises MultiMemberError, a truncated or corrupt stream FormatError.

        indexer = GzipIndexer(f.read)
        while chunk := indexer.read():
            ...
        meta = indexer.index_file()

    Windows: the last WINDOW bytes of each finished output buffer are kept (`_tail`); a pending
    checkpoint whose window would reach below them has its window copied before they are replaced.
    """

    def __init__(self, read_input: Callable[[int], bytes], *, name: str = "gzip layer", span: int = SPAN,
                 input_bytes: int = INPUT_BYTES, backend: str | None = None) -> None:
        self.name = name
        self._read_input = read_input
        self._input_bytes = input_bytes
        self._z = Inflater(WBITS_GZIP_OR_ZLIB, name, backend_name=backend)  # libz.py: zlib-ng or zlib
        # windows are compressed (level 6: ~20% of the inflate time on the /usr layer) by a helper thread
        # while inflate goes on; zlib releases the GIL, and so does inflate through ctypes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gzindex-window")
        self._rule = _CheckpointRule(span, self._window_at, lambda w: self._pool.submit(compress_window, w))
        self._tail = b""  # the last bytes of the previous output buffer, windows may reach into them
        self._tail_base = 0
        self._out_addr = 0  # the output buffer being filled, from uncompressed offset self._base
        self._base = 0
        self._fill = 0
        self._consumed = 0  # compressed bytes fed and consumed before the current input piece
        self._piece_len = 0
        self._member_done = False
        self._ended = False
        self.compressed_size = 0  # bytes of the blob read so far (all of it once the end was returned)
        self.uncompressed_size = 0

    def _window_at(self, de: int) -> bytes:
        start = de - WINDOW
        parts = []
        if start < 0:
            parts.append(bytes(-start))
            start = 0
        tail_end = self._tail_base + len(self._tail)
        if start < self._tail_base:
            raise AssertionError("gzip index window no longer available")  # capture() prevents this
        if start < tail_end:
            parts.append(self._tail[start - self._tail_base:min(de, tail_end) - self._tail_base])
            start = min(de, tail_end)
        if start < de:
            parts.append(ctypes.string_at(self._out_addr + start - self._base, de - start))
        return b"".join(parts)

    def _more_input(self) -> bool:
        data = self._read_input(self._input_bytes)
        if not data:
            return False
        self.compressed_size += len(data)
        self._consumed += self._piece_len
        self._piece_len = len(data)
        self._z.feed(bytes(data))
        return True

    def read_into(self, address: int, room: int) -> int:
        """Inflate up to `room` bytes to memory at `address`; 0 means the end of the gzip member. The
        memory must stay untouched until the next call (windows are read from it)."""
        if self._member_done:
            self._ended = True
            return 0
        z, strm, rule = self._z, self._z.strm, self._rule
        self._out_addr, self._fill = address, 0
        while self._fill < room and not self._member_done:
            if strm.avail_in == 0 and not self._more_input():
                raise FormatError(f"{self.name}: gzip stream truncated: it ends inside the compressed data "
                                  f"(after {self.compressed_size} compressed, {self._base + self._fill} "
                                  f"uncompressed bytes)")
            left, avail_in = room - self._fill, strm.avail_in
            rc = z.inflate(address + self._fill, left, Z_BLOCK)
            self._fill += left - strm.avail_out
            if rc == Z_STREAM_END:
                self._finish()
                break
            if rc == Z_BUF_ERROR and strm.avail_out == left and strm.avail_in == avail_in:
                raise FormatError(f"{self.name}: corrupt deflate data: inflate makes no progress at compressed "
                                  f"byte {self._consumed + self._piece_len - avail_in}")
            dt = strm.data_type
            if dt & DATA_TYPE_BOUNDARY and not dt & DATA_TYPE_LAST:
                rule.record(dt & DATA_TYPE_BITS, self._consumed + self._piece_len - strm.avail_in,
                            self._base + self._fill)
        # this buffer goes back to the caller: keep its last WINDOW bytes for later windows
        end = self._base + self._fill
        keep = min(WINDOW, end)
        new_tail = (self._tail[len(self._tail) - (keep - self._fill):] if keep > self._fill else b"") + \
            ctypes.string_at(address + self._fill - min(keep, self._fill), min(keep, self._fill))
        rule.capture(end - keep)
        self._tail, self._tail_base = new_tail, end - keep
        self._base = end
        n, self._fill, self._out_addr = self._fill, 0, 0
        if n == 0:
            self._ended = True
        return n

    def read(self, size: int = CHUNK_BYTES) -> bytes:
        """The next piece of decompressed data (up to `size` bytes), b"" at the end of the gzip member."""
        buf = ctypes.create_string_buffer(size)
        n = self.read_into(ctypes.addressof(buf), size)
        return buf.raw[:n] if n < size else buf.raw

    def _finish(self) -> None:
        strm = self._z.strm
        self.uncompressed_size = self._base + self._fill
        trailing = ctypes.string_at(strm.next_in, strm.avail_in) if strm.avail_in else b""
        while not trailing.strip(b"\0"):
            more = self._read_input(self._input_bytes)
            if not more:
                break
            self.compressed_size += len(more)
            trailing += more
        self._z.close()
        if trailing.strip(b"\0"):
            kind = "another gzip member" if trailing.lstrip(b"\0").startswith(GZIP_MAGIC) else "trailing data"
            raise MultiMemberError(f"{self.name}: {kind} follows the first gzip member at compressed byte "
                                   f"{self.compressed_size - len(trailing)}; overlaybd's gzip index covers only "
                                   f"the first member (turbooci §3.6), so this layer cannot be a turbo layer")
        self._member_done = True

    def index_file(self) -> bytes:
        """gzip.meta of the whole blob; call after the end was returned."""
        if not self._ended:
            raise RuntimeError("GzipIndexer.index_file() before the end of the gzip stream")
        return build_index_file(self._rule.points, gzip_file_size=self.compressed_size,
                                uncompress_file_size=self.uncompressed_size)

    def close(self) -> None:
        self._z.close()
        self._pool.shutdown(cancel_futures=True)


class MultiMemberError(FormatError):
    """The gzip blob has data after its first member (concatenated members, e.g. eStargz)."""


def build_gzip_index(path: str, *, span: int = SPAN) -> bytes:
    """gzip.meta for a gzip file on disk (one full decompression)."""
    with open(path, "rb") as f:
        indexer = GzipIndexer(f.read, name=path, span=span)
        try:
            while indexer.read():
                pass
            return indexer.index_file()
        finally:
            indexer.close()


# ----------------------------------------------------------------------------------------------------------
# Reader


@dataclass
class _Cursor:
    z: Inflater
    de: int  # uncompressed offset the next inflated byte has
    en: int  # next compressed byte to feed


class GzipIndex:
    """A validated gzip.meta; pread() serves the uncompressed stream of `target` (the gzip blob).

    `target` may be given later through `attach()`; its size must equal the header's gzip_file_size."""

    def __init__(self, raw: bytes, *, name: str = "gzip.meta", target: RandomAccess | None = None) -> None:
        self.name = name
        where = f"{name}: gzip index"
        if len(raw) < HEADER_SIZE:
            raise FormatError(f"{where} truncated: {len(raw)} bytes, the header alone needs {HEADER_SIZE}")
        h = GzIndexHeader.unpack(raw)
        if h.magic != GZ_INDEX_MAGIC:
            raise FormatError(f"{where}: bad magic {h.magic!r} (want {GZ_INDEX_MAGIC!r})")
        crc = _crc32c_raw(raw[:_CRC_OFFSET])
        if h.crc != crc:
            raise FormatError(f"{where}: header CRC mismatch (stored {h.crc:#010x}, computed {crc:#010x})")
        if h.major_version != GZ_INDEX_MAJOR:
            raise FormatError(f"{where}: major_version {h.major_version}, only {GZ_INDEX_MAJOR} is supported")
        if h.index_size != INDEX_ENTRY_SIZE:
            raise FormatError(f"{where}: index_size {h.index_size}, must be {INDEX_ENTRY_SIZE}")
        if h.dict_compress_algo not in (DICT_COMPRESS_ALGO_NONE, DICT_COMPRESS_ALGO_ZLIB):
            raise FormatError(f"{where}: unknown dict_compress_algo {h.dict_compress_algo}")
        if h.index_file_size != len(raw):
            raise FormatError(f"{where}: index_file_size {h.index_file_size} != file size {len(raw)} "
                              f"({'truncated' if len(raw) < h.index_file_size else 'trailing bytes'})")
        if h.index_start + h.index_area_len != len(raw) or h.index_start < HEADER_SIZE:
            raise FormatError(f"{where}: index_start {h.index_start} + index_area_len {h.index_area_len} "
                              f"!= file size {len(raw)}")
        try:
            entries = zlib.decompress(raw[h.index_start:])
        except zlib.error as exc:
            raise FormatError(f"{where}: index area does not decompress: {exc}") from None
        if len(entries) != h.index_num * INDEX_ENTRY_SIZE:
            raise FormatError(f"{where}: index area holds {len(entries)} bytes, index_num {h.index_num} "
                              f"needs {h.index_num * INDEX_ENTRY_SIZE}")
        self.header = h
        self.raw = raw
        self.entries = [_ENTRY.unpack_from(entries, i * INDEX_ENTRY_SIZE) for i in range(h.index_num)]
        self._de = [e[0] for e in self.entries]
        if not self.entries or self.entries[0][0] != 0:
            raise FormatError(f"{where}: the first entry must be at de_pos 0 (reads before it are impossible)")
        for no, (de, en, win_pos, bits, win_len) in enumerate(self.entries):
            if no and de <= self._de[no - 1]:
                raise FormatError(f"{where}: entry {no} de_pos {de} not above entry {no - 1}'s")
            if not (0 <= de <= h.uncompress_file_size and 0 < en <= h.gzip_file_size and bits < 8):
                raise FormatError(f"{where}: entry {no} (de_pos {de}, en_pos {en}, bits {bits}) outside the "
                                  f"{h.gzip_file_size}-byte blob / {h.uncompress_file_size}-byte stream")
            if not (win_pos >= HEADER_SIZE and win_pos + win_len <= h.index_start):
                raise FormatError(f"{where}: entry {no} window [{win_pos}, +{win_len}) outside the window area")
        self.target: RandomAccess | None = None
        self._cursor: _Cursor | None = None  # where the last read ended, to go on from there
        self._lock = threading.Lock()
        if target is not None:
            self.attach(target)

    @classmethod
    def parse(cls, raw: bytes, *, name: str = "gzip.meta") -> GzipIndex:
        return cls(raw, name=name)

    @property
    def uncompressed_size(self) -> int:
        return self.header.uncompress_file_size

    @property
    def size(self) -> int:
        """The uncompressed stream's size: with pread() and close() a RandomAccess view of the tar."""
        return self.header.uncompress_file_size

    def close(self) -> None:
        """Release the read cursor (the target belongs to the caller)."""
        if self._cursor is not None:
            self._cursor.z.close()
            self._cursor = None

    def attach(self, target: RandomAccess) -> None:
        if target.size != self.header.gzip_file_size:
            raise FormatError(f"{self.name}: gzip_file_size {self.header.gzip_file_size} does not match the "
                              f"target blob {target.name} ({target.size} bytes): wrong or changed original layer")
        self.target = target

    def describe(self) -> dict[str, object]:
        """The header and checkpoints, for `obd-convert inspect`."""
        h = self.header
        return {"entries": h.index_num, "span": h.span, "window": h.window,
                "dict_compress_algo": h.dict_compress_algo, "gzip_file_size": h.gzip_file_size,
                "uncompress_file_size": h.uncompress_file_size, "index_file_size": h.index_file_size,
                "checkpoints": [{"de_pos": e[0], "en_pos": e[1], "bits": e[3]} for e in self.entries]}

    def window(self, no: int) -> bytes:
        _de, _en, win_pos, _bits, win_len = self.entries[no]
        raw = self.raw[win_pos:win_pos + win_len]
        if self.header.dict_compress_algo == DICT_COMPRESS_ALGO_NONE:
            return raw
        try:
            return zlib.decompress(raw)
        except zlib.error as exc:
            raise FormatError(f"{self.name}: gzip index entry {no}: window does not decompress: {exc}") from None

    def _start(self, no: int) -> _Cursor:
        """A raw inflate positioned at checkpoint `no` (primed with its bits, its window as dictionary)."""
        assert self.target is not None
        de, en, _win_pos, bits, _win_len = self.entries[no]
        z = Inflater(WBITS_RAW, f"{self.name} (entry {no}, target {self.target.name})")
        try:
            if bits:
                (byte,) = self.target.pread(en - 1, 1)
                z.prime(bits, byte >> (8 - bits))
            z.set_dictionary(self.window(no))
        except BaseException:
            z.close()
            raise
        return _Cursor(z, de, en)

    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes of the uncompressed stream at `offset` (fewer only past the end of the stream).

        Reads go on from where the previous one ended when that is nearer than the checkpoint, so
        reading a layer's files in order (as materialize does) inflates the stream about once."""
        if self.target is None:
            raise FormatError(f"{self.name}: no target blob attached")
        if offset < 0 or length < 0:
            raise FormatError(f"{self.name}: bad read at {offset}, length {length}")
        length = max(0, min(length, self.uncompressed_size - offset))
        if not length:
            return b""
        with self._lock:
            no = bisect_right(self._de, offset) - 1
            cursor, self._cursor = self._cursor, None
            if cursor is None or not self.entries[no][0] <= cursor.de <= offset:
                if cursor is not None:
                    cursor.z.close()
                cursor = self._start(no)
            try:
                data = self._read(cursor, offset, length)
            except BaseException:
                cursor.z.close()
                raise
            self._cursor = cursor
        if len(data) < length:
            raise FormatError(f"{self.name}: target {self.target.name} ended after {len(data)} of {length} "
                              f"bytes at uncompressed offset {offset} (truncated or changed original layer?)")
        return data

    def _read(self, cursor: _Cursor, offset: int, length: int) -> bytes:
        assert self.target is not None
        z = cursor.z
        skip, want = offset - cursor.de, length
        out = ctypes.create_string_buffer(min(skip + want, CHUNK_BYTES))
        addr = ctypes.addressof(out)
        parts: list[bytes] = []
        while want:
            if z.strm.avail_in == 0:
                n = min(INPUT_BYTES, self.target.size - cursor.en)
                if n <= 0:
                    break
                z.feed(self.target.pread(cursor.en, n))
                cursor.en += n
            room = min(len(out), skip + want)
            rc = z.inflate(addr, room, Z_NO_FLUSH)
            got = room - z.strm.avail_out
            cursor.de += got
            skipped = min(skip, got)  # output before `offset` is inflated and dropped
            skip -= skipped
            if got > skipped:
                parts.append(ctypes.string_at(addr + skipped, got - skipped))
                want -= got - skipped
            if rc == Z_STREAM_END or (rc == Z_BUF_ERROR and not got):
                break
        return b"".join(parts)
