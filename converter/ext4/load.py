"""Rebuild the in-memory model from an existing ext4: the lower layers of an image already converted, or
a base layer made by mke2fs (the official overlaybd `ext4_64`, with a journal and uninit_bg).

Why: converting only the upper layers of an image whose lower layers were converted before needs the
filesystem state those layers left, without writing their blocks again. Reading it back from the
stacked blobs gives exactly the state a fresh conversion would have (the model is a function of the
on-disk bytes), so the upper layers come out byte-identical.

Inodes are read through the inode bitmaps; reserved inodes (journal, resize inode, ...) and every
inode that a later layer does not touch are written back verbatim from their raw bytes.
"""

from __future__ import annotations

import struct
from typing import Protocol

from . import xattr as xattrs_mod
from .bitmap import Bitmap
from .fs import BLOCKS_PER_GROUP, Ext4Error, Filesystem, Geometry, Inode
from .layout import (
    BG_BLOCK_UNINIT,
    BG_INODE_UNINIT,
    BLOCK_SIZE,
    DESC_SIZE,
    DIRENT_HEADER,
    EXT4_EXT_MAGIC,
    EXT4_EXTENTS_FL,
    EXTENT_HEADER,
    EXTENT_INDEX,
    EXTENT_LEAF,
    FAST_SYMLINK_MAX,
    FIRST_INO,
    INCOMPAT_64BIT,
    INCOMPAT_EXTENTS,
    INCOMPAT_FILETYPE,
    INCOMPAT_FLEX_BG,
    INCOMPAT_RECOVER,
    INODE_SIZE,
    INODE_XATTR_OFFSET,
    LOG_BLOCK_SIZE,
    ROOT_INO,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    SUPERBLOCK_OFFSET,
    Extent,
    GroupDesc,
    RawInode,
    Superblock,
)

SUPPORTED_INCOMPAT = INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG


class Disk(Protocol):
    def pread(self, offset: int, length: int) -> bytes: ...


def load_filesystem(disk: Disk) -> Filesystem:
    sb = Superblock.decode(disk.pread(SUPERBLOCK_OFFSET, 1024))
    _check_supported(sb)
    geo = Geometry(blocks_count=sb.blocks_count, inodes_per_group=sb.s_inodes_per_group,
                   log_groups_per_flex=sb.s_log_groups_per_flex)  # fmt: skip
    fs = Filesystem(geo, sb)
    fs._fresh = False
    groups = geo.groups
    gdt = disk.pread(BLOCK_SIZE, -(-groups * DESC_SIZE // BLOCK_SIZE) * BLOCK_SIZE)
    descs = [GroupDesc.decode(gdt[g * DESC_SIZE : (g + 1) * DESC_SIZE]) for g in range(groups)]
    fs.group_meta = [(d.block_bitmap, d.inode_bitmap, d.inode_table) for d in descs]
    fs.bg_flags = [d.flags for d in descs]
    fs.itable_unused = [d.itable_unused for d in descs]
    fs.used_dirs = [d.used_dirs_count for d in descs]
    fs.free_blocks = [d.free_blocks_count for d in descs]
    fs.free_inodes = [d.free_inodes_count for d in descs]

    _load_block_bitmaps(fs, disk, descs)
    ipg = geo.inodes_per_group
    ipg_bytes = ipg // 8
    for g, d in enumerate(descs):
        if fs.gdt_csum and d.flags & BG_INODE_UNINIT:
            continue  # no inode of this group was ever used
        fs.inode_map.bits[g * ipg_bytes : (g + 1) * ipg_bytes] = disk.pread(d.inode_bitmap * BLOCK_SIZE, ipg_bytes)
    _load_inodes(fs, disk)
    return fs


def _check_supported(sb: Superblock) -> None:
    if sb.s_log_block_size != LOG_BLOCK_SIZE or sb.s_inode_size != INODE_SIZE:
        raise Ext4Error(f"base filesystem must have 4 KiB blocks and 256-byte inodes (found log {sb.s_log_block_size}, "
                        f"inode size {sb.s_inode_size})")  # fmt: skip
    if sb.s_blocks_per_group != BLOCKS_PER_GROUP or sb.s_desc_size != DESC_SIZE:
        raise Ext4Error("base filesystem must have 32768 blocks per group and 64-byte group descriptors")
    if sb.s_feature_incompat & INCOMPAT_RECOVER:
        raise Ext4Error("base filesystem has a journal that needs recovery")
    unsupported = sb.s_feature_incompat & ~SUPPORTED_INCOMPAT
    if unsupported:
        raise Ext4Error(f"base filesystem uses unsupported incompatible features {unsupported:#x}")
    if sb.s_feature_ro_compat & 0x0400:
        raise Ext4Error("base filesystem uses metadata_csum, which this converter does not maintain")


def _load_block_bitmaps(fs: Filesystem, disk: Disk, descs: list[GroupDesc]) -> None:
    geo = fs.geo
    tail = geo.groups * BLOCKS_PER_GROUP
    fs.block_map.set_range(geo.blocks_count, tail - geo.blocks_count)
    uninit = [g for g, d in enumerate(descs) if fs.gdt_csum and d.flags & BG_BLOCK_UNINIT]
    for g, d in enumerate(descs):
        if g not in uninit:
            fs.block_map.bits[g * BLOCK_SIZE : (g + 1) * BLOCK_SIZE] = disk.pread(
                d.block_bitmap * BLOCK_SIZE, BLOCK_SIZE
            )
    if not uninit:
        return
    # An uninitialised group's bitmap is implied: its superblock backup, descriptor copies and reserved
    # GDT blocks, plus whichever groups' bitmaps and inode tables flex_bg placed inside it.
    sb = fs.sb
    reserved_gdt = sb.s_reserved_gdt_blocks
    uninit_set = set(uninit)
    for g in uninit:
        if geo.has_super(g):
            fs.block_map.set_range(geo.group_start(g), 1 + geo.gdt_blocks + reserved_gdt)
    for d in descs:
        for start, count in ((d.block_bitmap, 1), (d.inode_bitmap, 1), (d.inode_table, geo.inode_table_blocks)):
            if start // BLOCKS_PER_GROUP in uninit_set:
                fs.block_map.set_range(start, count)


def _load_inodes(fs: Filesystem, disk: Disk) -> None:
    ipg = fs.geo.inodes_per_group
    per_block = BLOCK_SIZE // INODE_SIZE
    used_table_blocks = sorted({(bit // per_block) for bit in _set_bits(fs.inode_map, fs.geo.inodes_count)})
    for tb in used_table_blocks:
        group, index = divmod(tb * per_block, ipg)
        raw_block = disk.pread((fs.group_meta[group][2] + index // per_block) * BLOCK_SIZE, BLOCK_SIZE)
        for k in range(per_block):
            ino = tb * per_block + k + 1
            if not fs.inode_map.test(ino - 1):
                continue
            raw = raw_block[k * INODE_SIZE : (k + 1) * INODE_SIZE]
            fs.raw_inodes[ino] = raw
            if ino < FIRST_INO and ino != ROOT_INO:
                continue  # reserved inodes (journal, resize inode, ...) are kept verbatim, never modelled
            fs.inodes[ino] = _decode_inode(disk, ino, raw)
    fs.count_inodes(len(fs.inodes))
    for inode in fs.inodes.values():
        if inode.is_dir:
            _load_directory(fs, disk, inode)


def _set_bits(bitmap: Bitmap, end: int) -> list[int]:
    out = []
    pos = 0
    while True:
        bit = bitmap.find_set(pos, end)
        if bit is None:
            return out
        out.append(bit)
        pos = bit + 1


def _decode_inode(disk: Disk, ino: int, raw: bytes) -> Inode:
    r = RawInode.decode(raw)
    inode = Inode(ino, r.mode, r.uid, r.gid, _signed32(r.mtime) + ((r.mtime_extra & 3) << 32), r.mtime_extra >> 2)
    inode.size = r.size
    inode.links = r.links_count
    inode.flags = r.flags
    inode.xattr_block = r.file_acl
    kind = r.mode & S_IFMT
    if kind == S_IFLNK and not r.flags & EXT4_EXTENTS_FL and r.size <= FAST_SYMLINK_MAX:
        inode.target = r.i_block[: r.size]
    elif kind in (S_IFCHR, S_IFBLK):
        old, new = struct.unpack_from("<II", r.i_block)
        if old:
            inode.rdev = (old >> 8) & 0xFF, old & 0xFF
        else:
            inode.rdev = (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)
    elif r.flags & EXT4_EXTENTS_FL:
        inode.extents, inode.tree_blocks = _read_extent_tree(disk, ino, r.i_block)
        if kind == S_IFLNK:
            inode.target = disk.pread(inode.extents[0].physical * BLOCK_SIZE, BLOCK_SIZE)[: r.size]
    elif kind in (S_IFDIR, S_IFLNK) or (r.size and kind != S_IFDIR):
        raise Ext4Error(f"inode {ino} uses block maps instead of extents, which this converter does not support")
    xattrs = xattrs_mod.unpack_inode_area(raw[INODE_XATTR_OFFSET:])
    if r.file_acl:
        xattrs.update(xattrs_mod.unpack_block(disk.pread(r.file_acl * BLOCK_SIZE, BLOCK_SIZE)))
    inode.xattrs = xattrs
    inode.xattr_area = raw[INODE_XATTR_OFFSET:] if any(raw[INODE_XATTR_OFFSET:]) else b""
    return inode


def _signed32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def _read_extent_tree(disk: Disk, ino: int, root: bytes) -> tuple[list[Extent], list[int]]:
    """All leaf extents in logical order, and the tree's blocks (leaves first, then index blocks)."""
    leaves: list[int] = []
    index_blocks: list[int] = []
    extents: list[Extent] = []

    def walk(node: bytes, is_root: bool) -> None:
        magic, entries, _max, depth, _gen = EXTENT_HEADER.unpack_from(node)
        if magic != EXT4_EXT_MAGIC:
            raise Ext4Error(f"inode {ino}: bad extent header magic {magic:#x}")
        for k in range(entries):
            off = EXTENT_HEADER.size + 12 * k
            if depth == 0:
                logical, length, hi, lo = EXTENT_LEAF.unpack_from(node, off)
                if length > 32768:
                    raise Ext4Error(f"inode {ino}: unwritten extents are not supported")
                extents.append(Extent(logical, (hi << 32) | lo, length))
            else:
                _logical, lo, hi, _unused = EXTENT_INDEX.unpack_from(node, off)
                child = (hi << 32) | lo
                (leaves if depth == 1 else index_blocks).append(child)
                walk(disk.pread(child * BLOCK_SIZE, BLOCK_SIZE), False)

    walk(root, True)
    return extents, leaves + index_blocks


def _load_directory(fs: Filesystem, disk: Disk, inode: Inode) -> None:
    children: dict[bytes, int] = {}
    for extent in inode.extents:
        data = disk.pread(extent.physical * BLOCK_SIZE, extent.length * BLOCK_SIZE)
        for b in range(extent.length):
            block = data[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE]
            pos = 0
            while pos < BLOCK_SIZE:
                child, rec_len, name_len, _ftype = DIRENT_HEADER.unpack_from(block, pos)
                if rec_len < 8 or pos + rec_len > BLOCK_SIZE:
                    raise Ext4Error(f"directory inode {inode.ino}: corrupt entry at byte {pos}")
                name = block[pos + 8 : pos + 8 + name_len]
                if child and name == b"..":
                    inode.parent = child
                elif child and name != b".":
                    children[name] = child
                pos += rec_len
    inode.children = children
    if inode.ino == ROOT_INO:
        inode.parent = ROOT_INO
