"""Raw CRC32C as overlaybd computes it (reference §2.4).

overlaybd's `crc32c_extend` is the reflected Castagnoli CRC with the register initialised to the seed and
no inversion in or out. The `crc32c` package (hardware SSE4.2 / ARMv8 CRC, GIL released) computes the
standard form, which inverts the register before and after; inverting the seed going in and the result
coming out cancels both: raw(d, seed) = ~std_extend(d, prev=~seed).
"""

from __future__ import annotations

import crc32c as _crc32c

from .common import BytesLike

_MASK = 0xFFFFFFFF

ZFILE_BLOCK_CRC_SEED = 100007  # seed of the per-block CRC that follows every compressed ZFile block


def crc32c_raw(data: BytesLike, seed: int = 0) -> int:
    """CRC32C of `data` without pre-inversion or final xor, starting from register value `seed`."""
    return ~_crc32c.crc32c(data, ~seed & _MASK) & _MASK
