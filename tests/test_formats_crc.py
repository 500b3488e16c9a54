"""Raw CRC32C (reference §2.4) against an independent bit-by-bit implementation and the real vectors."""

from __future__ import annotations

import struct

import crc32c
from hypothesis import given
from hypothesis import strategies as st

from converter.formats.common import FileView
from converter.formats.crc import ZFILE_BLOCK_CRC_SEED, crc32c_raw
from converter.formats.zfile import ZFileReader
from tests.formats_helpers import BASE_ZFILE, needs_vectors


def bitwise_raw_crc32c(data: bytes, seed: int) -> int:
    """Textbook reflected CRC with polynomial 0x82F63B78, register = seed, no inversion in or out."""
    reg = seed
    for byte in data:
        reg ^= byte
        for _ in range(8):
            reg = (reg >> 1) ^ (0x82F63B78 if reg & 1 else 0)
    return reg


def test_standard_check_value_relation() -> None:
    # the iSCSI check value of "123456789" is 0xE3069283; std(d) = raw(d, ~0) ^ ~0
    assert crc32c.crc32c(b"123456789") == 0xE3069283
    assert crc32c_raw(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283
    assert bitwise_raw_crc32c(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283


def test_empty_input_returns_the_seed() -> None:
    assert crc32c_raw(b"", 0) == 0
    assert crc32c_raw(b"", ZFILE_BLOCK_CRC_SEED) == ZFILE_BLOCK_CRC_SEED


@given(st.binary(max_size=300), st.integers(0, 0xFFFFFFFF))
def test_matches_bitwise_reference(data: bytes, seed: int) -> None:
    assert crc32c_raw(data, seed) == bitwise_raw_crc32c(data, seed)


@needs_vectors
def test_block_crcs_of_the_official_base_layer() -> None:
    """The first stored block of ext4_64 and its trailing CRC: raw CRC32C, seed 100007."""
    fv = FileView(BASE_ZFILE)
    try:
        zf = ZFileReader(fv)
        for block in (0, 1, zf.blocks - 1):
            start, end = zf.offsets[block], zf.offsets[block + 1]
            raw = fv.pread(start, end - start)
            (stored,) = struct.unpack("<I", raw[-4:])
            assert bitwise_raw_crc32c(raw[:-4], ZFILE_BLOCK_CRC_SEED) == stored
            assert crc32c_raw(raw[:-4], ZFILE_BLOCK_CRC_SEED) == stored
    finally:
        fv.close()
