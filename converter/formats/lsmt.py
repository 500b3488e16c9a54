"""LSMT layer blobs (reference §1): the committed ("sealed") form, streaming writer and validating reader.

Layout: header (4096 B) | data (512-B granular) | index (16-B entries, padded to 256) | trailer (4096 B).
Entry offset/length/moffset are in 512-byte sectors; moffset counts from the start of the blob, so the
first data byte is sector 8. Only the trailer says where the index is.
"""

from __future__ import annotations

import heapq
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .common import SECTOR, BytesLike, FormatError, RandomAccess
from .tarwrap import TarWrapping
from .zfile import ZFileReader

LSMT_MAGIC0 = b"LSMT\x00\x01\x02\x00"
LSMT_MAGIC1 = bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")
HT_SPACE = 4096  # header and trailer each occupy one 4 KiB block
HEADER_STRUCT_SIZE = 390  # the `size` field: sizeof(HeaderTrailer), the rest of HT_SPACE is zero
LSMT_VERSION = 1
LSMT_SUB_VERSION = 1
USER_TAG_SIZE = 256
UUID_FIELD_SIZE = 37  # 36 ASCII characters + NUL

FLAG_SHIFT_HEADER = 0  # 1 = header, 0 = trailer
FLAG_SHIFT_TYPE = 1  # 1 = data file, 0 = index file
FLAG_SHIFT_SEALED = 2
FLAG_SPARSE_RW = 4

HEADER_FLAGS_COMMITTED = (1 << FLAG_SHIFT_HEADER) | (1 << FLAG_SHIFT_TYPE) | (1 << FLAG_SHIFT_SEALED)  # 7
TRAILER_FLAGS_COMMITTED = (1 << FLAG_SHIFT_TYPE) | (1 << FLAG_SHIFT_SEALED)  # 6

INVALID_OFFSET = (1 << 50) - 1  # offset of a padding entry
MAX_LENGTH = (1 << 14) - 1  # 16383 sectors: the widest an entry's length field goes
MAX_ENTRY_SECTORS = 16376  # what we emit: the largest multiple of 8 sectors (4 KiB) that fits MAX_LENGTH
MAX_MOFFSET = (1 << 55) - 1
INDEX_ALIGN_ENTRIES = 256  # commit pads the index to 4096 bytes
MAX_LSMT_RO_INDEX_SIZE = 1_000_000  # reader limit on trailer.index_size, padding included
MAX_STACK_LAYERS = 255
MAX_MERGED_INDEX_ENTRIES = 128_000_000
ZERO_UUID = "00000000-0000-0000-0000-000000000000"

_HT = struct.Struct(f"<8s16sIIQQQ{UUID_FIELD_SIZE}s{UUID_FIELD_SIZE}sHBB{USER_TAG_SIZE}s")
assert _HT.size == HEADER_STRUCT_SIZE
_ENTRY = struct.Struct("<QQ")
_LEN_SHIFT = 50
_ZEROED_BIT = 1 << 55
_TAG_SHIFT = 56
_HEX = set("0123456789abcdefABCDEF")


def normalize_uuid(value: str | None) -> str:
    """Validate a 36-character UUID string (any case) and return the uppercase on-disk form."""
    if value is None:
        return ZERO_UUID
    ok = len(value) == 36 and all(
        (c == "-") if i in (8, 13, 18, 23) else (c in _HEX) for i, c in enumerate(value))
    if not ok:
        raise FormatError(f"invalid UUID {value!r}: expected 8-4-4-4-12 hex digits")
    return value.upper()


@dataclass(frozen=True)
class LsmtHeaderTrailer:
    """The 390-byte HeaderTrailer struct (§1.2), stored in a 4096-byte block."""

    flags: int
    index_offset: int  # bytes
    index_size: int  # 16-byte entries, padding included
    virtual_size: int  # bytes
    uuid: str = ZERO_UUID
    parent_uuid: str = ZERO_UUID
    user_tag: bytes = b""
    version: int = LSMT_VERSION
    sub_version: int = LSMT_SUB_VERSION
    size: int = HEADER_STRUCT_SIZE
    reserved: int = 0
    magic0: bytes = LSMT_MAGIC0
    magic1: bytes = LSMT_MAGIC1

    @property
    def is_header(self) -> bool:
        return bool(self.flags >> FLAG_SHIFT_HEADER & 1)

    @property
    def is_data_file(self) -> bool:
        return bool(self.flags >> FLAG_SHIFT_TYPE & 1)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags >> FLAG_SHIFT_SEALED & 1)

    def pack(self) -> bytes:
        raw = _HT.pack(self.magic0, self.magic1, self.size, self.flags, self.index_offset, self.index_size,
                       self.virtual_size, self.uuid.encode("ascii"), self.parent_uuid.encode("ascii"),
                       self.reserved, self.version, self.sub_version, self.user_tag)
        return raw.ljust(HT_SPACE, b"\0")

    @classmethod
    def unpack(cls, raw: BytesLike) -> LsmtHeaderTrailer:
        (magic0, magic1, size, flags, index_offset, index_size, virtual_size, uuid, parent, reserved,
         version, sub_version, user_tag) = _HT.unpack_from(raw)
        return cls(flags=flags, index_offset=index_offset, index_size=index_size, virtual_size=virtual_size,
                   uuid=_cstr(uuid), parent_uuid=_cstr(parent), user_tag=user_tag.rstrip(b"\0"),
                   version=version, sub_version=sub_version, size=size, reserved=reserved,
                   magic0=magic0, magic1=magic1)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True)
class SegmentMapping:
    """One 16-byte index entry (§1.4): `length` sectors at LBA `offset`, data at sector `moffset`."""

    offset: int
    length: int
    moffset: int
    zeroed: bool = False
    tag: int = 0

    def pack(self) -> bytes:
        return pack_entry(self.offset, self.length, self.moffset, self.zeroed, self.tag)

    @classmethod
    def unpack(cls, raw: BytesLike) -> SegmentMapping:
        lo, hi = _ENTRY.unpack_from(raw)
        return cls(lo & INVALID_OFFSET, lo >> _LEN_SHIFT, hi & MAX_MOFFSET, bool(hi & _ZEROED_BIT),
                   hi >> _TAG_SHIFT)

    @property
    def end(self) -> int:
        return self.offset + self.length


def pack_entry(offset: int, length: int, moffset: int, zeroed: bool, tag: int = 0) -> bytes:
    return _ENTRY.pack(offset | length << _LEN_SHIFT, moffset | (_ZEROED_BIT if zeroed else 0) | tag << _TAG_SHIFT)


PADDING_ENTRY = pack_entry(INVALID_OFFSET, 0, 0, False)

# ----------------------------------------------------------------------------------------------------------
# Extent resolution, shared by the writer (later writes win) and the stacked reader (upper layers win).

# (start, length, moffset, zeroed, source) — all in sectors; moffset is meaningless when zeroed
Extent = tuple[int, int, int, bool, int]


def resolve_extents(starts: Iterable[int], lengths: Iterable[int], moffsets: Iterable[int],
                    zeroed: Iterable[bool], priorities: Iterable[int], sources: Iterable[int]) -> list[Extent]:
    """For every sector covered by some record keep the record with the highest priority; return the
    surviving pieces sorted by start, adjacent pieces of one source with contiguous data (or both zeroed)
    coalesced, lengths unbounded. Memory and time follow the number of records, never the data size."""
    recs = sorted(zip(starts, lengths, moffsets, zeroed, priorities, sources, strict=True))
    recs = [r for r in recs if r[1] > 0]
    pieces: list[Extent] = []
    # Only clusters of mutually overlapping records need the priority sweep; a record that overlaps no
    # other one (most of them) is taken as it is.
    first, count = 0, len(recs)
    while first < count:
        last, end = first + 1, recs[first][0] + recs[first][1]
        while last < count and recs[last][0] < end:
            end = max(end, recs[last][0] + recs[last][1])
            last += 1
        if last == first + 1:
            start, length, moff, zero, _prio, src = recs[first]
            _append_coalesced(pieces, start, length, moff, zero, src)
        else:
            _sweep(recs[first:last], pieces)
        first = last
    return pieces


def _sweep(recs: list[tuple[int, int, int, bool, int, int]], pieces: list[Extent]) -> None:
    """The highest-priority record per sector of overlapping records (sorted by start), appended to pieces."""
    bounds = sorted({r[0] for r in recs} | {r[0] + r[1] for r in recs})
    heap: list[tuple[int, int]] = []  # (-priority, record index); expired records are dropped lazily
    nxt = 0
    for k in range(len(bounds) - 1):
        p, q = bounds[k], bounds[k + 1]
        while nxt < len(recs) and recs[nxt][0] <= p:
            heapq.heappush(heap, (-recs[nxt][4], nxt))
            nxt += 1
        while heap and recs[heap[0][1]][0] + recs[heap[0][1]][1] <= p:
            heapq.heappop(heap)
        if heap:
            start, _length, moff, zero, _prio, src = recs[heap[0][1]]
            _append_coalesced(pieces, p, q - p, moff if zero else moff + (p - start), zero, src)


def _append_coalesced(pieces: list[Extent], start: int, length: int, moff: int, zero: bool, src: int) -> None:
    if pieces:
        ps, pl, pm, pz, psrc = pieces[-1]
        if ps + pl == start and pz == zero and psrc == src and (zero or pm + pl == moff):
            pieces[-1] = (ps, pl + length, pm, pz, psrc)
            return
    pieces.append((start, length, moff, zero, src))


def split_extents(pieces: Iterable[Extent], max_sectors: int = MAX_ENTRY_SECTORS) -> Iterator[Extent]:
    """Cut pieces into index entries of at most `max_sectors` (zeroed ones keep their moffset)."""
    for start, length, moff, zero, src in pieces:
        done = 0
        while done < length:
            n = min(max_sectors, length - done)
            yield start + done, n, moff if zero else moff + done, zero, src
            done += n


# ----------------------------------------------------------------------------------------------------------
# Writer


@dataclass(frozen=True)
class LsmtStats:
    lsmt_size: int  # bytes of the whole LSMT blob
    data_bytes: int  # bytes in the data section (rewritten, now-dead data included)
    index_entries: int  # real entries, padding excluded
    index_size: int  # entries in the file, padding included


class LsmtWriter:
    """Streams a committed LSMT layer to `sink` in one pass.

    Data is appended in arrival order (§1.5 "data order is free"); only a compact record per contiguous
    write run is kept in memory, and the sorted, overlap-free, coalesced and padded index is built at close.
    A later write or zero() over an LBA already written wins; the dead data stays in the data section.
    """

    def __init__(self, sink: Callable[[BytesLike], object], *, virtual_size: int, uuid: str | None = None,
                 parent_uuid: str | None = None, user_tag: bytes = b"") -> None:
        if virtual_size <= 0 or virtual_size % SECTOR:
            raise FormatError(f"LSMT virtual_size {virtual_size} must be a positive multiple of {SECTOR}")
        if len(user_tag) >= USER_TAG_SIZE or b"\0" in user_tag:
            raise FormatError(f"LSMT user_tag must be under {USER_TAG_SIZE} bytes without NUL")
        self._sink = sink
        self.virtual_size = virtual_size
        self._ht = LsmtHeaderTrailer(flags=HEADER_FLAGS_COMMITTED, index_offset=0, index_size=0,
                                     virtual_size=virtual_size, uuid=normalize_uuid(uuid),
                                     parent_uuid=normalize_uuid(parent_uuid), user_tag=bytes(user_tag))
        # one record per run: LBA, length and moffset (ZEROED_BIT marks zeroed runs), all in sectors
        self._lbas = array("Q")
        self._lens = array("Q")
        self._moffs = array("Q")
        self._cursor = HT_SPACE // SECTOR
        self._closed = False
        sink(self._ht.pack())

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if self._closed:
            raise FormatError("LSMT writer is already closed")
        if offset % SECTOR or length % SECTOR or offset < 0 or length < 0:
            raise FormatError(f"LSMT {what} at byte {offset}, length {length}: "
                              f"offset and length must be multiples of {SECTOR}")
        if offset + length > self.virtual_size:
            raise FormatError(f"LSMT {what} at byte {offset}, length {length}: beyond the virtual size "
                              f"{self.virtual_size}")

    def _record(self, lba: int, n: int, moff: int) -> None:
        if self._lens:
            i = len(self._lens) - 1
            pl, pm = self._lens[i], self._moffs[i]
            contiguous_data = not pm & _ZEROED_BIT and not moff & _ZEROED_BIT and pm + pl == moff
            both_zeroed = pm & _ZEROED_BIT and moff & _ZEROED_BIT
            if self._lbas[i] + pl == lba and (contiguous_data or both_zeroed):
                self._lens[i] = pl + n  # extends the newest run, so "last write wins" still holds
                return
        self._lbas.append(lba)
        self._lens.append(n)
        self._moffs.append(moff)

    def write(self, offset: int, data: BytesLike) -> None:
        length = memoryview(data).nbytes
        self._check_range("write", offset, length)
        if not length:
            return
        self._sink(data)
        n = length // SECTOR
        self._record(offset // SECTOR, n, self._cursor)
        self._cursor += n

    def zero(self, offset: int, length: int) -> None:
        self._check_range("zero", offset, length)
        if length:
            # commit stores the data cursor in zeroed entries; the reader rejects moffset 0
            self._record(offset // SECTOR, length // SECTOR, self._cursor | _ZEROED_BIT)

    def index_entries(self) -> list[Extent]:
        """The final (unpadded) index as it would be written now."""
        pieces = resolve_extents(self._lbas, self._lens, (m & ~_ZEROED_BIT for m in self._moffs),
                                 (bool(m & _ZEROED_BIT) for m in self._moffs), range(len(self._lbas)),
                                 (0 for _ in self._lbas))
        return list(split_extents(pieces))

    def close(self) -> LsmtStats:
        entries = self.index_entries()
        padded = -(-len(entries) // INDEX_ALIGN_ENTRIES) * INDEX_ALIGN_ENTRIES
        if padded > MAX_LSMT_RO_INDEX_SIZE:
            raise FormatError(f"LSMT index needs {padded} entries (padding included); overlaybd opens at most "
                              f"{MAX_LSMT_RO_INDEX_SIZE}: the layer is too fragmented")
        self._closed = True
        index_offset = self._cursor * SECTOR
        index = bytearray(b"".join(pack_entry(s, n, m, z) for s, n, m, z, _src in entries))
        index += PADDING_ENTRY * (padded - len(entries))
        self._sink(index)
        trailer = LsmtHeaderTrailer(flags=TRAILER_FLAGS_COMMITTED, index_offset=index_offset, index_size=padded,
                                    virtual_size=self.virtual_size, uuid=self._ht.uuid,
                                    parent_uuid=self._ht.parent_uuid, user_tag=self._ht.user_tag)
        self._sink(trailer.pack())
        return LsmtStats(lsmt_size=index_offset + len(index) + HT_SPACE, data_bytes=index_offset - HT_SPACE,
                         index_entries=len(entries), index_size=padded)


# ----------------------------------------------------------------------------------------------------------
# Reader


class LsmtLayer:
    """A committed LSMT layer opened over any random-access view, validated as overlaybd does (§1.5).

    `view` is the logical LSMT byte stream (already unwrapped from tar and ZFile); `wrapper` and `zfile`
    describe what it was unwrapped from, for inspection. The index lives in compact arrays.
    """

    def __init__(self, view: RandomAccess, *, wrapper: TarWrapping | None = None,
                 zfile: ZFileReader | None = None, on_close: Callable[[], None] | None = None,
                 warp: bool = False) -> None:
        self.view = view
        self.warp = warp  # a turbo meta layer (turbooci §2): tags kept and rebased, tag 1 = remote data
        self.name = view.name
        self.wrapper = wrapper
        self.zfile = zfile
        self._on_close = on_close
        self.size = view.size
        if self.size < 2 * HT_SPACE:
            raise FormatError(f"{self.name}: LSMT blob of {self.size} bytes is too small for header and trailer")
        self.header = LsmtHeaderTrailer.unpack(view.pread(0, HT_SPACE))
        self._check_ht(self.header, "header", want_header=True)
        self.trailer = LsmtHeaderTrailer.unpack(view.pread(self.size - HT_SPACE, HT_SPACE))
        self._check_ht(self.trailer, f"trailer (at byte {self.size - HT_SPACE})", want_header=False)
        self.virtual_size = self.trailer.virtual_size
        self.uuid = self.trailer.uuid
        self.parent_uuid = self.trailer.parent_uuid
        self.offsets = array("Q")
        self.lengths = array("Q")
        self.moffsets = array("Q")
        self.zeroed = bytearray()
        self.tags = bytearray()  # all 0 for a native layer (its tags are not meaningful)
        self.remote: RandomAccess | None = None  # a warp layer's original tar, serving tag-1 entries
        self.padding_entries = 0
        self._load_index()

    def _check_ht(self, ht: LsmtHeaderTrailer, what: str, *, want_header: bool) -> None:
        if ht.magic0 != LSMT_MAGIC0 or ht.magic1 != LSMT_MAGIC1:
            raise FormatError(f"{self.name}: LSMT {what}: bad magic (not an LSMT layer)")
        if ht.is_header != want_header:
            raise FormatError(f"{self.name}: LSMT {what}: flags {ht.flags:#x} has the header bit "
                              f"{'clear' if want_header else 'set'}")
        if not ht.is_data_file:
            raise FormatError(f"{self.name}: LSMT {what}: flags {ht.flags:#x} lacks the data-file bit")
        if not want_header and not ht.is_sealed:
            raise FormatError(f"{self.name}: LSMT {what}: flags {ht.flags:#x} lacks the sealed bit")

    def _load_index(self) -> None:
        t = self.trailer
        if t.index_size > MAX_LSMT_RO_INDEX_SIZE:
            raise FormatError(f"{self.name}: LSMT trailer: index_size {t.index_size} exceeds "
                              f"MAX_LSMT_RO_INDEX_SIZE {MAX_LSMT_RO_INDEX_SIZE}")
        room = self.size - HT_SPACE - t.index_offset
        if t.index_offset < HT_SPACE or t.index_size * 16 > room:
            raise FormatError(f"{self.name}: LSMT trailer: index of {t.index_size} entries at byte "
                              f"{t.index_offset} does not fit between header and trailer (blob {self.size} B)")
        raw = self.view.pread(t.index_offset, t.index_size * 16)
        lo_sector, hi_sector = HT_SPACE // SECTOR, t.index_offset // SECTOR
        prev_end, prev_no = 0, -1
        # a warp file's tags are rebased by the smallest one present (open_warpfile_ro, turbooci §2.5)
        base_tag = min((hi >> _TAG_SHIFT for lo, hi in _ENTRY.iter_unpack(raw)
                        if lo & INVALID_OFFSET != INVALID_OFFSET), default=0) if self.warp else 0
        if base_tag:
            raise FormatError(f"{self.name}: meta layer has no tag-0 (metadata) entry, its smallest tag is "
                              f"{base_tag}: overlaybd would rebase the tags and read remote data from the meta "
                              f"blob (turbooci §2.5)")
        for no, (lo, hi) in enumerate(_ENTRY.iter_unpack(raw)):
            offset = lo & INVALID_OFFSET
            if offset == INVALID_OFFSET:
                self.padding_entries += 1
                continue
            length, moff, zero = lo >> _LEN_SHIFT, hi & MAX_MOFFSET, bool(hi & _ZEROED_BIT)
            where = f"{self.name}: LSMT index entry {no} (offset {offset}, length {length}, moffset {moff})"
            if offset < prev_end:
                raise FormatError(f"{where}: not sorted / overlaps entry {prev_no} ending at sector {prev_end}")
            tag = (hi >> _TAG_SHIFT) - base_tag if self.warp else 0
            if tag > 1:
                raise FormatError(f"{where}: tag {tag + base_tag} (rebased {tag}); a meta layer has only "
                                  f"tags 0 (metadata) and 1 (remote data)")
            if tag == 1:
                if zero or length == 0:
                    raise FormatError(f"{where}: a remote-data (tag 1) entry must be a non-empty data entry")
            elif zero:
                if not lo_sector <= moff <= hi_sector:
                    raise FormatError(f"{where}: zeroed entry moffset outside [{lo_sector}, {hi_sector}]")
            elif not (lo_sector <= moff < hi_sector and lo_sector < moff + length <= hi_sector):
                raise FormatError(f"{where}: data outside the data section [{lo_sector}, {hi_sector}) sectors")
            self.offsets.append(offset)
            self.lengths.append(length)
            self.moffsets.append(moff)
            self.zeroed.append(zero)
            self.tags.append(tag)
            prev_end, prev_no = offset + length, no

    def __len__(self) -> int:
        return len(self.offsets)

    def iter_entries(self) -> Iterator[SegmentMapping]:
        for i in range(len(self.offsets)):
            yield SegmentMapping(self.offsets[i], self.lengths[i], self.moffsets[i], bool(self.zeroed[i]),
                                 self.tags[i])

    def attach_remote(self, tar: RandomAccess) -> None:
        """Serve this warp layer's tag-1 entries from `tar` (the original layer's uncompressed tar),
        after checking that every tag-1 range lies inside it."""
        if not self.warp:
            raise FormatError(f"{self.name}: only a meta (warp) layer reads remote data")
        for i in range(len(self.offsets)):
            if self.tags[i] == 1 and (self.moffsets[i] + self.lengths[i]) * SECTOR > tar.size:
                raise FormatError(f"{self.name}: LSMT index entry (offset {self.offsets[i]}, length "
                                  f"{self.lengths[i]}, tar sector {self.moffsets[i]}) reads up to tar byte "
                                  f"{(self.moffsets[i] + self.lengths[i]) * SECTOR}, past the end of the original "
                                  f"layer's tar {tar.name} ({tar.size} bytes)")
        self.remote = tar

    def pread_data(self, byte_offset: int, length: int, tag: int = 0) -> bytes:
        """Data of an entry: tag 0 from this blob, tag 1 from the original tar (warp layers)."""
        if tag == 0:
            return self.view.pread(byte_offset, length)
        if self.remote is None:
            raise FormatError(f"{self.name}: remote data read without the original layer attached")
        return self.remote.pread(byte_offset, length)

    def close(self) -> None:
        self.view.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __enter__(self) -> LsmtLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
