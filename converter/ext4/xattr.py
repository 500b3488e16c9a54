"""Extended attributes on disk: the in-inode area, the EA block, and POSIX ACLs in ext4's own form.

Layout (Documentation/filesystems/ext4/attributes.rst): a 4-byte magic, then entries
{e_name_len u8, e_name_index u8, e_value_offs u16, e_value_inum u32, e_value_size u32, e_hash u32, name},
each padded to 4 bytes and ended by four zero bytes; values are packed from the end of the area downwards.
In the inode, value offsets count from the first entry; in an EA block, from the start of the block.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import shorten
from .hashing import xattr_block_hash, xattr_entry_hash
from .layout import BLOCK_SIZE, INODE_SIZE, INODE_XATTR_OFFSET

XATTR_MAGIC = 0xEA020000
ENTRY_HEADER = struct.Struct("<BBHIII")  # name_len name_index value_offs value_inum value_size hash
BLOCK_HEADER = struct.Struct("<IIIII12x")  # magic refcount blocks hash checksum reserved[3]
INODE_AREA_SIZE = INODE_SIZE - INODE_XATTR_OFFSET  # 96 bytes, the 4-byte magic included

# Name prefixes and their e_name_index (lib/ext2fs/ext_attr.c). Longest prefixes first so that
# "system.posix_acl_access" wins over "system.".
_INDEX_OF_PREFIX: list[tuple[str, int]] = [
    ("system.posix_acl_access", 2),
    ("system.posix_acl_default", 3),
    ("system.richacl", 8),
    ("user.", 1),
    ("trusted.", 4),
    ("security.", 6),
    ("system.", 7),
]
_PREFIX_OF_INDEX = {index: prefix for prefix, index in _INDEX_OF_PREFIX}

# POSIX ACLs: the Linux xattr form (version 2, 8-byte entries) vs ext4's on-disk form (version 1,
# 4-byte entries for the owner/group-owner/mask/other tags, 8-byte entries with an id for named ones).
POSIX_ACL_XATTR_VERSION = 2
EXT4_ACL_VERSION = 1
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_ACL_TAGS = {ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER}


class XattrError(ValueError):
    """An extended attribute that cannot be stored (unknown namespace, malformed ACL, too large).
    The message is shortened: a PAX record may name an attribute of up to 1 MiB."""

    def __init__(self, message: str) -> None:
        super().__init__(shorten(message))


@dataclass(frozen=True)
class XattrEntry:
    index: int
    name: bytes  # without the prefix
    value: bytes

    @property
    def entry_size(self) -> int:
        return (ENTRY_HEADER.size + len(self.name) + 3) & ~3

    @property
    def value_size(self) -> int:
        return (len(self.value) + 3) & ~3

    @property
    def hash(self) -> int:
        return xattr_entry_hash(self.name, self.value)


def split_name(full_name: str) -> tuple[int, bytes]:
    for prefix, index in _INDEX_OF_PREFIX:
        if full_name.startswith(prefix):
            if index in (2, 3, 8) and full_name != prefix:
                continue
            return index, full_name[len(prefix) :].encode("utf-8", "surrogateescape")
    raise XattrError(f"unsupported extended attribute namespace: {full_name!r}")


def full_name(index: int, name: bytes) -> str:
    return _PREFIX_OF_INDEX[index] + name.decode("utf-8", "surrogateescape")


def acl_xattr_to_disk(value: bytes) -> bytes:
    """Convert a POSIX ACL from the Linux xattr form (as tar carries it) to ext4's on-disk form."""
    if len(value) < 4 or (len(value) - 4) % 8:
        raise XattrError(f"malformed POSIX ACL: {len(value)} bytes")
    (version,) = struct.unpack_from("<I", value)
    if version != POSIX_ACL_XATTR_VERSION:
        raise XattrError(f"malformed POSIX ACL: version {version}, expected {POSIX_ACL_XATTR_VERSION}")
    out = [struct.pack("<I", EXT4_ACL_VERSION)]
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        if tag not in _ACL_TAGS:
            raise XattrError(f"malformed POSIX ACL: unknown tag {tag:#x}")
        out.append(
            struct.pack("<HHI", tag, perm, ident) if tag in (ACL_USER, ACL_GROUP) else struct.pack("<HH", tag, perm)
        )
    return b"".join(out)


def acl_disk_to_xattr(value: bytes) -> bytes:
    """Inverse of acl_xattr_to_disk (used when reading a filesystem back)."""
    (version,) = struct.unpack_from("<I", value)
    if version != EXT4_ACL_VERSION:
        raise XattrError(f"malformed ext4 ACL: version {version}")
    out = [struct.pack("<I", POSIX_ACL_XATTR_VERSION)]
    pos = 4
    while pos < len(value):
        tag, perm = struct.unpack_from("<HH", value, pos)
        if tag in (ACL_USER, ACL_GROUP):
            (ident,) = struct.unpack_from("<I", value, pos + 4)
            pos += 8
        else:
            ident, pos = 0xFFFFFFFF, pos + 4
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)


def to_entries(xattrs: Mapping[str, bytes]) -> list[XattrEntry]:
    """Disk entries for a name -> value map, ACLs converted, sorted as ext4 keeps them in a block."""
    entries = []
    for name, value in xattrs.items():
        index, short = split_name(name)
        if index in (2, 3):
            value = acl_xattr_to_disk(value)
        if len(short) > 255:
            raise XattrError(f"extended attribute name too long: {name!r}")
        entries.append(XattrEntry(index, short, value))
    entries.sort(key=lambda e: (e.index, len(e.name), e.name))
    return entries


def _pack_area(entries: list[XattrEntry], area_size: int, values_base: int) -> bytes | None:
    """Entries from offset 0 of the area, values from its end; None if they do not fit."""
    table = sum(e.entry_size for e in entries) + 4
    values = sum(e.value_size for e in entries)
    if table + values > area_size:
        return None
    buf = bytearray(area_size)
    pos, value_end = 0, area_size
    for e in entries:
        value_end -= e.value_size
        offs = value_end + values_base if e.value else 0
        ENTRY_HEADER.pack_into(buf, pos, len(e.name), e.index, offs, 0, len(e.value), e.hash)
        buf[pos + ENTRY_HEADER.size : pos + ENTRY_HEADER.size + len(e.name)] = e.name
        buf[value_end : value_end + len(e.value)] = e.value
        pos += e.entry_size
    return bytes(buf)


def pack_inode_area(entries: list[XattrEntry]) -> bytes | None:
    """The in-inode xattr area (magic included), or None when the entries do not fit there."""
    if not entries:
        return b""
    # Values are addressed relative to the first entry, which follows the 4-byte magic.
    body = _pack_area(entries, INODE_AREA_SIZE - 4, 0)
    return None if body is None else struct.pack("<I", XATTR_MAGIC) + body


def pack_block(entries: list[XattrEntry]) -> bytes:
    """A whole EA block (refcount 1) for entries that do not fit in the inode."""
    body = _pack_area(entries, BLOCK_SIZE - BLOCK_HEADER.size, BLOCK_HEADER.size)
    if body is None:
        size = sum(e.entry_size + e.value_size for e in entries)
        raise XattrError(f"extended attributes too large: {size} bytes, at most {BLOCK_SIZE - 36} fit")
    block_hash = xattr_block_hash([e.hash for e in entries])
    return BLOCK_HEADER.pack(XATTR_MAGIC, 1, 1, block_hash, 0) + body


def unpack_area(area: bytes, values_base: int, start: int) -> dict[str, bytes]:
    """Read entries starting at `start` of `area`; value offsets are relative to values_base."""
    out: dict[str, bytes] = {}
    pos = start
    while pos + 4 <= len(area) and struct.unpack_from("<I", area, pos)[0] != 0:
        name_len, index, offs, _inum, size, _hash = ENTRY_HEADER.unpack_from(area, pos)
        name = bytes(area[pos + ENTRY_HEADER.size : pos + ENTRY_HEADER.size + name_len])
        value = bytes(area[values_base + offs : values_base + offs + size])
        if index in (2, 3):
            value = acl_disk_to_xattr(value)
        out[full_name(index, name)] = value
        pos += (ENTRY_HEADER.size + name_len + 3) & ~3
    return out


def unpack_inode_area(area: bytes) -> dict[str, bytes]:
    if len(area) < 4 or struct.unpack_from("<I", area)[0] != XATTR_MAGIC:
        return {}
    return unpack_area(area, 4, 4)


def unpack_block(block: bytes) -> dict[str, bytes]:
    if struct.unpack_from("<I", block)[0] != XATTR_MAGIC:
        raise XattrError("EA block has a bad magic")
    return unpack_area(block, 0, BLOCK_HEADER.size)
