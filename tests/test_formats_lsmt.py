"""LSMT layer blobs: byte-exact layouts (reference §1.2-1.4), the streaming writer's index building, and every
reader check of §1.5 with a clear error."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from converter.formats.common import FileView, FormatError
from converter.formats.lsmt import (
    INVALID_OFFSET,
    PADDING_ENTRY,
    LsmtHeaderTrailer,
    LsmtLayer,
    LsmtWriter,
    SegmentMapping,
    normalize_uuid,
    pack_entry,
)

MiB = 1 << 20


def test_header_layout_byte_exact() -> None:
    ht = LsmtHeaderTrailer(flags=7, index_offset=0x1122, index_size=0x33, virtual_size=64 << 30,
                           uuid="C02FB491-B4D4-4904-8684-A014D032AF78", user_tag=b"msg")
    raw = ht.pack()
    assert len(raw) == 4096
    assert raw[0:8] == b"LSMT\x00\x01\x02\x00"
    assert raw[8:24] == bytes([0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF,
                               0xAE, 0x8A])
    assert raw[24:28] == bytes([0x86, 0x01, 0, 0])  # size 390
    assert raw[28:32] == bytes([7, 0, 0, 0])
    assert raw[32:40] == bytes([0x22, 0x11, 0, 0, 0, 0, 0, 0])
    assert raw[40:48] == bytes([0x33, 0, 0, 0, 0, 0, 0, 0])
    assert raw[48:56] == bytes([0, 0, 0, 0, 0x10, 0, 0, 0])  # 2**36
    assert raw[56:93] == b"C02FB491-B4D4-4904-8684-A014D032AF78\x00"
    assert raw[93:130] == b"00000000-0000-0000-0000-000000000000\x00"
    assert raw[130:132] == b"\x00\x00"
    assert raw[132:134] == b"\x01\x01"
    assert raw[134:137] == b"msg" and raw[137:390] == bytes(253)
    assert raw[390:] == bytes(4096 - 390)
    assert LsmtHeaderTrailer.unpack(raw) == ht


def test_entry_layout_byte_exact() -> None:
    # offset 0x123 sectors, length 8, moffset 8, data: lo = 0x123 | 8 << 50, hi = 8
    assert pack_entry(0x123, 8, 8, False) == bytes([0x23, 0x01, 0, 0, 0, 0, 0x20, 0]) + bytes([8, 0, 0, 0, 0, 0, 0, 0])
    # max length 16383 sits in the top 14 bits; zeroed is bit 55 of the second word
    assert pack_entry(0, 16383, 8296, True) == bytes([0, 0, 0, 0, 0, 0, 0xFC, 0xFF]) + \
        bytes([0x68, 0x20, 0, 0, 0, 0, 0x80, 0])
    assert bytes([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x03, 0]) + bytes(8) == PADDING_ENTRY
    e = SegmentMapping.unpack(pack_entry(5, 3, 77, True, tag=9))
    assert (e.offset, e.length, e.moffset, e.zeroed, e.tag) == (5, 3, 77, True, 9)
    assert SegmentMapping.unpack(PADDING_ENTRY).offset == INVALID_OFFSET


def test_uuid_normalisation() -> None:
    assert normalize_uuid("185d10db-2adb-181a-af87-e0708ba96ad9") == "185D10DB-2ADB-181A-AF87-E0708BA96AD9"
    assert normalize_uuid(None) == "00000000-0000-0000-0000-000000000000"
    for bad in ("185d10db2adb181aaf87e0708ba96ad9", "185d10db-2adb-181a-af87-e0708ba96adz", ""):
        with pytest.raises(FormatError, match=r"invalid UUID"):
            normalize_uuid(bad)


def write_bare(ops: list[tuple[str, int, bytes | int]], vsize: int = 64 * MiB, **kw: object) -> bytes:
    out = io.BytesIO()
    w = LsmtWriter(out.write, virtual_size=vsize, **kw)
    for op, off, arg in ops:
        if op == "w":
            w.write(off, arg)
        else:
            w.zero(off, arg)
    w.close()
    return out.getvalue()


def entries_of(blob: bytes) -> list[tuple[int, int, int, bool]]:
    t = LsmtHeaderTrailer.unpack(blob[-4096:])
    raw = blob[t.index_offset:t.index_offset + 16 * t.index_size]
    out = []
    for i in range(t.index_size):
        e = SegmentMapping.unpack(raw[16 * i:16 * i + 16])
        if e.offset != INVALID_OFFSET:
            out.append((e.offset, e.length, e.moffset, e.zeroed))
    return out


def test_writer_layout_arrival_order_and_index() -> None:
    a, b, c = b"A" * 4096, b"B" * 8192, b"C" * 512
    blob = write_bare([("w", 100 * 512, a), ("w", 10 * 512, b), ("z", 200 * 512, 4096), ("w", 108 * 512, c)],
                      uuid="185d10db-2adb-181a-af87-e0708ba96ad9", user_tag=b"hello")
    h, t = LsmtHeaderTrailer.unpack(blob[:4096]), LsmtHeaderTrailer.unpack(blob[-4096:])
    assert (h.flags, h.index_offset, h.index_size) == (7, 0, 0)
    assert (t.flags, t.index_size) == (6, 256)
    assert h.uuid == t.uuid == "185D10DB-2ADB-181A-AF87-E0708BA96AD9" and h.user_tag == b"hello"
    # data in arrival order from byte 4096: A (sectors 8..16), B (16..32), C (32..33)
    assert blob[4096:4096 + 4096] == a and blob[8192:8192 + 8192] == b and blob[16384:16384 + 512] == c
    assert t.index_offset == 16384 + 512
    assert len(blob) == t.index_offset + 256 * 16 + 4096
    # sorted by LBA; C continues A in LBA and in moffset? A ends at moffset 16, C is at 32: two entries.
    # the zeroed entry stores the data cursor at the time of zero() (32, after B)
    assert entries_of(blob) == [(10, 16, 16, False), (100, 8, 8, False), (108, 1, 32, False), (200, 8, 32, True)]


def test_writer_coalesces_contiguous_writes_and_splits_long_runs() -> None:
    chunk = bytes(range(256)) * 16 * 256  # 1 MiB
    blob = write_bare([("w", i * MiB, chunk) for i in range(10)])
    # 10 MiB = 20480 sectors in one run, split at 16376 (largest 4K multiple <= 16383)
    assert entries_of(blob) == [(0, 16376, 8, False), (16376, 4104, 8 + 16376, False)]
    blob = write_bare([("z", 0, 20 * MiB)])
    assert entries_of(blob) == [(0, 16376, 8, True), (16376, 16376, 8, True), (32752, 8208, 8, True)]


def test_writer_rewrites_last_write_wins() -> None:
    blob = write_bare([("w", 0, b"1" * 16384), ("w", 4096, b"2" * 4096), ("z", 8192, 4096),
                       ("w", 8192 + 512, b"3" * 512)])
    # 1: sectors 0..32 at moffset 8; 2: sectors 8..16 at moffset 40; zero 16..24; 3: sector 17 at moffset 48
    assert entries_of(blob) == [(0, 8, 8, False), (8, 8, 40, False), (16, 1, 48, True), (17, 1, 48, False),
                                (18, 6, 48, True), (24, 8, 32, False)]


def test_writer_rejects_bad_requests() -> None:
    w = LsmtWriter(io.BytesIO().write, virtual_size=MiB)
    with pytest.raises(FormatError, match=r"multiples of 512"):
        w.write(100, b"x" * 512)
    with pytest.raises(FormatError, match=r"multiples of 512"):
        w.write(0, b"x" * 100)
    with pytest.raises(FormatError, match=r"beyond the virtual size"):
        w.zero(MiB - 512, 1024)
    with pytest.raises(FormatError, match=r"virtual_size"):
        LsmtWriter(io.BytesIO().write, virtual_size=1000)
    with pytest.raises(FormatError, match=r"user_tag"):
        LsmtWriter(io.BytesIO().write, virtual_size=MiB, user_tag=b"x" * 256)


def test_writer_memory_follows_runs_not_data() -> None:
    w = LsmtWriter(lambda _d: None, virtual_size=1 << 40)
    block = bytes(4096)
    for i in range(5000):  # 20 MB of contiguous data in 4 KiB writes: one record
        w.write(i * 4096, block)
    assert len(w._lbas) == 1
    w.write(0, block)  # a rewrite opens a new run
    assert len(w._lbas) == 2


def test_index_too_large_is_refused() -> None:
    # one zeroed run long enough to need more than 1,000,000 entries of 16376 sectors
    w = LsmtWriter(lambda _d: None, virtual_size=1 << 60)
    w.zero(0, 16376 * 512 * 1_000_001)
    with pytest.raises(FormatError, match=r"too fragmented"):
        w.close()


# ---- reader checks (§1.5), each on a valid blob with one field broken


def open_bytes(tmp_path: Path, blob: bytes) -> LsmtLayer:
    p = tmp_path / "layer.lsmt"
    p.write_bytes(blob)
    return LsmtLayer(FileView(p))


@pytest.fixture
def valid_blob() -> bytes:
    return write_bare([("w", 0, b"a" * 4096), ("w", 8192, b"b" * 4096), ("z", 65536, 8192)])


def patch(blob: bytes, offset: int, data: bytes) -> bytes:
    return blob[:offset] + data + blob[offset + len(data):]


def trailer_of(blob: bytes) -> tuple[int, LsmtHeaderTrailer]:
    return len(blob) - 4096, LsmtHeaderTrailer.unpack(blob[-4096:])


def test_reader_accepts_valid(tmp_path: Path, valid_blob: bytes) -> None:
    with open_bytes(tmp_path, valid_blob) as layer:
        assert [(e.offset, e.length, e.zeroed) for e in layer.iter_entries()] == \
            [(0, 8, False), (16, 8, False), (128, 16, True)]
        assert layer.padding_entries == 253


@pytest.mark.parametrize(("offset", "data", "message"), [
    (0, b"XSMT", "header: bad magic"),
    (28, struct.pack("<I", 5), "header: flags 0x5 lacks the data-file bit"),
    (28, struct.pack("<I", 6), "header: flags 0x6 has the header bit clear"),
])
def test_reader_header_checks(tmp_path: Path, valid_blob: bytes, offset: int, data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        open_bytes(tmp_path, patch(valid_blob, offset, data))


@pytest.mark.parametrize(("field_offset", "value", "message"), [
    (28, 7, "trailer .*flags 0x7 has the header bit set"),
    (28, 2, "trailer .*flags 0x2 lacks the sealed bit"),
    (28, 4, "trailer .*flags 0x4 lacks the data-file bit"),
    (40, 1_000_001, "index_size 1000001 exceeds MAX_LSMT_RO_INDEX_SIZE"),
    (40, 257, "does not fit between header and trailer"),
])
def test_reader_trailer_checks(tmp_path: Path, valid_blob: bytes, field_offset: int, value: int,
                               message: str) -> None:
    pos, _ = trailer_of(valid_blob)
    fmt = "<I" if field_offset == 28 else "<Q"
    with pytest.raises(FormatError, match=message):
        open_bytes(tmp_path, patch(valid_blob, pos + field_offset, struct.pack(fmt, value)))


def test_reader_needs_room_for_trailer(tmp_path: Path, valid_blob: bytes) -> None:
    with pytest.raises(FormatError, match=r"too small"):
        open_bytes(tmp_path, valid_blob[:8000])


def test_reader_rejects_truncated_blob(tmp_path: Path, valid_blob: bytes) -> None:
    # cut in the middle: the "trailer" read at size-4096 is data, not a trailer
    with pytest.raises(FormatError, match=r"trailer .*bad magic"):
        open_bytes(tmp_path, valid_blob[:-4096])


@pytest.mark.parametrize(("entry_no", "entry", "message"), [
    (1, pack_entry(4, 8, 16, False), "entry 1 .*not sorted / overlaps entry 0"),
    (1, pack_entry(0, 1, 16, False), "entry 1 .*not sorted"),
    (0, pack_entry(0, 8, 7, False), "entry 0 .*data outside the data section"),
    (0, pack_entry(0, 8, 20, False), "entry 0 .*data outside the data section"),  # ends past index_offset
    (2, pack_entry(128, 16, 0, True), "entry 2 .*zeroed entry moffset outside"),
    (2, pack_entry(128, 16, 25, True), "entry 2 .*zeroed entry moffset outside"),
])
def test_reader_index_checks(tmp_path: Path, valid_blob: bytes, entry_no: int, entry: bytes, message: str) -> None:
    _, t = trailer_of(valid_blob)
    assert t.index_offset == 4096 + 8192  # data section is sectors 8..24
    with pytest.raises(FormatError, match=message):
        open_bytes(tmp_path, patch(valid_blob, t.index_offset + 16 * entry_no, entry))


def test_reader_zeroed_entry_at_upper_moffset_bound_is_fine(tmp_path: Path, valid_blob: bytes) -> None:
    _, t = trailer_of(valid_blob)
    with open_bytes(tmp_path, patch(valid_blob, t.index_offset + 32, pack_entry(128, 16, 24, True))) as layer:
        assert len(layer) == 3


def test_reader_drops_padding_anywhere(tmp_path: Path, valid_blob: bytes) -> None:
    _, t = trailer_of(valid_blob)
    with open_bytes(tmp_path, patch(valid_blob, t.index_offset + 16, PADDING_ENTRY)) as layer:
        assert [e.offset for e in layer.iter_entries()] == [0, 128]
