"""Hashes ext4 stores on disk: the htree directory hash (half-MD4) and the extended attribute hashes.

The directory hash decides which htree leaf a name lives in, so it must match the kernel bit for bit
(fs/ext4/hash.c). We write filesystems with the "unsigned" flag set (s_flags = EXT2_FLAGS_UNSIGNED_HASH),
so name bytes are taken as unsigned chars and the result does not depend on the build platform.
"""

from __future__ import annotations

import struct

MASK32 = 0xFFFFFFFF
DEFAULT_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_K2 = 0o13240474631
_K3 = 0o15666365641
EXT4_HTREE_EOF_32BIT = 0x7FFFFFFF


def _rol(x: int, s: int) -> int:
    x &= MASK32
    return ((x << s) | (x >> (32 - s))) & MASK32


def _half_md4_transform(buf: list[int], inp: list[int]) -> None:
    a, b, c, d = buf

    def f(x: int, y: int, z: int) -> int:
        return z ^ (x & (y ^ z))

    def g(x: int, y: int, z: int) -> int:
        return ((x & y) + ((x ^ y) & z)) & MASK32

    def h(x: int, y: int, z: int) -> int:
        return x ^ y ^ z

    # Round 1
    a = _rol(a + f(b, c, d) + inp[0], 3)
    d = _rol(d + f(a, b, c) + inp[1], 7)
    c = _rol(c + f(d, a, b) + inp[2], 11)
    b = _rol(b + f(c, d, a) + inp[3], 19)
    a = _rol(a + f(b, c, d) + inp[4], 3)
    d = _rol(d + f(a, b, c) + inp[5], 7)
    c = _rol(c + f(d, a, b) + inp[6], 11)
    b = _rol(b + f(c, d, a) + inp[7], 19)
    # Round 2
    a = _rol(a + g(b, c, d) + inp[1] + _K2, 3)
    d = _rol(d + g(a, b, c) + inp[3] + _K2, 5)
    c = _rol(c + g(d, a, b) + inp[5] + _K2, 9)
    b = _rol(b + g(c, d, a) + inp[7] + _K2, 13)
    a = _rol(a + g(b, c, d) + inp[0] + _K2, 3)
    d = _rol(d + g(a, b, c) + inp[2] + _K2, 5)
    c = _rol(c + g(d, a, b) + inp[4] + _K2, 9)
    b = _rol(b + g(c, d, a) + inp[6] + _K2, 13)
    # Round 3
    a = _rol(a + h(b, c, d) + inp[3] + _K3, 3)
    d = _rol(d + h(a, b, c) + inp[7] + _K3, 9)
    c = _rol(c + h(d, a, b) + inp[2] + _K3, 11)
    b = _rol(b + h(c, d, a) + inp[6] + _K3, 15)
    a = _rol(a + h(b, c, d) + inp[1] + _K3, 3)
    d = _rol(d + h(a, b, c) + inp[5] + _K3, 9)
    c = _rol(c + h(d, a, b) + inp[0] + _K3, 11)
    b = _rol(b + h(c, d, a) + inp[4] + _K3, 15)

    buf[0] = (buf[0] + a) & MASK32
    buf[1] = (buf[1] + b) & MASK32
    buf[2] = (buf[2] + c) & MASK32
    buf[3] = (buf[3] + d) & MASK32


def _str2hashbuf_unsigned(msg: bytes, num: int) -> list[int]:
    """Pack up to num*4 name bytes into num words, padding with a length-derived pattern."""
    length = len(msg)
    pad = (length | (length << 8)) & MASK32
    pad = (pad | (pad << 16)) & MASK32
    out: list[int] = []
    val = pad
    for i, ch in enumerate(msg[: num * 4]):
        val = (ch + (val << 8)) & MASK32
        if i % 4 == 3:
            out.append(val)
            val = pad
    if len(out) < num:
        out.append(val)
    while len(out) < num:
        out.append(pad)
    return out


def seed_words(hash_seed: bytes) -> tuple[int, int, int, int]:
    """The s_hash_seed as four words; an all-zero seed means the default MD4 constants."""
    words = struct.unpack("<4I", hash_seed)
    return DEFAULT_SEED if not any(words) else words


def dx_hash(name: bytes, seed: tuple[int, int, int, int] = DEFAULT_SEED) -> tuple[int, int]:
    """(major, minor) half-MD4 hash of a directory entry name, as the kernel computes it for htree."""
    buf = list(seed)
    p = name
    remaining = len(name)
    while True:
        _half_md4_transform(buf, _str2hashbuf_unsigned(p, 8))
        remaining -= 32
        p = p[32:]
        if remaining <= 0:
            break
    major = buf[1] & ~1 & MASK32
    if major == (EXT4_HTREE_EOF_32BIT << 1) & MASK32:
        major = ((EXT4_HTREE_EOF_32BIT - 1) << 1) & MASK32
    return major, buf[2]


# --------------------------------------------------------------------------------------------------
# Extended attribute hashes (lib/ext2fs/ext_attr.c)

_NAME_HASH_SHIFT = 5
_VALUE_HASH_SHIFT = 16
_BLOCK_HASH_SHIFT = 16


def xattr_entry_hash(name: bytes, value: bytes) -> int:
    """e_hash of one xattr entry whose value is stored in the inode or the EA block."""
    h = 0
    for ch in name:
        h = ((h << _NAME_HASH_SHIFT) ^ (h >> (32 - _NAME_HASH_SHIFT)) ^ ch) & MASK32
    padded = value + b"\0" * (-len(value) % 4)
    for (word,) in struct.iter_unpack("<I", padded):
        h = ((h << _VALUE_HASH_SHIFT) ^ (h >> (32 - _VALUE_HASH_SHIFT)) ^ word) & MASK32
    return h


def xattr_block_hash(entry_hashes: list[int]) -> int:
    """h_hash of an EA block: a rolling combination of its entries' hashes."""
    h = 0
    for eh in entry_hashes:
        if eh == 0:
            return 0
        h = ((h << _BLOCK_HASH_SHIFT) ^ (h >> (32 - _BLOCK_HASH_SHIFT)) ^ eh) & MASK32
    return h
