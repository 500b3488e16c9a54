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


def seed_words(hash_seed: bytes) -> tuple[int, int, int, int]:
    """The s_hash_seed as four words; an all-zero seed means the default MD4 constants."""
    words = struct.unpack("<4I", hash_seed)
    return DEFAULT_SEED if not any(words) else words


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


# --------------------------------------------------------------------------------------------------
# The htree hash, computed for every name of a directory at once with numpy (one pass of ~50 array
# operations per 32-byte chunk of the names, instead of ~50 Python operations per name). Checked against
# `debugfs dx_hash` in tests/test_ext4_hashing.py.


def dx_hash_many(names: list[bytes], seed: tuple[int, int, int, int] = DEFAULT_SEED) -> list[int]:
    """Major htree hashes (the kernel's half-MD4, unsigned-char variant) of many names at once."""
    import numpy as np

    count = len(names)
    if count == 0:
        return []
    lengths = np.fromiter((len(n) for n in names), dtype=np.int64, count=count)
    rounds = int(max(1, -(-int(lengths.max()) // 32)))
    width = rounds * 32
    raw = np.zeros((count, width), dtype=np.uint32)
    joined = np.frombuffer(b"".join(n.ljust(width, b"\0") for n in names), dtype=np.uint8)
    raw[:] = joined.reshape(count, width)
    buf = [np.full(count, s, dtype=np.uint32) for s in seed]
    with np.errstate(over="ignore"):
        for r in range(rounds):
            active = lengths > 32 * r if r else np.ones(count, dtype=bool)
            left = np.maximum(lengths - 32 * r, 0)  # str2hashbuf sees the remaining length
            pad = (left | (left << 8)).astype(np.uint32)
            pad = pad | (pad << np.uint32(16))
            remaining = np.minimum(left, 32)
            words = []
            for w in range(8):
                # Each word packs 4 name bytes big-endian-first on top of the pad pattern, exactly as
                # str2hashbuf's "val = c + (val << 8)" does; positions past the name keep the pad.
                val = pad.copy()
                for k in range(4):
                    pos = 4 * w + k
                    present = remaining > pos
                    val = np.where(present, (val << np.uint32(8)) + raw[:, 32 * r + pos], val)
                # A word that received no byte at all is the pad itself; a partially filled one keeps
                # the shifted pad bits, which is what the C loop leaves in `val`.
                words.append(val)
            a, b, c, d = (x.copy() for x in buf)

            def rol(x: np.ndarray, s: int) -> np.ndarray:
                return (x << np.uint32(s)) | (x >> np.uint32(32 - s))

            def f(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
                return z ^ (x & (y ^ z))

            def g(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
                return (x & y) + ((x ^ y) & z)

            def h(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
                return x ^ y ^ z

            k2, k3 = np.uint32(_K2), np.uint32(_K3)
            i = words
            a = rol(a + f(b, c, d) + i[0], 3)
            d = rol(d + f(a, b, c) + i[1], 7)
            c = rol(c + f(d, a, b) + i[2], 11)
            b = rol(b + f(c, d, a) + i[3], 19)
            a = rol(a + f(b, c, d) + i[4], 3)
            d = rol(d + f(a, b, c) + i[5], 7)
            c = rol(c + f(d, a, b) + i[6], 11)
            b = rol(b + f(c, d, a) + i[7], 19)
            a = rol(a + g(b, c, d) + i[1] + k2, 3)
            d = rol(d + g(a, b, c) + i[3] + k2, 5)
            c = rol(c + g(d, a, b) + i[5] + k2, 9)
            b = rol(b + g(c, d, a) + i[7] + k2, 13)
            a = rol(a + g(b, c, d) + i[0] + k2, 3)
            d = rol(d + g(a, b, c) + i[2] + k2, 5)
            c = rol(c + g(d, a, b) + i[4] + k2, 9)
            b = rol(b + g(c, d, a) + i[6] + k2, 13)
            a = rol(a + h(b, c, d) + i[3] + k3, 3)
            d = rol(d + h(a, b, c) + i[7] + k3, 9)
            c = rol(c + h(d, a, b) + i[2] + k3, 11)
            b = rol(b + h(c, d, a) + i[6] + k3, 15)
            a = rol(a + h(b, c, d) + i[1] + k3, 3)
            d = rol(d + h(a, b, c) + i[5] + k3, 9)
            c = rol(c + h(d, a, b) + i[0] + k3, 11)
            b = rol(b + h(c, d, a) + i[4] + k3, 15)
            for idx, add in enumerate((a, b, c, d)):
                buf[idx] = np.where(active, buf[idx] + add, buf[idx])
    major = buf[1] & np.uint32(0xFFFFFFFE)
    eof = np.uint32((EXT4_HTREE_EOF_32BIT << 1) & MASK32)
    major = np.where(major == eof, np.uint32(((EXT4_HTREE_EOF_32BIT - 1) << 1) & MASK32), major)
    return major.tolist()
