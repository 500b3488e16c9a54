"""Allocation bitmaps with next-fit search.

ext4 bitmaps are little-endian bit arrays: bit i lives in byte i >> 3 at position i & 7. The whole
filesystem's block bitmap is one bytearray (2 MiB for 64 GiB), so a group's on-disk bitmap block is a
slice of it. Searches skip whole full or empty bytes with compiled regular expressions, which run in C.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_NOT_FULL = re.compile(rb"[^\xff]")
_NOT_EMPTY = re.compile(rb"[^\x00]")


class Bitmap:
    def __init__(self, nbits: int, nbytes: int | None = None) -> None:
        self.nbits = nbits
        self.bits = bytearray(nbytes if nbytes is not None else (nbits + 7) >> 3)

    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def set_range(self, start: int, count: int, value: bool = True) -> None:
        end = start + count
        bits = self.bits
        while start < end and start & 7:
            self._set_bit(start, value)
            start += 1
        whole_end = end & ~7
        if start < whole_end:
            bits[start >> 3 : whole_end >> 3] = (b"\xff" if value else b"\x00") * ((whole_end - start) >> 3)
            start = whole_end
        while start < end:
            self._set_bit(start, value)
            start += 1

    def _set_bit(self, i: int, value: bool) -> None:
        if value:
            self.bits[i >> 3] |= 1 << (i & 7)
        else:
            self.bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def find_clear(self, start: int, end: int) -> int | None:
        """First clear bit in [start, end), or None."""
        return self._find(start, end, _NOT_FULL, want_set=False)

    def find_set(self, start: int, end: int) -> int | None:
        """First set bit in [start, end), or None."""
        return self._find(start, end, _NOT_EMPTY, want_set=True)

    def _find(self, start: int, end: int, skip: re.Pattern[bytes], want_set: bool) -> int | None:
        bits = self.bits
        pos = start
        while pos < end:
            byte_index = pos >> 3
            byte = bits[byte_index]
            for bit in range(pos & 7, 8):
                if bool(byte >> bit & 1) == want_set:
                    found = (byte_index << 3) | bit
                    return found if found < end else None
            m = skip.search(bits, byte_index + 1, (end + 7) >> 3)
            if m is None:
                return None
            pos = m.start() << 3
        return None

    def find_last_set(self, start: int, end: int) -> int | None:
        """Last set bit in [start, end), or None."""
        pos = end - 1
        while pos >= start:
            if pos & 7 == 7 and pos - 7 >= start and self.bits[pos >> 3] == 0:
                pos -= 8
                continue
            if self.test(pos):
                return pos
            pos -= 1
        return None

    def count_set(self, start_byte: int, end_byte: int) -> int:
        return int.from_bytes(self.bits[start_byte:end_byte], "little").bit_count()


class BitSet:
    """A set of small non-negative ints (inode numbers) as a bitmap: 1 bit per possible member instead of
    a hash-table slot and an int object (~40 bytes) per member. Iterates in ascending order."""

    def __init__(self, nbits: int) -> None:
        self.nbits = nbits
        self.bits = bytearray((nbits + 7) >> 3)

    def add(self, i: int) -> None:
        self.bits[i >> 3] |= 1 << (i & 7)

    def update(self, values: Iterable[int]) -> None:
        for i in values:
            self.bits[i >> 3] |= 1 << (i & 7)

    def discard(self, i: int) -> None:
        self.bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and 0 <= i < self.nbits and bool(self.bits[i >> 3] >> (i & 7) & 1)

    def __iter__(self) -> Iterator[int]:
        bits = self.bits
        for m in _NOT_EMPTY.finditer(bits):
            pos = m.start()
            byte = bits[pos]
            base = pos << 3
            for bit in range(8):
                if byte >> bit & 1:
                    yield base | bit

    def __bool__(self) -> bool:
        return _NOT_EMPTY.search(self.bits) is not None

    def clear(self) -> None:
        self.bits = bytearray(len(self.bits))
