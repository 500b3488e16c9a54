"""The htree name hash must equal the kernel's bit for bit; debugfs's `dx_hash` (e2fsprogs' own
implementation) is the judge. Version 4 is half-MD4 over unsigned chars, which our filesystems declare."""

from __future__ import annotations

import random
import re
import struct
import subprocess
import uuid

import pytest

from converter.ext4.hashing import dx_hash_many, seed_words

NAMES = [
    b"a",
    b"lost+found",
    b"x" * 31,
    b"y" * 32,
    b"z" * 33,
    b"w" * 64,
    b"v" * 65,
    b"n" * 255,
    "é名前".encode(),
    bytes(range(0x80, 0xC0)),
    b"file_0001_with_a_long_name_to_fill_dir_blocks",
]


def debugfs_hashes(names: list[bytes], seed: str | None) -> list[int]:
    script = "".join(f"dx_hash -h 4 {'-s ' + seed + ' ' if seed else ''}{name.decode('latin-1')}\n" for name in names)
    out = subprocess.run(["debugfs", "-f", "-", "/dev/null"], input=script.encode("latin-1"),
                         capture_output=True, check=True).stdout.decode("latin-1")  # fmt: skip
    hashes = [int(h, 16) for h in re.findall(r"Hash of .* is 0x([0-9a-f]+) ", out)]
    assert len(hashes) == len(names), out
    return hashes


@pytest.mark.parametrize("seed", [None, "5d0b1bd2-4dd8-42c4-9e3f-0123456789ab"])
def test_htree_hash_matches_e2fsprogs(seed: str | None) -> None:
    rng = random.Random(7)
    # Printable, space-free names (debugfs takes the name as one argument) of every length class.
    alphabet = bytes(c for c in range(0x21, 0x7F) if c not in b"\"'\\") + bytes(range(0xA0, 0x100))
    names = NAMES + [bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 256))) for _ in range(300)]
    words = seed_words(uuid.UUID(seed).bytes) if seed else seed_words(bytes(16))
    assert dx_hash_many(names, words) == debugfs_hashes(names, seed)


def test_zero_seed_means_the_default_constants() -> None:
    assert seed_words(bytes(16)) == (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
    assert seed_words(struct.pack("<4I", 1, 2, 3, 4)) == (1, 2, 3, 4)
