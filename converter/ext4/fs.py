"""An ext4 filesystem held in memory, written to a block sink one layer at a time.

The model keeps what the layer-apply logic needs (inodes with their extents, directory children, the
block and inode bitmaps) and encodes on-disk metadata only when a layer is flushed. File data is
written to the sink as it is allocated, so a layer's blob holds its file contents first and the
metadata blocks it changed (directories, extent trees, EA blocks, inode tables, bitmaps, group
descriptors, superblock) after them — each written once per layer.

Geometry (what `mkfs` builds): 4 KiB blocks, 32768 blocks and `size / 16384` inodes of 256 bytes spread
over groups of 8192, flex_bg groups of 16 (bitmaps and inode tables packed at the start of each flex
group), sparse_super backups, 5 % reserved blocks, no journal, no checksums, no resize inode.
Everything is derived from the inputs: no clock, no random UUID, so equal inputs give equal bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from ..errors import shorten
from . import xattr as xattrs_mod
from .bitmap import Bitmap, BitSet
from .budget import MODEL_BUDGET, STEP
from .hashing import dx_hash_many, seed_words
from .layout import (
    BG_BLOCK_UNINIT,
    BG_INODE_UNINIT,
    BLOCK_SIZE,
    COMPAT_DIR_INDEX,
    COMPAT_EXT_ATTR,
    DESC_SIZE,
    DIRENT_HEADER,
    DX_COUNT_LIMIT,
    DX_ENTRY,
    DX_HASH_HALF_MD4,
    DX_NODE_LIMIT,
    DX_ROOT_INFO,
    DX_ROOT_LIMIT,
    EXT4_EXTENTS_FL,
    EXT4_INDEX_FL,
    EXT4_LINK_MAX,
    EXT_MAX_INIT_LEN,
    EXTENTS_IN_INODE,
    EXTENTS_PER_BLOCK,
    EXTRA_ISIZE,
    FAST_SYMLINK_MAX,
    FILE_TYPE_OF_MODE,
    FIRST_INO,
    FT_DIR,
    INCOMPAT_64BIT,
    INCOMPAT_EXTENTS,
    INCOMPAT_FILETYPE,
    INCOMPAT_FLEX_BG,
    INODE_CORE,
    INODE_EXTRA,
    INODE_SIZE,
    RO_COMPAT_DIR_NLINK,
    RO_COMPAT_EXTRA_ISIZE,
    RO_COMPAT_GDT_CSUM,
    RO_COMPAT_HUGE_FILE,
    RO_COMPAT_LARGE_FILE,
    RO_COMPAT_SPARSE_SUPER,
    ROOT_INO,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    SUPERBLOCK_OFFSET,
    Extent,
    GroupDesc,
    Superblock,
    dirent_size,
    encode_time,
    pack_dirent,
    pack_extent_index,
    pack_extent_node,
)

BLOCKS_PER_GROUP = 32768
INODE_RATIO = 16384
RESERVED_PERCENT = 5
LOG_GROUPS_PER_FLEX = 4
INODES_PER_TABLE_BLOCK = BLOCK_SIZE // INODE_SIZE
TABLE_BLOCKS_PER_WRITE = 256  # inode table blocks encoded and written at once (1 MiB), not a whole layer's
_INODE_HEAD = struct.Struct("<" + INODE_CORE.format.lstrip("<") + INODE_EXTRA.format.lstrip("<"))


class Ext4Error(Exception):
    """The filesystem cannot represent what was asked (bad name, missing parent, ...). Shortened message."""

    def __init__(self, message: str) -> None:
        super().__init__(shorten(message))


class FilesystemFullError(Ext4Error):
    """No free blocks or inodes are left: the virtual size is too small for the image."""


class BlockSink(Protocol):
    """Where blocks go: a layer blob writer, a raw disk file, ... Offsets and lengths are 4 KiB multiples."""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


def _is_power_of(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


@dataclass(frozen=True)
class Geometry:
    blocks_count: int
    inodes_per_group: int
    log_groups_per_flex: int = LOG_GROUPS_PER_FLEX

    @classmethod
    def for_size(cls, size_bytes: int) -> Geometry:
        blocks = size_bytes // BLOCK_SIZE
        groups = -(-blocks // BLOCKS_PER_GROUP)
        if blocks < BLOCKS_PER_GROUP // 4:
            raise Ext4Error(f"virtual size {size_bytes} bytes is too small for an ext4 filesystem")
        inodes = blocks * BLOCK_SIZE // INODE_RATIO
        per_group = -(-inodes // groups)
        # Round up so that each group's inode table fills whole blocks (and bitmaps whole bytes).
        per_group = min(-(-per_group // INODES_PER_TABLE_BLOCK) * INODES_PER_TABLE_BLOCK, BLOCKS_PER_GROUP)
        return cls(blocks_count=blocks, inodes_per_group=per_group)

    @property
    def groups(self) -> int:
        return -(-self.blocks_count // BLOCKS_PER_GROUP)

    @property
    def inodes_count(self) -> int:
        return self.groups * self.inodes_per_group

    @property
    def gdt_blocks(self) -> int:
        return -(-self.groups * DESC_SIZE // BLOCK_SIZE)

    @property
    def inode_table_blocks(self) -> int:
        return self.inodes_per_group * INODE_SIZE // BLOCK_SIZE

    @property
    def groups_per_flex(self) -> int:
        return 1 << self.log_groups_per_flex

    def group_start(self, group: int) -> int:
        return group * BLOCKS_PER_GROUP

    def group_blocks(self, group: int) -> int:
        return min(BLOCKS_PER_GROUP, self.blocks_count - self.group_start(group))

    def has_super(self, group: int) -> bool:
        """sparse_super: backups only in groups 0, 1 and powers of 3, 5 and 7."""
        return group <= 1 or _is_power_of(group, 3) or _is_power_of(group, 5) or _is_power_of(group, 7)

    def super_blocks(self, group: int) -> int:
        return 1 + self.gdt_blocks if self.has_super(group) else 0

    def metadata(self, group: int) -> tuple[int, int, int]:
        """(block bitmap, inode bitmap, inode table) of a group, packed per flex group."""
        first = group - group % self.groups_per_flex
        members = min(self.groups_per_flex, self.groups - first)
        base = self.group_start(first) + self.super_blocks(first)
        k = group - first
        return base + k, base + members + k, base + 2 * members + k * self.inode_table_blocks

    def flex_metadata_blocks(self, first_group: int) -> tuple[int, int]:
        members = min(self.groups_per_flex, self.groups - first_group)
        base = self.group_start(first_group) + self.super_blocks(first_group)
        return base, members * (2 + self.inode_table_blocks)


_NO_BLOCKS: list[int] = []  # shared by every inode without an extent tree; only ever replaced, never mutated
_NO_EXTENTS: list[Extent] = []  # shared by every inode without data blocks; only ever replaced, never mutated
INTERN_LIMIT = 1 << 16  # distinct attribute values shared between inodes (see Filesystem.intern)
_NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})


class Inode:
    """One inode of the model: what every kind has. Files carry their extents; `Inode(...)` returns a
    DirInode, SymlinkInode or SpecialInode for those kinds, which add their own fields.

    Memory: a layer can hold millions of inodes, so each kind has only the slots it uses (a slot is 8
    bytes per inode) and the fields a kind lacks read as class-level defaults. The kind of an inode
    never changes: a tar entry of another type replaces the inode."""

    __slots__ = (
        "extents",
        "flags",
        "gid",
        "ino",
        "links",
        "mode",
        "mtime",
        "mtime_ns",
        "size",
        "tree_blocks",
        "uid",
        "xattr_area",
        "xattr_block",
        "xattrs",
    )
    # Defaults of the fields only some kinds carry (see the subclasses); read-only on other kinds.
    children: dict[bytes, int] | None = None
    parent = 0
    target = b""
    rdev = (0, 0)

    def __new__(cls, ino: int, mode: int, *args: int, **kwargs: int) -> Inode:
        if cls is Inode:
            cls = _KIND_CLASSES.get(mode & S_IFMT, Inode)
        return object.__new__(cls)

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0, mtime_ns: int = 0) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.mtime_ns = mtime_ns
        self.size = 0
        self.links = 1
        self.flags = 0
        self.extents: list[Extent] = _NO_EXTENTS
        self.tree_blocks: list[int] = _NO_BLOCKS
        self.xattrs: Mapping[str, bytes] = _NO_XATTRS  # replaced, never mutated
        self.xattr_block = 0
        self.xattr_area = b""

    @property
    def kind(self) -> int:
        return self.mode & S_IFMT

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def uses_extents(self) -> bool:
        kind = self.mode & S_IFMT
        return kind in (S_IFREG, S_IFDIR) or (kind == S_IFLNK and len(self.target) > FAST_SYMLINK_MAX)


class DirInode(Inode):
    """A directory: its children by name, and its parent (for '..')."""

    __slots__ = ("children", "parent")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0, mtime_ns: int = 0) -> None:
        super().__init__(ino, mode, uid, gid, mtime, mtime_ns)
        self.children: dict[bytes, int] = {}
        self.parent = 0


class SymlinkInode(Inode):
    __slots__ = ("target",)

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0, mtime_ns: int = 0) -> None:
        super().__init__(ino, mode, uid, gid, mtime, mtime_ns)
        self.target = b""


class SpecialInode(Inode):
    """A character or block device, FIFO or socket: (major, minor) numbers."""

    __slots__ = ("rdev",)

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0, mtime_ns: int = 0) -> None:
        super().__init__(ino, mode, uid, gid, mtime, mtime_ns)
        self.rdev = (0, 0)


_KIND_CLASSES: dict[int, type[Inode]] = {S_IFDIR: DirInode, S_IFLNK: SymlinkInode, S_IFCHR: SpecialInode,
                                         S_IFBLK: SpecialInode, S_IFIFO: SpecialInode, S_IFSOCK: SpecialInode}


class InodeTable:
    """The model's inodes by number: a list indexed by inode number (None where free) instead of a dict,
    which costs ~50 bytes per inode more. Inode numbers are dense (next-fit from 11 upwards), so the list
    is as long as the highest number in use. Offers the dict operations the model uses."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: list[Inode | None] = []

    def __getitem__(self, ino: int) -> Inode:
        inode = self._slots[ino] if 0 <= ino < len(self._slots) else None
        if inode is None:
            raise KeyError(ino)
        return inode

    def get(self, ino: int) -> Inode | None:
        return self._slots[ino] if 0 <= ino < len(self._slots) else None

    def __contains__(self, ino: object) -> bool:
        return isinstance(ino, int) and self.get(ino) is not None

    def __setitem__(self, ino: int, inode: Inode) -> None:
        slots = self._slots
        if ino >= len(slots):
            slots.extend([None] * (ino + 1 - len(slots)))
        slots[ino] = inode

    def __delitem__(self, ino: int) -> None:
        if ino not in self:
            raise KeyError(ino)
        self._slots[ino] = None

    def values(self) -> Iterator[Inode]:
        return (inode for inode in self._slots if inode is not None)

    def __len__(self) -> int:
        return sum(inode is not None for inode in self._slots)


def _runs_to_extents(runs: list[tuple[int, int]], logical: int = 0) -> list[Extent]:
    """Cut physical runs into extents of at most 32768 blocks, numbering file blocks from `logical`."""
    if len(runs) == 1 and runs[0][1] <= EXT_MAX_INIT_LEN:  # the common case: one short run
        return [Extent(logical, runs[0][0], runs[0][1])]
    out: list[Extent] = []
    for start, count in runs:
        while count:
            n = min(count, EXT_MAX_INIT_LEN)
            if out and out[-1].physical + out[-1].length == start and out[-1].length + n <= EXT_MAX_INIT_LEN:
                last = out.pop()
                out.append(Extent(last.logical, last.physical, last.length + n))
            else:
                out.append(Extent(logical, start, n))
            logical += n
            start += n
            count -= n
    return out


def _physical_blocks(extents: list[Extent]) -> list[int]:
    return [e.physical + i for e in extents for i in range(e.length)]


def _bounded_runs(blocks: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """_runs_of, with long runs cut into pieces of at most `limit` (the sink sees the same bytes: the LSMT
    writer joins consecutive writes into one record)."""
    for start, count in _runs_of(blocks):
        for k in range(0, count, limit):
            yield start + k, min(limit, count - k)


def _runs_of(blocks: list[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs (start, count) of a list of block numbers, in list order."""
    i = 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and blocks[j] == blocks[j - 1] + 1:
            j += 1
        yield blocks[i], j - i
        i = j


class Filesystem:
    def __init__(self, geometry: Geometry, sb: Superblock) -> None:
        self.geo = geometry
        self.sb = sb
        groups = geometry.groups
        self.block_map = Bitmap(geometry.blocks_count, groups * BLOCK_SIZE)
        self.inode_map = Bitmap(geometry.inodes_count)
        self.inodes = InodeTable()
        self.used_dirs = [0] * groups
        self.free_blocks = [0] * groups
        self.free_inodes = [0] * groups
        # Where each group's bitmaps and inode table live (computed by mkfs, read from a loaded GDT).
        self.group_meta = [geometry.metadata(g) for g in range(groups)]
        # uninit_bg (GDT_CSUM) bookkeeping, used when stacking on a filesystem made by mke2fs.
        self.gdt_csum = bool(sb.s_feature_ro_compat & RO_COMPAT_GDT_CSUM)
        self.bg_flags = [0] * groups
        self.itable_unused = [0] * groups
        # Inodes loaded from an existing filesystem and not changed since: written back verbatim.
        self.raw_inodes: dict[int, bytes] = {}
        # A bitmap, not a set: a layer may dirty millions of inodes (an int and a hash slot each in a set).
        self.dirty_inodes = BitSet(geometry.inodes_count + 1)
        self.dirty_dirs: set[int] = set()
        self.dirty_block_groups: set[int] = set()
        self.dirty_inode_groups: set[int] = set()
        self.seed = seed_words(sb.s_hash_seed)
        self._interned: dict[int, int] = {}
        # Inodes held, against the process-wide budget shared with concurrent conversions (budget.py).
        self._budget = MODEL_BUDGET
        self._budget_key = MODEL_BUDGET.register(self)
        self._live = 0
        self._reserved = 0
        self._fresh = True  # until the first flush: skip writing blocks that are all zero
        self.reset_cursors()

    # ------------------------------------------------------------------ creation

    @classmethod
    def mkfs(cls, size_bytes: int, *, uuid: bytes = bytes(16), hash_seed: bytes = bytes(16)) -> Filesystem:
        geo = Geometry.for_size(size_bytes)
        sb = Superblock(
            s_inodes_count=geo.inodes_count,
            s_inodes_per_group=geo.inodes_per_group,
            s_feature_compat=COMPAT_EXT_ATTR | COMPAT_DIR_INDEX,
            s_feature_incompat=INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG,
            s_feature_ro_compat=RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE,
            s_uuid=uuid,
            s_hash_seed=hash_seed,
            s_def_hash_version=DX_HASH_HALF_MD4,
            s_log_groups_per_flex=geo.log_groups_per_flex,
        )
        sb.blocks_count = geo.blocks_count
        sb.r_blocks_count = geo.blocks_count * RESERVED_PERCENT // 100
        fs = cls(geo, sb)
        # Static metadata: superblock + GDT copies, then each flex group's bitmaps and inode tables.
        for group in range(geo.groups):
            if geo.has_super(group):
                fs.block_map.set_range(geo.group_start(group), geo.super_blocks(group))
            if group % geo.groups_per_flex == 0:
                fs.block_map.set_range(*geo.flex_metadata_blocks(group))
        # Bits past the end of the last group read as "in use", as mke2fs leaves them.
        tail = geo.groups * BLOCKS_PER_GROUP
        fs.block_map.set_range(geo.blocks_count, tail - geo.blocks_count)
        fs.inode_map.set_range(0, FIRST_INO - 1)  # inodes 1..10 are reserved
        fs.dirty_block_groups.update(range(geo.groups))
        fs.dirty_inode_groups.update(range(geo.groups))

        root = Inode(ROOT_INO, S_IFDIR | 0o755)
        root.parent = ROOT_INO
        root.links = 2
        fs.inodes[ROOT_INO] = root
        fs.used_dirs[0] += 1
        fs.dirty_inodes.add(ROOT_INO)
        fs.dirty_dirs.add(ROOT_INO)
        fs.mkdir(ROOT_INO, b"lost+found", 0o700)
        return fs

    def intern(self, value: int) -> int:
        """One shared int object per distinct mode, owner or mtime, so that a million files stamped alike
        do not hold a million equal ints (32 bytes each). Bounded: past INTERN_LIMIT values, no sharing."""
        shared = self._interned.get(value)
        if shared is not None:
            return shared
        if len(self._interned) < INTERN_LIMIT:
            self._interned[value] = value
        return value

    def count_inodes(self, count: int) -> None:
        """Account for `count` more (or, negative, fewer) inodes in the model against the shared budget;
        may wait there while other conversions use it up (budget.py)."""
        self._live += count
        if self._live > self._reserved:
            step = -(-(self._live - self._reserved) // STEP) * STEP
            self._budget.reserve(self._budget_key, step)
            self._reserved += step

    def applying(self, active: bool) -> None:
        """A layer starts (True) or ends (False): while applying, other conversions may wait for us."""
        self._budget.applying(self._budget_key, active)

    def reset_cursors(self) -> None:
        """Restart next-fit allocation from the start (done once per layer, like the reference tools)."""
        self._block_cursor = 0
        self._inode_cursor = FIRST_INO - 1

    # ------------------------------------------------------------------ allocation

    def _mark_block_groups(self, start: int, count: int) -> None:
        self.dirty_block_groups.update(range(start // BLOCKS_PER_GROUP, (start + count - 1) // BLOCKS_PER_GROUP + 1))

    def allocate_blocks(self, count: int) -> list[tuple[int, int]]:
        """Next-fit allocation of `count` blocks as few contiguous runs as the free space allows."""
        pos = self._block_cursor
        bits = self.block_map.bits
        if count == 1 and pos < self.geo.blocks_count and not bits[pos >> 3] >> (pos & 7) & 1:
            # Fast path for the many one-block files: the next block is free.
            bits[pos >> 3] |= 1 << (pos & 7)
            self.dirty_block_groups.add(pos // BLOCKS_PER_GROUP)
            self._block_cursor = pos + 1
            return [(pos, 1)]
        runs: list[tuple[int, int]] = []
        remaining = count
        total = self.geo.blocks_count
        wrapped = False
        while remaining:
            start = self.block_map.find_clear(pos, total)
            if start is None:
                if wrapped:
                    for run in runs:
                        self.free_block_run(*run)
                    raise FilesystemFullError(
                        f"no space left: {count} blocks requested, the {total * BLOCK_SIZE >> 20} MiB "
                        "filesystem is full (raise the virtual size, --vsize)"
                    )
                wrapped, pos = True, 0
                continue
            end = self.block_map.find_set(start, min(start + remaining, total))
            if end is None:
                end = min(start + remaining, total)
            n = end - start
            self.block_map.set_range(start, n)
            self._mark_block_groups(start, n)
            runs.append((start, n))
            remaining -= n
            pos = end
        self._block_cursor = pos
        return runs

    def free_block_run(self, start: int, count: int) -> None:
        if count:
            self.block_map.set_range(start, count, False)
            self._mark_block_groups(start, count)

    def _allocate_inode(self, is_dir: bool) -> int:
        total = self.geo.inodes_count
        bit = self._inode_cursor
        if bit >= total or self.inode_map.bits[bit >> 3] >> (bit & 7) & 1:
            bit = self.inode_map.find_clear(bit, total)
        if bit is None:
            bit = self.inode_map.find_clear(FIRST_INO - 1, total)
            if bit is None:
                raise FilesystemFullError(f"no free inodes: all {total} are in use (raise the virtual size, --vsize)")
        self.inode_map.set_range(bit, 1)
        self._inode_cursor = bit + 1
        group = bit // self.geo.inodes_per_group
        self.dirty_inode_groups.add(group)
        if is_dir:
            self.used_dirs[group] += 1
        return bit + 1

    # ------------------------------------------------------------------ namespace operations

    def new_inode(self, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0, mtime_ns: int = 0) -> Inode:
        ino = self._allocate_inode(mode & S_IFMT == S_IFDIR)
        self._live += 1
        if self._live > self._reserved:
            self.count_inodes(0)
        intern = self.intern
        inode = Inode(ino, intern(mode), intern(uid), intern(gid), intern(mtime), mtime_ns)
        self.inodes[ino] = inode
        self.dirty_inodes.add(ino)
        return inode

    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        children = self.inodes[dir_ino].children
        assert children is not None
        return children.get(name)

    def link(self, dir_ino: int, name: bytes, child: Inode) -> None:
        """Add a directory entry; for a new subdirectory also set its '..'."""
        directory = self.inodes[dir_ino]
        assert directory.children is not None and name not in directory.children
        directory.children[name] = child.ino
        self.dirty_dirs.add(dir_ino)
        self.dirty_inodes.add(dir_ino)
        if child.is_dir:
            child.parent = dir_ino
            self.dirty_dirs.add(child.ino)

    def add_hardlink(self, dir_ino: int, name: bytes, target: Inode) -> None:
        target.links += 1
        self.dirty_inodes.add(target.ino)
        self.link(dir_ino, name, target)

    def mkdir(self, parent: int, name: bytes, perm: int, uid: int = 0, gid: int = 0, mtime: int = 0) -> Inode:
        inode = self.new_inode(S_IFDIR | perm, uid, gid, mtime)
        inode.links = 2
        self.link(parent, name, inode)
        return inode

    def remove(self, dir_ino: int, name: bytes) -> None:
        """Unlink a name; a directory goes with everything below it."""
        directory = self.inodes[dir_ino]
        assert directory.children is not None
        child = directory.children.pop(name)
        self.dirty_dirs.add(dir_ino)
        self.dirty_inodes.add(dir_ino)
        stack = [child]
        while stack:
            inode = self.inodes[stack.pop()]
            if inode.is_dir:
                assert inode.children is not None
                stack.extend(inode.children.values())
                inode.children.clear()
                self._free_inode(inode)
            else:
                inode.links -= 1
                if inode.links <= 0:
                    self._free_inode(inode)
                else:
                    self.dirty_inodes.add(inode.ino)

    def _free_inode(self, inode: Inode) -> None:
        for run in self._owned_runs(inode):
            self.free_block_run(*run)
        bit = inode.ino - 1
        self.inode_map.set_range(bit, 1, False)
        group = bit // self.geo.inodes_per_group
        self.dirty_inode_groups.add(group)
        if inode.is_dir:
            self.used_dirs[group] -= 1
        del self.inodes[inode.ino]
        self._live -= 1
        self.dirty_inodes.add(inode.ino)  # its table slot is rewritten as zeros
        self.dirty_dirs.discard(inode.ino)

    def _owned_runs(self, inode: Inode) -> Iterator[tuple[int, int]]:
        for e in inode.extents:
            yield e.physical, e.length
        yield from _runs_of(inode.tree_blocks)
        if inode.xattr_block:
            yield inode.xattr_block, 1

    def allocate_file_blocks(self, inode: Inode, count: int, logical: int = 0) -> list[Extent]:
        """Allocate `count` data blocks for file blocks logical.. and record them as extents."""
        extents = _runs_to_extents(self.allocate_blocks(count), logical)
        if not inode.extents:
            inode.extents = list(extents)  # never extend the shared empty list
            self.dirty_inodes.add(inode.ino)
            return extents
        if extents:
            last, first = inode.extents[-1], extents[0]
            if (
                last.logical + last.length == first.logical
                and last.physical + last.length == first.physical
                and last.length + first.length <= EXT_MAX_INIT_LEN
            ):
                inode.extents[-1] = Extent(last.logical, last.physical, last.length + first.length)
                extents = extents[1:]
        inode.extents.extend(extents)
        self.dirty_inodes.add(inode.ino)
        return extents

    def touch(self, inode: Inode) -> None:
        """Mark an inode whose attributes changed."""
        self.dirty_inodes.add(inode.ino)

    # ------------------------------------------------------------------ flushing a layer

    def flush(self, sink: BlockSink) -> None:
        """Write every metadata block changed since the last flush, then forget the changes."""
        for ino in sorted(self.dirty_dirs):
            if ino in self.inodes:
                self._write_directory(self.inodes[ino], sink)
        for ino in self.dirty_inodes:  # ascending
            inode = self.inodes.get(ino)
            if inode is not None:
                self._write_inode_blocks(inode, sink)
        self._write_inode_tables(sink)
        self._write_bitmaps_and_descriptors(sink)
        if self.raw_inodes:
            for ino in self.dirty_inodes:
                self.raw_inodes.pop(ino, None)
        self.dirty_inodes.clear()
        self.dirty_dirs.clear()
        self.dirty_block_groups.clear()
        self.dirty_inode_groups.clear()
        self._fresh = False
        if self._reserved - self._live > 2 * STEP:  # a layer removed many inodes: let others have them
            spare = (self._reserved - self._live) // STEP * STEP - STEP
            self._budget.give_back(self._budget_key, spare)
            self._reserved -= spare

    def _write_run(self, sink: BlockSink, blocks: list[int], data: list[bytes]) -> None:
        i = 0
        for start, count in _runs_of(blocks):
            sink.write(start * BLOCK_SIZE, b"".join(data[i : i + count]))
            i += count

    # directories -----------------------------------------------------

    def _write_directory(self, inode: Inode, sink: BlockSink) -> None:
        assert inode.children is not None
        entries = []
        subdirs = 0
        for name, child_ino in inode.children.items():
            child_mode = self.inodes[child_ino].mode
            file_type = FILE_TYPE_OF_MODE[child_mode & S_IFMT]
            subdirs += file_type == FT_DIR
            entries.append((name, child_ino, file_type))
        blocks, indexed = self._directory_blocks(inode.ino, inode.parent, entries)
        physical = _physical_blocks(inode.extents)
        if len(physical) > len(blocks):
            for run in _runs_of(physical[len(blocks) :]):
                self.free_block_run(*run)
            physical = physical[: len(blocks)]
        elif len(physical) < len(blocks):
            for start, count in self.allocate_blocks(len(blocks) - len(physical)):
                physical.extend(range(start, start + count))
        inode.extents = _runs_to_extents(list(_runs_of(physical)))
        self._write_run(sink, physical, blocks)
        inode.size = len(blocks) * BLOCK_SIZE
        inode.flags = EXT4_EXTENTS_FL | (EXT4_INDEX_FL if indexed else 0)
        links = 2 + subdirs
        inode.links = links if links <= EXT4_LINK_MAX else 1
        self.dirty_inodes.add(inode.ino)

    def _directory_blocks(
        self, ino: int, parent: int, entries: list[tuple[bytes, int, int]]
    ) -> tuple[list[bytes], bool]:
        linear_size = 24 + sum(dirent_size(len(name)) for name, _, _ in entries)
        if linear_size <= BLOCK_SIZE:
            # Sorted by name so the block depends only on the directory's content, not on history.
            dots = [(b".", ino, FT_DIR), (b"..", parent, FT_DIR)]
            return [_pack_dirent_block(dots + sorted(entries))], False
        return self._htree_blocks(ino, parent, entries), True

    def _htree_blocks(self, ino: int, parent: int, entries: list[tuple[bytes, int, int]]) -> list[bytes]:
        majors = dx_hash_many([name for name, _, _ in entries], self.seed)
        keyed = sorted(((major,), name, child, ft) for major, (name, child, ft) in zip(majors, entries, strict=True))
        # Fill leaves in hash order; entries sharing a major hash stay in one leaf so that every leaf
        # starts a new hash value and the index needs no collision-continuation bits.
        leaves: list[list[tuple[bytes, int, int]]] = [[]]
        leaf_hashes = [0]
        used = 0
        i = 0
        while i < len(keyed):
            major = keyed[i][0][0]
            j = i
            group_size = 0
            while j < len(keyed) and keyed[j][0][0] == major:
                group_size += dirent_size(len(keyed[j][1]))
                j += 1
            if group_size > BLOCK_SIZE:
                raise Ext4Error(f"directory inode {ino}: too many names share hash {major:#x}")
            if used + group_size > BLOCK_SIZE:
                leaves.append([])
                leaf_hashes.append(major)
                used = 0
            leaves[-1].extend((name, child, ft) for _, name, child, ft in keyed[i:j])
            used += group_size
            i = j
        leaf_blocks = [_pack_dirent_block(leaf) for leaf in leaves]
        n_leaves = len(leaf_blocks)
        if n_leaves <= DX_ROOT_LIMIT:
            root = _pack_dx_root(ino, parent, 0, list(zip(leaf_hashes, range(1, n_leaves + 1), strict=True)))
            return [root, *leaf_blocks]
        n_nodes = -(-n_leaves // DX_NODE_LIMIT)
        if n_nodes > DX_ROOT_LIMIT:
            raise Ext4Error(f"directory inode {ino} has too many entries for a two-level htree")
        first_leaf = 1 + n_nodes
        nodes = []
        root_entries = []
        for k in range(n_nodes):
            lo, hi = k * DX_NODE_LIMIT, min((k + 1) * DX_NODE_LIMIT, n_leaves)
            node_entries = [(leaf_hashes[x], first_leaf + x) for x in range(lo, hi)]
            nodes.append(_pack_dx_node(node_entries))
            root_entries.append((leaf_hashes[lo], 1 + k))
        return [_pack_dx_root(ino, parent, 1, root_entries), *nodes, *leaf_blocks]

    # inodes ------------------------------------------------------------

    def _write_inode_blocks(self, inode: Inode, sink: BlockSink) -> None:
        """EA block and extent tree of a changed inode; computes its in-inode xattr area."""
        entries = xattrs_mod.to_entries(inode.xattrs) if inode.xattrs else []
        area = xattrs_mod.pack_inode_area(entries)
        if area is None:
            block = xattrs_mod.pack_block(entries)
            if not inode.xattr_block:
                ((inode.xattr_block, _),) = self.allocate_blocks(1)
            sink.write(inode.xattr_block * BLOCK_SIZE, block)
            inode.xattr_area = b""
        else:
            if inode.xattr_block:
                self.free_block_run(inode.xattr_block, 1)
                inode.xattr_block = 0
            inode.xattr_area = area

        if inode.uses_extents:
            inode.flags |= EXT4_EXTENTS_FL
            self._write_extent_tree(inode, sink)

    @staticmethod
    def _extent_layout(extents: list[Extent], ino: int) -> tuple[list[list[Extent]], int, int]:
        """(leaves, depth, tree blocks needed): at most 4 extents in the inode, 340 per leaf or index block."""
        leaves = [extents[i : i + EXTENTS_PER_BLOCK] for i in range(0, len(extents), EXTENTS_PER_BLOCK)]
        if len(extents) <= EXTENTS_IN_INODE:
            return leaves, 0, 0
        if len(leaves) <= EXTENTS_IN_INODE:
            return leaves, 1, len(leaves)
        index_blocks = -(-len(leaves) // EXTENTS_PER_BLOCK)
        if index_blocks > EXTENTS_IN_INODE:
            raise Ext4Error(f"inode {ino}: {len(extents)} extents need a deeper extent tree")
        return leaves, 2, len(leaves) + index_blocks

    def _write_extent_tree(self, inode: Inode, sink: BlockSink) -> None:
        """Allocate (or reuse) and write the leaf and index blocks of a changed inode's extent tree."""
        if len(inode.extents) <= EXTENTS_IN_INODE and not inode.tree_blocks:
            return  # the common case: the extents fit in the inode and did not need a tree before
        leaves, depth, needed = self._extent_layout(inode.extents, inode.ino)
        if len(inode.tree_blocks) != needed:
            for run in _runs_of(inode.tree_blocks):
                self.free_block_run(*run)
            inode.tree_blocks = [b for start, n in self.allocate_blocks(needed) for b in range(start, start + n)]
        if depth == 0:
            return
        leaf_blocks = inode.tree_blocks[: len(leaves)]
        for leaf, blk in zip(leaves, leaf_blocks, strict=True):
            sink.write(blk * BLOCK_SIZE, pack_extent_node([e.pack() for e in leaf], EXTENTS_PER_BLOCK, 0, BLOCK_SIZE))
        if depth == 2:
            refs = [pack_extent_index(leaf[0].logical, blk) for leaf, blk in zip(leaves, leaf_blocks, strict=True)]
            for k, blk in enumerate(inode.tree_blocks[len(leaves) :]):
                chunk = refs[k * EXTENTS_PER_BLOCK : (k + 1) * EXTENTS_PER_BLOCK]
                sink.write(blk * BLOCK_SIZE, pack_extent_node(chunk, EXTENTS_PER_BLOCK, 1, BLOCK_SIZE))

    def _i_block(self, inode: Inode) -> bytes:
        """The inode's 60-byte i_block, derived from the model (so it is never stored per inode)."""
        kind = inode.kind
        if inode.uses_extents:
            extents = inode.extents
            if len(extents) <= EXTENTS_IN_INODE:
                return pack_extent_node([e.pack() for e in extents], EXTENTS_IN_INODE, 0, 60)
            leaves, depth, _ = self._extent_layout(extents, inode.ino)
            blocks = inode.tree_blocks
            if depth == 1:
                refs = [pack_extent_index(leaf[0].logical, blk) for leaf, blk in zip(leaves, blocks, strict=False)]
            else:
                index_blocks = blocks[len(leaves) :]
                refs = [pack_extent_index(leaves[k * EXTENTS_PER_BLOCK][0].logical, blk)
                        for k, blk in enumerate(index_blocks)]  # fmt: skip
            return pack_extent_node(refs, EXTENTS_IN_INODE, depth, 60)
        if kind == S_IFLNK:
            return inode.target.ljust(60, b"\0")
        if kind in (S_IFCHR, S_IFBLK):
            major, minor = inode.rdev
            if major < 256 and minor < 256:
                return struct.pack("<I", (major << 8) | minor).ljust(60, b"\0")
            new = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
            return struct.pack("<II", 0, new & 0xFFFFFFFF).ljust(60, b"\0")
        return bytes(60)

    def encode_inode(self, inode: Inode) -> bytes:
        t, extra = encode_time(inode.mtime, inode.mtime_ns)
        extents = inode.extents
        data_blocks = extents[0].length if len(extents) == 1 else sum(e.length for e in extents)
        blocks = data_blocks + len(inode.tree_blocks) + (1 if inode.xattr_block else 0)
        blocks *= BLOCK_SIZE // 512
        size, acl, uid, gid = inode.size, inode.xattr_block, inode.uid, inode.gid
        # One struct for the 128-byte core and the 32 extra bytes (see layout.RawInode for the fields).
        head = _INODE_HEAD.pack(
            inode.mode, uid & 0xFFFF, size & 0xFFFFFFFF, t, t, t, 0, gid & 0xFFFF, inode.links,
            blocks & 0xFFFFFFFF, inode.flags, 0, self._i_block(inode), 0, acl & 0xFFFFFFFF, size >> 32, 0,
            blocks >> 32, acl >> 32, uid >> 16, gid >> 16, 0, 0,
            EXTRA_ISIZE, 0, extra, extra, extra, 0, 0, 0, 0,
        )  # fmt: skip
        return head + inode.xattr_area.ljust(INODE_SIZE - len(head), b"\0")

    def _write_inode_tables(self, sink: BlockSink) -> None:
        ipg = self.geo.inodes_per_group
        table_blocks: list[int] = []
        for ino in self.dirty_inodes:  # ascending
            tb = (ino - 1) // INODES_PER_TABLE_BLOCK
            if not table_blocks or table_blocks[-1] != tb:
                table_blocks.append(tb)
        zero = bytes(INODE_SIZE)
        for start, count in _bounded_runs(table_blocks, TABLE_BLOCKS_PER_WRITE):
            chunk = []
            for tb in range(start, start + count):
                first = tb * INODES_PER_TABLE_BLOCK + 1
                parts = []
                for ino in range(first, first + INODES_PER_TABLE_BLOCK):
                    raw = self.raw_inodes.get(ino)
                    if raw is not None and ino not in self.dirty_inodes:
                        parts.append(raw)
                        continue
                    inode = self.inodes.get(ino)
                    parts.append(zero if inode is None else self.encode_inode(inode))
                chunk.append(b"".join(parts))
            # Consecutive table blocks of one group are consecutive on disk; split at group ends.
            i = 0
            while i < count:
                tb = start + i
                group, index_in_group = divmod(tb * INODES_PER_TABLE_BLOCK, ipg)
                room = (ipg - index_in_group) // INODES_PER_TABLE_BLOCK
                n = min(room, count - i)
                disk = self.group_meta[group][2] + index_in_group // INODES_PER_TABLE_BLOCK
                sink.write(disk * BLOCK_SIZE, b"".join(chunk[i : i + n]))
                i += n

    # bitmaps, descriptors, superblock ---------------------------------

    def _group_descriptor(self, group: int) -> GroupDesc:
        block_bitmap, inode_bitmap, inode_table = self.group_meta[group]
        desc = GroupDesc(
            block_bitmap=block_bitmap,
            inode_bitmap=inode_bitmap,
            inode_table=inode_table,
            free_blocks_count=self.free_blocks[group],
            free_inodes_count=self.free_inodes[group],
            used_dirs_count=self.used_dirs[group],
            flags=self.bg_flags[group],
            itable_unused=self.itable_unused[group],
        )
        if self.gdt_csum:
            desc.checksum = group_desc_checksum(self.sb.s_uuid, group, desc.encode())
        return desc

    def _write_bitmaps_and_descriptors(self, sink: BlockSink) -> None:
        geo = self.geo
        ipg_bytes = geo.inodes_per_group // 8
        padding = b"\xff" * (BLOCK_SIZE - ipg_bytes)
        for group in sorted(self.dirty_block_groups):
            bits = self.block_map.bits[group * BLOCK_SIZE : (group + 1) * BLOCK_SIZE]
            self.free_blocks[group] = BLOCKS_PER_GROUP - self.block_map.count_set(
                group * BLOCK_SIZE, (group + 1) * BLOCK_SIZE
            )
            self.bg_flags[group] &= ~BG_BLOCK_UNINIT  # the bitmap is on disk from now on
            if not (self._fresh and not any(bits)):
                sink.write(self.group_meta[group][0] * BLOCK_SIZE, bytes(bits))
        for group in sorted(self.dirty_inode_groups):
            bits = self.inode_map.bits[group * ipg_bytes : (group + 1) * ipg_bytes]
            self.free_inodes[group] = geo.inodes_per_group - self.inode_map.count_set(
                group * ipg_bytes, (group + 1) * ipg_bytes
            )
            if self.gdt_csum:
                # Inodes past the last used one stay "unused": e2fsck and the kernel skip them.
                last = self.inode_map.find_last_set(group * geo.inodes_per_group, (group + 1) * geo.inodes_per_group)
                used = 0 if last is None else last - group * geo.inodes_per_group + 1
                self.itable_unused[group] = geo.inodes_per_group - used
                self.bg_flags[group] &= ~BG_INODE_UNINIT
            sink.write(self.group_meta[group][1] * BLOCK_SIZE, bytes(bits) + padding)

        gdt = b"".join(self._group_descriptor(g).encode() for g in range(geo.groups))
        gdt = gdt.ljust(geo.gdt_blocks * BLOCK_SIZE, b"\0")
        self.sb.free_blocks_count = sum(self.free_blocks)
        self.sb.s_free_inodes_count = sum(self.free_inodes)
        sink.write(BLOCK_SIZE, gdt)
        block0 = bytearray(BLOCK_SIZE)
        block0[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + 1024] = self.sb.encode(0)
        sink.write(0, bytes(block0))
        if self._fresh:
            # Backup superblocks and descriptor tables, written once by mkfs like mke2fs does.
            for group in range(1, geo.groups):
                if geo.has_super(group):
                    backup = self.sb.encode(group).ljust(BLOCK_SIZE, b"\0")
                    sink.write(geo.group_start(group) * BLOCK_SIZE, backup + gdt)
            self.sb.s_block_group_nr = 0


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """The kernel's crc16 (reflected polynomial 0xA001), as used for uninit_bg descriptor checksums."""
    for byte in data:
        crc = (crc >> 8) ^ _CRC16[(crc ^ byte) & 0xFF]
    return crc


def group_desc_checksum(fs_uuid: bytes, group: int, desc: bytes) -> int:
    """bg_checksum: crc16 over the fs UUID, the group number and the descriptor minus its checksum field."""
    return crc16(desc[32:], crc16(desc[:30], crc16(struct.pack("<I", group), crc16(fs_uuid))))


def _pack_dirent_block(entries: list[tuple[bytes, int, int]]) -> bytes:
    """Linear directory block: entries packed, the last one's rec_len reaching the block end."""
    parts = []
    used = 0
    for k, (name, ino, file_type) in enumerate(entries):
        size = dirent_size(len(name))
        rec_len = BLOCK_SIZE - used if k == len(entries) - 1 else size
        parts.append(pack_dirent(ino, name, file_type, rec_len).ljust(size, b"\0"))
        used += size
    return b"".join(parts).ljust(BLOCK_SIZE, b"\0")


def _pack_dx_entries(limit: int, entries: list[tuple[int, int]]) -> bytes:
    """dx_countlimit (overlaying entry 0's hash) + entries; entry 0 covers every hash below entry 1."""
    out = [DX_COUNT_LIMIT.pack(limit, len(entries), entries[0][1])]
    out.extend(DX_ENTRY.pack(h, blk) for h, blk in entries[1:])
    return b"".join(out)


def _pack_dx_root(ino: int, parent: int, levels: int, entries: list[tuple[int, int]]) -> bytes:
    head = (
        DIRENT_HEADER.pack(ino, 12, 1, FT_DIR)
        + b".\0\0\0"
        + DIRENT_HEADER.pack(parent, BLOCK_SIZE - 12, 2, FT_DIR)
        + b"..\0\0"
        + DX_ROOT_INFO.pack(0, DX_HASH_HALF_MD4, 8, levels, 0)
    )
    return (head + _pack_dx_entries(DX_ROOT_LIMIT, entries)).ljust(BLOCK_SIZE, b"\0")


def _pack_dx_node(entries: list[tuple[int, int]]) -> bytes:
    head = DIRENT_HEADER.pack(0, BLOCK_SIZE, 0, 0)
    return (head + _pack_dx_entries(DX_NODE_LIMIT, entries)).ljust(BLOCK_SIZE, b"\0")
