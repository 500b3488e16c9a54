"""ext4 on-disk structures: superblock, group descriptors, inodes, extents, directory entries, htree.

Field names and offsets follow the kernel's Documentation/filesystems/ext4/ and e2fsprogs'
lib/ext2fs/ext2_fs.h. Only the features this builder writes are modelled (no journal, no checksums,
no inline data, no bigalloc); everything is little-endian with 4 KiB blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BLOCK_SIZE = 4096
LOG_BLOCK_SIZE = 2  # s_log_block_size: block size = 1024 << 2
INODE_SIZE = 256
GOOD_OLD_INODE_SIZE = 128
EXTRA_ISIZE = 32  # bytes used past the 128-byte core inode (up to i_projid)
DESC_SIZE = 64  # 64bit feature: 64-byte group descriptors
SUPERBLOCK_OFFSET = 1024
EXT4_SUPER_MAGIC = 0xEF53

ROOT_INO = 2
FIRST_INO = 11  # first non-reserved inode; mkfs puts lost+found here

# s_feature_compat
COMPAT_EXT_ATTR = 0x0008
COMPAT_RESIZE_INODE = 0x0010
COMPAT_DIR_INDEX = 0x0020
COMPAT_HAS_JOURNAL = 0x0004
# s_feature_incompat
INCOMPAT_FILETYPE = 0x0002
INCOMPAT_RECOVER = 0x0004
INCOMPAT_META_BG = 0x0010
INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
INCOMPAT_FLEX_BG = 0x0200
INCOMPAT_INLINE_DATA = 0x8000
# s_feature_ro_compat
RO_COMPAT_SPARSE_SUPER = 0x0001
RO_COMPAT_LARGE_FILE = 0x0002
RO_COMPAT_HUGE_FILE = 0x0008
RO_COMPAT_GDT_CSUM = 0x0010
RO_COMPAT_DIR_NLINK = 0x0020
RO_COMPAT_EXTRA_ISIZE = 0x0040
RO_COMPAT_METADATA_CSUM = 0x0400

# s_flags
FLAGS_SIGNED_HASH = 0x1
FLAGS_UNSIGNED_HASH = 0x2

# s_def_hash_version / dx_root_info.hash_version
DX_HASH_HALF_MD4 = 1

# s_default_mount_opts
DEFM_XATTR_USER = 0x0004
DEFM_ACL = 0x0008

# i_flags
EXT4_INDEX_FL = 0x00001000  # hashed (htree) directory
EXT4_HUGE_FILE_FL = 0x00040000
EXT4_EXTENTS_FL = 0x00080000

# bg_flags (uninit_bg / metadata_csum only)
BG_INODE_UNINIT = 0x0001
BG_BLOCK_UNINIT = 0x0002
BG_INODE_ZEROED = 0x0004

# i_mode file type bits
S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000

# ext4_dir_entry_2.file_type
FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7

FILE_TYPE_OF_MODE = {
    S_IFREG: FT_REG_FILE,
    S_IFDIR: FT_DIR,
    S_IFCHR: FT_CHRDEV,
    S_IFBLK: FT_BLKDEV,
    S_IFIFO: FT_FIFO,
    S_IFSOCK: FT_SOCK,
    S_IFLNK: FT_SYMLINK,
}

EXT4_LINK_MAX = 65000  # above this a directory's link count is pinned to 1 (dir_nlink)
EXT4_NAME_LEN = 255
FAST_SYMLINK_MAX = 59  # targets shorter than the 60-byte i_block live inside the inode

# Extents
EXT4_EXT_MAGIC = 0xF30A
EXT_MAX_INIT_LEN = 32768  # longest initialised extent, in blocks
EXTENTS_IN_INODE = 4
EXTENTS_PER_BLOCK = (BLOCK_SIZE - 12) // 12  # 340

# htree limits with 4 KiB blocks and no checksum tail
DX_ROOT_LIMIT = (BLOCK_SIZE - 32) // 8  # 508 entries after the fake dirents and dx_root_info
DX_NODE_LIMIT = (BLOCK_SIZE - 8) // 8  # 511 entries after the fake empty dirent


def _pack_fields(spec: list[tuple[int, str, str]], obj: object, buf: bytearray) -> None:
    for off, fmt, name in spec:
        struct.pack_into("<" + fmt, buf, off, getattr(obj, name))


def _unpack_fields(spec: list[tuple[int, str, str]], buf: bytes | memoryview) -> dict[str, object]:
    return {name: struct.unpack_from("<" + fmt, buf, off)[0] for off, fmt, name in spec}


# --------------------------------------------------------------------------------------------------
# Superblock (1024 bytes at byte 1024 of the device)

_SUPERBLOCK_SPEC: list[tuple[int, str, str]] = [
    (0x00, "I", "s_inodes_count"),
    (0x04, "I", "s_blocks_count_lo"),
    (0x08, "I", "s_r_blocks_count_lo"),
    (0x0C, "I", "s_free_blocks_count_lo"),
    (0x10, "I", "s_free_inodes_count"),
    (0x14, "I", "s_first_data_block"),
    (0x18, "I", "s_log_block_size"),
    (0x1C, "I", "s_log_cluster_size"),
    (0x20, "I", "s_blocks_per_group"),
    (0x24, "I", "s_clusters_per_group"),
    (0x28, "I", "s_inodes_per_group"),
    (0x2C, "I", "s_mtime"),
    (0x30, "I", "s_wtime"),
    (0x34, "H", "s_mnt_count"),
    (0x36, "h", "s_max_mnt_count"),
    (0x38, "H", "s_magic"),
    (0x3A, "H", "s_state"),
    (0x3C, "H", "s_errors"),
    (0x3E, "H", "s_minor_rev_level"),
    (0x40, "I", "s_lastcheck"),
    (0x44, "I", "s_checkinterval"),
    (0x48, "I", "s_creator_os"),
    (0x4C, "I", "s_rev_level"),
    (0x50, "H", "s_def_resuid"),
    (0x52, "H", "s_def_resgid"),
    (0x54, "I", "s_first_ino"),
    (0x58, "H", "s_inode_size"),
    (0x5A, "H", "s_block_group_nr"),
    (0x5C, "I", "s_feature_compat"),
    (0x60, "I", "s_feature_incompat"),
    (0x64, "I", "s_feature_ro_compat"),
    (0x68, "16s", "s_uuid"),
    (0x78, "16s", "s_volume_name"),
    (0x88, "64s", "s_last_mounted"),
    (0xC8, "I", "s_algorithm_usage_bitmap"),
    (0xCC, "B", "s_prealloc_blocks"),
    (0xCD, "B", "s_prealloc_dir_blocks"),
    (0xCE, "H", "s_reserved_gdt_blocks"),
    (0xD0, "16s", "s_journal_uuid"),
    (0xE0, "I", "s_journal_inum"),
    (0xE4, "I", "s_journal_dev"),
    (0xE8, "I", "s_last_orphan"),
    (0xEC, "16s", "s_hash_seed"),
    (0xFC, "B", "s_def_hash_version"),
    (0xFD, "B", "s_jnl_backup_type"),
    (0xFE, "H", "s_desc_size"),
    (0x100, "I", "s_default_mount_opts"),
    (0x104, "I", "s_first_meta_bg"),
    (0x108, "I", "s_mkfs_time"),
    (0x10C, "68s", "s_jnl_blocks"),
    (0x150, "I", "s_blocks_count_hi"),
    (0x154, "I", "s_r_blocks_count_hi"),
    (0x158, "I", "s_free_blocks_count_hi"),
    (0x15C, "H", "s_min_extra_isize"),
    (0x15E, "H", "s_want_extra_isize"),
    (0x160, "I", "s_flags"),
    (0x174, "B", "s_log_groups_per_flex"),
    (0x178, "Q", "s_kbytes_written"),
]


@dataclass
class Superblock:
    s_inodes_count: int = 0
    s_blocks_count_lo: int = 0
    s_r_blocks_count_lo: int = 0
    s_free_blocks_count_lo: int = 0
    s_free_inodes_count: int = 0
    s_first_data_block: int = 0
    s_log_block_size: int = LOG_BLOCK_SIZE
    s_log_cluster_size: int = LOG_BLOCK_SIZE
    s_blocks_per_group: int = 32768
    s_clusters_per_group: int = 32768
    s_inodes_per_group: int = 0
    s_mtime: int = 0
    s_wtime: int = 0
    s_mnt_count: int = 0
    s_max_mnt_count: int = -1
    s_magic: int = EXT4_SUPER_MAGIC
    s_state: int = 1  # cleanly unmounted
    s_errors: int = 1  # continue
    s_minor_rev_level: int = 0
    s_lastcheck: int = 0
    s_checkinterval: int = 0
    s_creator_os: int = 0  # Linux
    s_rev_level: int = 1  # dynamic inode sizes
    s_def_resuid: int = 0
    s_def_resgid: int = 0
    s_first_ino: int = FIRST_INO
    s_inode_size: int = INODE_SIZE
    s_block_group_nr: int = 0
    s_feature_compat: int = 0
    s_feature_incompat: int = 0
    s_feature_ro_compat: int = 0
    s_uuid: bytes = bytes(16)
    s_volume_name: bytes = bytes(16)
    s_last_mounted: bytes = bytes(64)
    s_algorithm_usage_bitmap: int = 0
    s_prealloc_blocks: int = 0
    s_prealloc_dir_blocks: int = 0
    s_reserved_gdt_blocks: int = 0
    s_journal_uuid: bytes = bytes(16)
    s_journal_inum: int = 0
    s_journal_dev: int = 0
    s_last_orphan: int = 0
    s_hash_seed: bytes = bytes(16)
    s_def_hash_version: int = DX_HASH_HALF_MD4
    s_jnl_backup_type: int = 0
    s_desc_size: int = DESC_SIZE
    s_default_mount_opts: int = DEFM_XATTR_USER | DEFM_ACL
    s_first_meta_bg: int = 0
    s_mkfs_time: int = 0
    s_jnl_blocks: bytes = bytes(68)
    s_blocks_count_hi: int = 0
    s_r_blocks_count_hi: int = 0
    s_free_blocks_count_hi: int = 0
    s_min_extra_isize: int = EXTRA_ISIZE
    s_want_extra_isize: int = EXTRA_ISIZE
    s_flags: int = FLAGS_UNSIGNED_HASH
    s_log_groups_per_flex: int = 0
    s_kbytes_written: int = 0
    # Bytes of the on-disk superblock this model does not name (kept verbatim when re-encoding a
    # superblock read from an existing filesystem, e.g. mke2fs's base layer).
    raw: bytes = field(default=bytes(1024), repr=False)

    @property
    def blocks_count(self) -> int:
        return self.s_blocks_count_lo | (self.s_blocks_count_hi << 32)

    @blocks_count.setter
    def blocks_count(self, value: int) -> None:
        self.s_blocks_count_lo, self.s_blocks_count_hi = value & 0xFFFFFFFF, value >> 32

    @property
    def r_blocks_count(self) -> int:
        return self.s_r_blocks_count_lo | (self.s_r_blocks_count_hi << 32)

    @r_blocks_count.setter
    def r_blocks_count(self, value: int) -> None:
        self.s_r_blocks_count_lo, self.s_r_blocks_count_hi = value & 0xFFFFFFFF, value >> 32

    @property
    def free_blocks_count(self) -> int:
        return self.s_free_blocks_count_lo | (self.s_free_blocks_count_hi << 32)

    @free_blocks_count.setter
    def free_blocks_count(self, value: int) -> None:
        self.s_free_blocks_count_lo, self.s_free_blocks_count_hi = value & 0xFFFFFFFF, value >> 32

    def encode(self, group_nr: int = 0) -> bytes:
        buf = bytearray(self.raw)
        self.s_block_group_nr = group_nr
        _pack_fields(_SUPERBLOCK_SPEC, self, buf)
        return bytes(buf)

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Superblock:
        values = _unpack_fields(_SUPERBLOCK_SPEC, raw)
        sb = cls(**values, raw=bytes(raw[:1024]))  # type: ignore[arg-type]
        if sb.s_magic != EXT4_SUPER_MAGIC:
            raise ValueError(f"not an ext4 superblock (magic {sb.s_magic:#x})")
        return sb


# --------------------------------------------------------------------------------------------------
# Group descriptor (64 bytes with the 64bit feature)

_GROUP_DESC_SPEC: list[tuple[int, str, str]] = [
    (0x00, "I", "block_bitmap_lo"),
    (0x04, "I", "inode_bitmap_lo"),
    (0x08, "I", "inode_table_lo"),
    (0x0C, "H", "free_blocks_count_lo"),
    (0x0E, "H", "free_inodes_count_lo"),
    (0x10, "H", "used_dirs_count_lo"),
    (0x12, "H", "flags"),
    (0x1C, "H", "itable_unused_lo"),
    (0x1E, "H", "checksum"),
    (0x20, "I", "block_bitmap_hi"),
    (0x24, "I", "inode_bitmap_hi"),
    (0x28, "I", "inode_table_hi"),
    (0x2C, "H", "free_blocks_count_hi"),
    (0x2E, "H", "free_inodes_count_hi"),
    (0x30, "H", "used_dirs_count_hi"),
    (0x32, "H", "itable_unused_hi"),
]


@dataclass
class GroupDesc:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free_blocks_count: int = 0
    free_inodes_count: int = 0
    used_dirs_count: int = 0
    flags: int = 0
    itable_unused: int = 0
    checksum: int = 0

    def encode(self) -> bytes:
        buf = bytearray(DESC_SIZE)
        lo, hi = 0xFFFFFFFF, 32
        values = {
            "block_bitmap_lo": self.block_bitmap & lo,
            "block_bitmap_hi": self.block_bitmap >> hi,
            "inode_bitmap_lo": self.inode_bitmap & lo,
            "inode_bitmap_hi": self.inode_bitmap >> hi,
            "inode_table_lo": self.inode_table & lo,
            "inode_table_hi": self.inode_table >> hi,
            "free_blocks_count_lo": self.free_blocks_count & 0xFFFF,
            "free_blocks_count_hi": self.free_blocks_count >> 16,
            "free_inodes_count_lo": self.free_inodes_count & 0xFFFF,
            "free_inodes_count_hi": self.free_inodes_count >> 16,
            "used_dirs_count_lo": self.used_dirs_count & 0xFFFF,
            "used_dirs_count_hi": self.used_dirs_count >> 16,
            "flags": self.flags,
            "itable_unused_lo": self.itable_unused & 0xFFFF,
            "itable_unused_hi": self.itable_unused >> 16,
            "checksum": self.checksum,
        }
        for off, fmt, name in _GROUP_DESC_SPEC:
            struct.pack_into("<" + fmt, buf, off, values[name])
        return bytes(buf)

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> GroupDesc:
        v = _unpack_fields(_GROUP_DESC_SPEC, raw)
        return cls(
            block_bitmap=v["block_bitmap_lo"] | (v["block_bitmap_hi"] << 32),  # type: ignore[operator]
            inode_bitmap=v["inode_bitmap_lo"] | (v["inode_bitmap_hi"] << 32),  # type: ignore[operator]
            inode_table=v["inode_table_lo"] | (v["inode_table_hi"] << 32),  # type: ignore[operator]
            free_blocks_count=v["free_blocks_count_lo"] | (v["free_blocks_count_hi"] << 16),  # type: ignore[operator]
            free_inodes_count=v["free_inodes_count_lo"] | (v["free_inodes_count_hi"] << 16),  # type: ignore[operator]
            used_dirs_count=v["used_dirs_count_lo"] | (v["used_dirs_count_hi"] << 16),  # type: ignore[operator]
            flags=v["flags"],  # type: ignore[arg-type]
            itable_unused=v["itable_unused_lo"] | (v["itable_unused_hi"] << 16),  # type: ignore[operator]
            checksum=v["checksum"],  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------------------------------
# Inode (256 bytes: 128-byte core + 32 bytes of extra fields + in-inode xattr space)

INODE_CORE = struct.Struct(
    "<HHIIIIIHHII"  # mode uid size_lo atime ctime mtime dtime gid links blocks_lo flags
    "I"  # osd1 (l_i_version)
    "60s"  # i_block
    "IIII"  # generation file_acl_lo size_high obso_faddr
    "HHHHHH"  # osd2: blocks_high file_acl_high uid_high gid_high checksum_lo reserved
)
INODE_EXTRA = struct.Struct("<HHIIIIIII")  # extra_isize checksum_hi ctime_extra mtime_extra atime_extra
# crtime crtime_extra version_hi projid
assert INODE_CORE.size == GOOD_OLD_INODE_SIZE and INODE_EXTRA.size == EXTRA_ISIZE
INODE_XATTR_OFFSET = GOOD_OLD_INODE_SIZE + EXTRA_ISIZE  # where the in-inode xattr area starts


@dataclass
class RawInode:
    """The named fields of an on-disk inode, as stored (split lo/hi halves joined)."""

    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime: int = 0
    ctime: int = 0
    mtime: int = 0
    dtime: int = 0
    links_count: int = 0
    blocks: int = 0  # in 512-byte units (no HUGE_FILE_FL)
    flags: int = 0
    i_block: bytes = bytes(60)
    generation: int = 0
    file_acl: int = 0
    ctime_extra: int = 0
    mtime_extra: int = 0
    atime_extra: int = 0
    crtime: int = 0
    crtime_extra: int = 0
    xattr_area: bytes = b""  # bytes from INODE_XATTR_OFFSET to the end of the inode

    def encode(self) -> bytes:
        core = INODE_CORE.pack(
            self.mode,
            self.uid & 0xFFFF,
            self.size & 0xFFFFFFFF,
            self.atime & 0xFFFFFFFF,
            self.ctime & 0xFFFFFFFF,
            self.mtime & 0xFFFFFFFF,
            self.dtime,
            self.gid & 0xFFFF,
            self.links_count,
            self.blocks & 0xFFFFFFFF,
            self.flags,
            0,
            self.i_block,
            self.generation,
            self.file_acl & 0xFFFFFFFF,
            self.size >> 32,
            0,
            (self.blocks >> 32) & 0xFFFF,
            self.file_acl >> 32,
            self.uid >> 16,
            self.gid >> 16,
            0,
            0,
        )
        extra = INODE_EXTRA.pack(
            EXTRA_ISIZE,
            0,
            self.ctime_extra,
            self.mtime_extra,
            self.atime_extra,
            self.crtime & 0xFFFFFFFF,
            self.crtime_extra,
            0,
            0,
        )
        tail = self.xattr_area.ljust(INODE_SIZE - INODE_XATTR_OFFSET, b"\0")
        return core + extra + tail

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> RawInode:
        (
            mode,
            uid_lo,
            size_lo,
            atime,
            ctime,
            mtime,
            dtime,
            gid_lo,
            links,
            blocks_lo,
            flags,
            _osd1,
            i_block,
            generation,
            acl_lo,
            size_hi,
            _faddr,
            blocks_hi,
            acl_hi,
            uid_hi,
            gid_hi,
            _csum,
            _res,
        ) = INODE_CORE.unpack_from(raw, 0)
        ino = cls(
            mode=mode,
            uid=uid_lo | (uid_hi << 16),
            gid=gid_lo | (gid_hi << 16),
            size=size_lo | (size_hi << 32),
            atime=atime,
            ctime=ctime,
            mtime=mtime,
            dtime=dtime,
            links_count=links,
            blocks=blocks_lo | (blocks_hi << 32),
            flags=flags,
            i_block=i_block,
            generation=generation,
            file_acl=acl_lo | (acl_hi << 32),
        )
        extra_isize = struct.unpack_from("<H", raw, GOOD_OLD_INODE_SIZE)[0] if len(raw) > GOOD_OLD_INODE_SIZE else 0
        if extra_isize >= EXTRA_ISIZE:
            e = INODE_EXTRA.unpack_from(raw, GOOD_OLD_INODE_SIZE)
            ino.ctime_extra, ino.mtime_extra, ino.atime_extra, ino.crtime, ino.crtime_extra = e[2:7]
        ino.xattr_area = bytes(raw[GOOD_OLD_INODE_SIZE + extra_isize :])
        return ino


def encode_time(seconds: int, nanoseconds: int = 0) -> tuple[int, int]:
    """Split a timestamp into the 32-bit i_*time field and its *_extra word (epoch bits + ns)."""
    low = seconds & 0xFFFFFFFF
    signed_low = low - (1 << 32) if low & 0x80000000 else low
    epoch = ((seconds - signed_low) >> 32) & 0x3
    return low, (nanoseconds << 2) | epoch


# --------------------------------------------------------------------------------------------------
# Extents

EXTENT_HEADER = struct.Struct("<HHHHI")  # magic entries max depth generation
EXTENT_LEAF = struct.Struct("<IHHI")  # ee_block ee_len ee_start_hi ee_start_lo
EXTENT_INDEX = struct.Struct("<IIHH")  # ei_block ei_leaf_lo ei_leaf_hi ei_unused


@dataclass(frozen=True, slots=True)  # slots: one per file with data, ~100 bytes less than with a __dict__
class Extent:
    logical: int  # first file block
    physical: int  # first disk block
    length: int  # blocks, 1..32768

    def pack(self) -> bytes:
        return EXTENT_LEAF.pack(self.logical, self.length, self.physical >> 32, self.physical & 0xFFFFFFFF)


def pack_extent_node(entries: list[bytes], max_entries: int, depth: int, size: int) -> bytes:
    header = EXTENT_HEADER.pack(EXT4_EXT_MAGIC, len(entries), max_entries, depth, 0)
    return (header + b"".join(entries)).ljust(size, b"\0")


def pack_extent_index(logical: int, block: int) -> bytes:
    return EXTENT_INDEX.pack(logical, block & 0xFFFFFFFF, block >> 32, 0)


# --------------------------------------------------------------------------------------------------
# Directory entries and htree nodes

DIRENT_HEADER = struct.Struct("<IHBB")  # inode rec_len name_len file_type
DX_ROOT_INFO = struct.Struct("<IBBBB")  # reserved_zero hash_version info_length indirect_levels unused_flags
DX_COUNT_LIMIT = struct.Struct("<HHI")  # limit count block(of the first entry)
DX_ENTRY = struct.Struct("<II")  # hash block


def dirent_size(name_len: int) -> int:
    """Minimal rec_len for a name: 8-byte header plus the name, rounded up to 4 bytes."""
    return (8 + name_len + 3) & ~3


def pack_dirent(inode: int, name: bytes, file_type: int, rec_len: int) -> bytes:
    return DIRENT_HEADER.pack(inode, rec_len, len(name), file_type) + name
