"""ZFile: byte-exact header layout (reference §2.2), writer output structure, reader constraints (§2.6) and
corruption detection with clear errors."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import lz4.block
import pytest

from converter.formats import zfile as zfile_module
from converter.formats.common import FileView, FormatError
from converter.formats.crc import ZFILE_BLOCK_CRC_SEED, crc32c_raw
from converter.formats.zfile import (
    ZFileHeaderTrailer,
    ZFileReader,
    ZFileWriter,
    check_jump_lengths,
    compute_digest,
    is_zfile,
)

ZERO_BLOCK_LZ4 = bytes.fromhex("1f000100" + "ff" * 15 + "f65000000000 00".replace(" ", ""))


def test_header_layout_byte_exact() -> None:
    ht = ZFileHeaderTrailer(flags=0x1B, index_offset=0x0102, index_size=3, original_file_size=0x3000,
                            index_crc=0xAABBCCDD, block_size=4096, algo=1, verify=1)
    raw = ht.pack()
    assert len(raw) == 512
    assert raw[0:8] == b"ZFile\x00\x01\x00"
    assert raw[8:24] == b"tuji.yyf@Alibaba"
    assert raw[24:28] == bytes([96, 0, 0, 0])
    assert raw[32:40] == bytes([0x1B, 0, 0, 0, 0, 0, 0, 0])
    assert raw[40:48] == bytes([0x02, 0x01, 0, 0, 0, 0, 0, 0])
    assert raw[48:56] == bytes([3, 0, 0, 0, 0, 0, 0, 0])
    assert raw[56:64] == bytes([0, 0x30, 0, 0, 0, 0, 0, 0])
    assert raw[64:68] == bytes([0xDD, 0xCC, 0xBB, 0xAA])
    assert raw[68:72] == bytes(4)
    assert raw[72:76] == bytes([0, 0x10, 0, 0])
    assert raw[76:80] == bytes([1, 0, 0, 0])  # algo LZ4, level 0, use_dict 0, padding
    assert raw[80:88] == bytes(8)  # reserved, dict_size
    assert raw[88] == 1 and raw[89:] == bytes(512 - 89)
    # digest: raw CRC32C, seed 0, over the 512 bytes with the digest field zeroed
    no_digest = raw[:28] + bytes(4) + raw[32:]
    assert raw[28:32] == struct.pack("<I", crc32c_raw(no_digest, 0))
    assert compute_digest(raw) == struct.unpack("<I", raw[28:32])[0]
    back = ZFileHeaderTrailer.unpack(raw)
    assert back.index_crc == 0xAABBCCDD and back.flags == 0x1B
    assert is_zfile(raw) and not is_zfile(ZFileHeaderTrailer(flags=0x16).pack())


def test_zero_block_compresses_like_the_base_layer() -> None:
    assert lz4.block.compress(bytes(4096), store_size=False) == ZERO_BLOCK_LZ4


def write_zfile(data: bytes, **kw: object) -> bytes:
    out = io.BytesIO()
    w = ZFileWriter(out, workers=2, **kw)
    for i in range(0, len(data), 70000):  # unaligned pieces exercise the batching
        w.write(data[i:i + 70000])
    w.close()
    return out.getvalue()


def open_zfile(tmp_path: Path, raw: bytes, **kw: object) -> ZFileReader:
    p = tmp_path / "f.zfile"
    p.write_bytes(raw)
    return ZFileReader(FileView(p), **kw)


def sample(n: int) -> bytes:
    text = b"".join(b"line %d of some text that compresses\n" % i for i in range(n // 30 + 1))
    rnd = os.urandom(n)
    return bytes(a if (i // 4096) % 2 else b for i, (a, b) in enumerate(zip(text[:n], rnd, strict=True))) \
        if n < 100_000 else (text[: n // 2] + rnd[: n - n // 2])


def test_writer_structure(tmp_path: Path) -> None:
    data = sample(3 * (1 << 20) + 1000)  # crosses several batches and ends in a short block
    raw = write_zfile(data)
    header, trailer = ZFileHeaderTrailer.unpack(raw[:512]), ZFileHeaderTrailer.unpack(raw[-512:])
    n = -(-len(data) // 4096)
    assert header.flags == 0x1B and trailer.flags == 0x16
    for ht, block in ((header, raw[:512]), (trailer, raw[-512:])):
        assert ht.digest == compute_digest(block)
        assert (ht.index_size, ht.original_file_size, ht.block_size, ht.algo, ht.verify) == (n, len(data), 4096, 1, 1)
        assert (ht.level, ht.use_dict, ht.dict_size, ht.size) == (0, 0, 0, 96)
    assert header.index_offset == trailer.index_offset and header.index_crc == trailer.index_crc
    table = raw[header.index_offset:header.index_offset + 4 * n]
    assert len(raw) == header.index_offset + 4 * n + 512
    assert crc32c_raw(table) == header.index_crc
    lengths = struct.unpack(f"<{n}I", table)
    pos = 512
    for i, length in enumerate(lengths):  # every block: raw LZ4 + raw CRC32C(seed 100007), in input order
        payload, (crc,) = raw[pos:pos + length - 4], struct.unpack("<I", raw[pos + length - 4:pos + length])
        assert crc == crc32c_raw(payload, ZFILE_BLOCK_CRC_SEED)
        assert lz4.block.decompress(payload, uncompressed_size=4096) == data[i * 4096:(i + 1) * 4096]
        pos += length
    assert pos == header.index_offset


@pytest.mark.parametrize(("algorithm", "block_size"), [("lz4", 4096), ("zstd", 4096), ("lz4", 16384),
                                                       ("zstd", 32768)])
def test_round_trip_random_access(tmp_path: Path, algorithm: str, block_size: int) -> None:
    data = sample(1 << 20) + b"tail" * 100
    zf = open_zfile(tmp_path, write_zfile(data, algorithm=algorithm, block_size=block_size))
    try:
        assert zf.size == len(data) and zf.info.algo == (1 if algorithm == "lz4" else 2)
        assert zf.pread(0, len(data)) == data
        for off, n in ((0, 1), (4095, 2), (5000, 70000), (len(data) - 3, 3), (123456, 0)):
            assert zf.pread(off, n) == data[off:off + n]
        assert zf.verify_all_blocks() == zf.blocks
        with pytest.raises(FormatError, match=r"outside"):
            zf.pread(len(data) - 1, 2)
    finally:
        zf.close()


def test_empty_input(tmp_path: Path) -> None:
    zf = open_zfile(tmp_path, write_zfile(b""))
    assert (zf.size, zf.blocks, zf.pread(0, 0)) == (0, 0, b"")


def test_reader_accepts_any_valid_lz4_block_and_trailer_only_info(tmp_path: Path) -> None:
    """A hand-built ZFile: one literal-only LZ4 block, header without the overwrite bit and digest, so the info
    comes from the trailer. Literal length 4096 = 15 (token F0) + 16 x 255 (FF) + 1 (01); reference §2.5
    says the last length byte is 0x10, which would mean 4111 literals and does not decode."""
    data = os.urandom(4096)
    block = b"\xf0" + b"\xff" * 16 + b"\x01" + data
    block += struct.pack("<I", crc32c_raw(block, ZFILE_BLOCK_CRC_SEED))
    table = struct.pack("<I", len(block))
    info = dict(index_offset=512 + len(block), index_size=1, original_file_size=4096,
                index_crc=crc32c_raw(table))
    raw = ZFileHeaderTrailer(flags=0x3).pack() + block + table + ZFileHeaderTrailer(flags=0x16, **info).pack()
    zf = open_zfile(tmp_path, raw)
    assert zf.info_source == "trailer" and zf.pread(0, 4096) == data


def test_jump_table_group_rule() -> None:
    check_jump_lengths(array_of([4132] * 16), 0, 4096, True, "t")  # LZ4 worst case fits
    # one long block: 15 of them could break the rule, so every group is summed; none does
    check_jump_lengths(array_of([60000] + [300] * 14 + [4000] * 17), 0, 4096, True, "t")
    with pytest.raises(FormatError, match=r"blocks 0..14 store 65600 bytes"):
        check_jump_lengths(array_of([61400] + [300] * 14), 0, 4096, True, "t")
    with pytest.raises(FormatError, match=r"blocks 16..30 store 65535 bytes"):
        check_jump_lengths(array_of([4096] * 16 + [4369] * 15 + [5]), 0, 4096, True, "t")
    with pytest.raises(FormatError, match=r"block 2 has stored length 4"):
        check_jump_lengths(array_of([10, 10, 4]), 0, 4096, True, "t")


def array_of(values: list[int]):
    from array import array
    return array("I", values)


def test_incompressible_64k_block_is_refused() -> None:
    w = ZFileWriter(io.BytesIO(), block_size=65536, workers=1)
    w.write(os.urandom(65536))
    with pytest.raises(FormatError, match=r"block 0 has stored length"):
        w.close()


def test_writer_rejects_bad_options() -> None:
    with pytest.raises(FormatError, match=r"algorithm"):
        ZFileWriter(io.BytesIO(), algorithm="gzip")
    with pytest.raises(FormatError, match=r"power of two"):
        ZFileWriter(io.BytesIO(), block_size=6000)


# ---- corruption: every case names what is wrong, none returns data


@pytest.fixture
def good(tmp_path: Path) -> tuple[bytes, bytes]:
    data = sample(200_000)
    return data, write_zfile(data)


def flip(raw: bytes, pos: int) -> bytes:
    return raw[:pos] + bytes([raw[pos] ^ 0x40]) + raw[pos + 1:]


def test_flipped_byte_in_compressed_block(tmp_path: Path, good: tuple[bytes, bytes]) -> None:
    data, raw = good
    zf = open_zfile(tmp_path, flip(raw, 512 + 3 * 4096 + 100))
    assert zf.pread(0, 4096) == data[:4096]  # blocks before the damage still read
    with pytest.raises(FormatError, match=r"ZFile block \d+ .*CRC32C mismatch"):
        zf.pread(0, len(data))


def test_flipped_byte_in_crc_itself(tmp_path: Path, good: tuple[bytes, bytes]) -> None:
    _, raw = good
    header = ZFileHeaderTrailer.unpack(raw[:512])
    first_len = struct.unpack("<I", raw[header.index_offset:header.index_offset + 4])[0]
    zf = open_zfile(tmp_path, flip(raw, 512 + first_len - 1))
    with pytest.raises(FormatError, match=r"ZFile block 0 .*CRC32C mismatch"):
        zf.pread(0, 10)


def test_flipped_byte_in_jump_table(tmp_path: Path, good: tuple[bytes, bytes]) -> None:
    _, raw = good
    header = ZFileHeaderTrailer.unpack(raw[:512])
    with pytest.raises(FormatError, match=r"jump table: index_crc mismatch"):
        open_zfile(tmp_path, flip(raw, header.index_offset + 5))


def test_flipped_byte_in_header(tmp_path: Path, good: tuple[bytes, bytes]) -> None:
    _, raw = good
    with pytest.raises(FormatError, match=r"ZFile header \(at byte 0\): digest mismatch"):
        open_zfile(tmp_path, flip(raw, 41))
    with pytest.raises(FormatError, match=r"ZFile header .*bad magic"):
        open_zfile(tmp_path, flip(raw, 2))


def test_truncated_zfile(tmp_path: Path, good: tuple[bytes, bytes]) -> None:
    _, raw = good
    with pytest.raises(FormatError, match=r"beyond the end .*truncated"):
        open_zfile(tmp_path, raw[:len(raw) // 2])


def test_block_crc_checked_only_on_demand(tmp_path: Path, good: tuple[bytes, bytes]) -> None:
    data, raw = good
    header = ZFileHeaderTrailer.unpack(raw[:512])
    first_len = struct.unpack("<I", raw[header.index_offset:header.index_offset + 4])[0]
    damaged = flip(raw, 512 + first_len - 1)  # only the stored CRC of block 0 is wrong
    assert open_zfile(tmp_path, damaged, verify_blocks=False).pread(0, 4096) == data[:4096]


def test_writev_resumes_after_partial_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short writes (allowed for any write syscall) must not lose or repeat bytes."""
    real_writev = os.writev

    def short_writev(fd: int, buffers: list[bytes]) -> int:
        return real_writev(fd, [bytes(memoryview(b"".join(bytes(x) for x in buffers))[:7])])

    monkeypatch.setattr(zfile_module.os, "writev", short_writev)
    monkeypatch.setattr(zfile_module, "_IOV_MAX", 3)
    parts = [os.urandom(n) for n in (1, 50, 3, 700, 2, 9, 7, 14)]
    path = tmp_path / "wv.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        zfile_module._writev_all(fd, parts)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(parts)


def test_without_block_crcs(tmp_path: Path) -> None:
    data = sample(300_000)
    raw = write_zfile(data, verify=False)
    header = ZFileHeaderTrailer.unpack(raw[:512])
    assert header.verify == 0
    first = struct.unpack("<I", raw[header.index_offset:header.index_offset + 4])[0]
    assert lz4.block.decompress(raw[512:512 + first], uncompressed_size=4096) == data[:4096]  # no CRC after it
    zf = open_zfile(tmp_path, raw)
    assert zf.pread(0, len(data)) == data
