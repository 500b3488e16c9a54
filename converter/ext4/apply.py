"""Apply one OCI layer tar to the in-memory filesystem, with OCI / containerd semantics.

Rules (reference §4.5 and §9): names are cleaned like `Clean("/" + name)` so nothing escapes the root;
parents that are symlinks are followed inside the image root (containerd's `fs.RootPath`); missing
parents are created (0755, root, time 0); `.wh.<name>` removes a lower path and `.wh..wh..opq` hides
every lower child of its directory, but neither touches what this same layer created; a new entry
replaces an existing one of another type, while a re-declared directory keeps its children and takes
the new metadata; a hardlink's target must exist already.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from ..errors import MAX_NAME, shorten
from .bitmap import BitSet
from .fs import BlockSink, Ext4Error, Filesystem, Inode
from .layerstream import LayerStream
from .layout import (
    BLOCK_SIZE,
    EXT4_NAME_LEN,
    FAST_SYMLINK_MAX,
    ROOT_INO,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    Extent,
)
from .tarstream import (
    BLOCKDEV,
    CHARDEV,
    DIRECTORY,
    FIFO,
    GNU_DUMPDIR,
    HARDLINK,
    SYMLINK,
    TarEntry,
    TarFormatError,
    TarReader,
    display,
)
from .xattr import XattrError, split_name

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
MAX_SYMLINK_FOLLOWS = 255
MAX_SYMLINK_TARGET = BLOCK_SIZE - 1
ZERO_BLOCK = bytes(BLOCK_SIZE)
SECTOR_SIZE = 512  # the LSMT's unit: TurboOCI maps file data to the tar sector by sector
DATA_CHUNK = 1 << 20  # file data is read and written in 1 MiB pieces (a multiple of the block size)


class RemoteSink(Protocol):
    """The TurboOCI meta layer as the applier sees it (converter.formats.warp.MetaLayerWriter): a BlockSink
    for metadata plus tag-1 mappings of file blocks to the file's bytes in the uncompressed layer tar."""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def map_remote(self, offset: int, length: int, tar_offset: int) -> None:
        """`length` bytes (rounded up to 512 by the writer) at disk byte `offset` are tar bytes `tar_offset`.."""


class LayerApplyError(Exception):
    """A layer could not be applied. The message names the layer and the tar entry."""

    def __init__(self, layer: str, entry: str | None, problem: str) -> None:
        entry = shorten(entry, MAX_NAME) if entry else entry
        problem = shorten(problem)
        where = f"layer {layer}" + (f", entry {entry!r}" if entry else "")
        super().__init__(f"{where}: {problem}")
        self.layer = layer
        self.entry = entry
        self.problem = problem


@dataclass
class LayerStats:
    entries: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    whiteouts: int = 0
    data_bytes: int = 0  # file content bytes taken from the tar
    warnings: list[str] = field(default_factory=list)


def clean_path(name: bytes) -> list[bytes]:
    """Components of Clean("/" + name): '.', empty parts and any '..' above the root are dropped."""
    parts: list[bytes] = []
    for comp in name.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(comp)
    return parts


class _CoalescingSink:
    """Joins writes of small files to consecutive blocks (they are allocated one after the other) into
    fewer, larger writes, to save the per-call cost downstream; anything of SMALL bytes or more passes
    straight through. Small pieces are kept as they are (views of the tar reader's immutable chunks, or
    bytes) and joined once, at flush: a caller must not change a buffer after writing it."""

    LIMIT = 1 << 20
    SMALL = 64 << 10

    def __init__(self, sink: BlockSink) -> None:
        self._sink = sink
        self._pieces: list[bytes | memoryview] = []
        self._start = 0
        self._end = 0

    def write(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if self._pieces and n < self.SMALL and offset == self._end and self._end - self._start + n <= self.LIMIT:
            self._pieces.append(data)
            self._end += n
            return
        self.flush()
        if n >= self.SMALL:
            self._sink.write(offset, data)
        else:
            self._pieces.append(data)
            self._start, self._end = offset, offset + n

    def flush(self) -> None:
        if self._pieces:
            pieces, self._pieces = self._pieces, []
            self._sink.write(self._start, pieces[0] if len(pieces) == 1 else b"".join(pieces))


class _TeeSink:
    """Metadata for both outputs of a `--overlaybd T1 --turboOCI T2` run: the same blocks to both sinks."""

    def __init__(self, *sinks: BlockSink) -> None:
        self._sinks = sinks

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        for sink in self._sinks:
            sink.write(offset, data)

    def flush(self) -> None:
        for sink in self._sinks:
            if isinstance(sink, _CoalescingSink):
                sink.flush()


class LayerApplier:
    """Applies one layer. Create one per layer: it remembers which names this layer created.

    Output modes (the filesystem and its block allocation are the same in all three):
      * native (`sink`, no `turbo`): metadata and file data are written to `sink`;
      * turbo (`turbo`, no `sink`): metadata is written to `turbo`, file data is not read at all; each
        file's blocks are mapped to its bytes in the uncompressed tar (`turbo.map_remote`, TurboOCI §2.6);
      * both (`sink` and `turbo`): metadata to both, file data to `sink`, mappings to `turbo`.
    """

    def __init__(self, fs: Filesystem, sink: BlockSink | None, label: str, turbo: RemoteSink | None = None) -> None:
        if sink is None and turbo is None:
            raise ValueError("a layer needs a native sink, a turbo meta sink, or both")
        self.fs = fs
        self.turbo = turbo
        # file data (native output only), and metadata written while the tar is read (long symlinks)
        self._data: _CoalescingSink | None = None if sink is None else _CoalescingSink(sink)
        meta = None if turbo is None else _CoalescingSink(turbo)
        self.sink: _CoalescingSink | _TeeSink = (
            self._data if meta is None else meta if self._data is None else _TeeSink(self._data, meta)  # type: ignore[assignment]
        )
        self._final_sink: BlockSink = (
            sink if turbo is None else turbo if sink is None else _TeeSink(sink, turbo)  # type: ignore[assignment]
        )
        # turbo: per inode created by this layer, its (file offset, length, tar offset) data runs; emitted
        # at the end of the layer for inodes still alive, so a file replaced or deleted in the same layer
        # leaves no mapping onto blocks that were freed (and possibly reused by metadata)
        self._remote: dict[int, tuple[Inode, list[tuple[int, int, int]]]] = {}
        self.label = label
        self.stats = LayerStats()
        # What this layer created or re-declared, for its own whiteouts: the inodes its names lead to (a new
        # inode, or a directory, which has one name) in a bitmap, which costs nothing per entry, and the
        # hardlink names apart (their inode may be a lower layer's, with lower names of its own).
        self._added_inodes = BitSet(fs.geo.inodes_count + 1)
        self._added_links: dict[int, set[bytes]] = {}  # directory inode -> hardlink names made in it
        # Parent paths already resolved in this layer; valid until something is removed.
        self._dir_cache: dict[tuple[bytes, ...], int] = {}

    def apply(self, stream: BinaryIO | LayerStream) -> LayerStats:
        """Read the layer (gzip, zstd or plain tar), change the filesystem, write data and metadata.

        A LayerStream is read as it is (the caller may want its content hash); any other stream is wrapped
        in one for the duration of the call."""
        if not isinstance(stream, LayerStream):
            with LayerStream(stream) as own:
                return self.apply(own)
        self.fs.reset_cursors()
        reader: TarReader | None = None
        try:
            reader = TarReader(stream)
            for entry in reader:
                self.stats.entries += 1
                self._apply_entry(reader, entry)
        except LayerApplyError:
            raise
        except TarFormatError as exc:
            raise LayerApplyError(self.label, exc.entry or self._current_name(reader), str(exc)) from exc
        except (Ext4Error, XattrError) as exc:
            raise LayerApplyError(self.label, self._current_name(reader), str(exc)) from exc
        except (OSError, EOFError, ValueError) as exc:
            # Decompression errors (truncated or corrupt gzip/zstd) surface here.
            problem = f"cannot read layer data: {exc.__class__.__name__}: {exc}"
            raise LayerApplyError(self.label, self._current_name(reader), problem) from exc
        self.sink.flush()
        if self._data is not None:
            self._data.flush()
        if self.turbo is not None:
            self._emit_remote(self.turbo)
        self.fs.flush(self._final_sink)
        return self.stats

    @staticmethod
    def _current_name(reader: TarReader | None) -> str | None:
        return reader.current.display_name if reader is not None and reader.current is not None else None

    # ------------------------------------------------------------------ entries

    def _apply_entry(self, reader: TarReader, entry: TarEntry) -> None:
        comps = clean_path(entry.name)
        if comps and max(map(len, comps)) > EXT4_NAME_LEN:
            comp = max(comps, key=len)
            if len(comp) > EXT4_NAME_LEN:
                raise LayerApplyError(
                    self.label,
                    entry.display_name,
                    f"name component longer than {EXT4_NAME_LEN} bytes ({len(comp)})",
                )
        if not comps:
            if entry.type in (DIRECTORY, GNU_DUMPDIR):
                self._set_metadata(self.fs.inodes[ROOT_INO], entry)
            return
        base = comps[-1]
        parent = self._resolve_dir(comps[:-1], entry)
        if base.startswith(WHITEOUT_PREFIX):
            self.stats.whiteouts += 1
            if base == OPAQUE_MARKER:
                self._clear_lower(parent)
            elif not base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):  # other .wh..wh.* are meta files
                self._whiteout(parent, base[len(WHITEOUT_PREFIX) :])
            return

        fs = self.fs
        existing = fs.lookup(parent, base)
        if entry.type in (DIRECTORY, GNU_DUMPDIR):
            self.stats.directories += 1
            if existing is not None and fs.inodes[existing].is_dir:
                self._set_metadata(fs.inodes[existing], entry)
            else:
                if existing is not None:
                    self._remove(parent, base)
                inode = fs.mkdir(parent, base, entry.mode & 0o7777)
                self._set_metadata(inode, entry)
        elif entry.type == HARDLINK:
            self.stats.hardlinks += 1
            target_ino = self._resolve_link_target(entry)
            if existing != target_ino:
                if existing is not None:
                    self._remove(parent, base)
                fs.add_hardlink(parent, base, fs.inodes[target_ino])
            # Like overlaybd-apply (and the real tools' output), the hardlink header's metadata is
            # applied to the shared inode; tar writers emit the same inode metadata for both names.
            self._set_metadata(fs.inodes[target_ino], entry)
        else:
            if existing is not None:
                self._remove(parent, base)
            inode = self._create_node(reader, entry)
            fs.link(parent, base, inode)
        if entry.type == HARDLINK:
            self._added_links.setdefault(parent, set()).add(base)
        else:
            self._added_inodes.add(fs.lookup(parent, base))  # type: ignore[arg-type]

    def _create_node(self, reader: TarReader, entry: TarEntry) -> Inode:
        fs = self.fs
        if entry.is_regular:
            self.stats.files += 1
            inode = fs.new_inode(S_IFREG | (entry.mode & 0o7777))
            self._set_metadata(inode, entry)
            if entry.sparse is not None:
                self._write_sparse_data(reader, inode, entry)
            else:
                self._write_data(reader, inode, entry.size)
            return inode
        if entry.type == SYMLINK:
            self.stats.symlinks += 1
            target = entry.linkname
            if not target or len(target) > MAX_SYMLINK_TARGET:
                raise Ext4Error(f"symlink target must be 1..{MAX_SYMLINK_TARGET} bytes, got {len(target)}")
            inode = fs.new_inode(S_IFLNK | 0o777)
            self._set_metadata(inode, entry)
            inode.target = target
            inode.size = len(target)
            if len(target) > FAST_SYMLINK_MAX:
                (extent,) = fs.allocate_file_blocks(inode, 1)
                self.sink.write(extent.physical * BLOCK_SIZE, target.ljust(BLOCK_SIZE, b"\0"))
            return inode
        if entry.type in (CHARDEV, BLOCKDEV, FIFO):
            self.stats.devices += 1
            kind = {CHARDEV: S_IFCHR, BLOCKDEV: S_IFBLK, FIFO: S_IFIFO}[entry.type]
            inode = fs.new_inode(kind | (entry.mode & 0o7777))
            self._set_metadata(inode, entry)
            inode.rdev = (entry.devmajor, entry.devminor)
            return inode
        raise Ext4Error(f"unsupported tar entry type {entry.type!r}")

    def _set_metadata(self, inode: Inode, entry: TarEntry) -> None:
        intern = self.fs.intern
        if inode.kind != S_IFLNK:
            inode.mode = intern((inode.mode & ~0o7777) | (entry.mode & 0o7777))
        if entry.uid < 0 or entry.uid > 0xFFFFFFFF or entry.gid < 0 or entry.gid > 0xFFFFFFFF:
            raise Ext4Error(f"uid/gid out of range: {entry.uid}/{entry.gid}")
        inode.uid, inode.gid = intern(entry.uid), intern(entry.gid)
        inode.mtime, inode.mtime_ns = intern(entry.mtime), entry.mtime_ns
        xattrs = {}
        for name, value in entry.xattrs.items():
            try:
                split_name(name)
            except XattrError as exc:
                self.stats.warnings.append(f"{entry.display_name}: {exc}; skipped")
                log.warning("layer %s: %s: %s; skipped", self.label, entry.display_name, exc)
                continue
            xattrs[name] = value
        if xattrs or inode.xattrs:
            inode.xattrs = xattrs
        self.fs.touch(inode)

    # ------------------------------------------------------------------ file data

    def _write_data(self, reader: TarReader, inode: Inode, size: int) -> None:
        inode.size = size
        if not size:
            return
        extents = self.fs.allocate_file_blocks(inode, -(-size // BLOCK_SIZE))
        if self.turbo is not None:
            assert reader.current is not None
            self._remote[inode.ino] = (inode, [(0, size, reader.current.data_offset)])
            if self._data is None:
                self.stats.data_bytes += size
                return  # the tar reader skips the data
        sink = self._data
        assert sink is not None
        remaining = size
        for extent in extents:
            offset = extent.physical * BLOCK_SIZE
            room = extent.length * BLOCK_SIZE
            while room and remaining:
                n = min(room, DATA_CHUNK, remaining)
                data = reader.read_exact(n)
                full = n - n % BLOCK_SIZE
                if full == n:
                    sink.write(offset, data)
                else:
                    # Only the file's last block needs zero padding: copy just that block.
                    if full:
                        sink.write(offset, data[:full])
                    sink.write(offset + full, b"".join((data[full:], ZERO_BLOCK[: BLOCK_SIZE - (n - full)])))
                written = full if full == n else full + BLOCK_SIZE
                offset += written
                room -= written
                remaining -= n
        self.stats.data_bytes += size

    def _write_sparse_data(self, reader: TarReader, inode: Inode, entry: TarEntry) -> None:
        """GNU sparse file: allocate only the blocks its data segments touch; holes stay unmapped."""
        segments = [(off, n) for off, n in entry.sparse or [] if n]
        inode.size = entry.realsize
        end_prev = 0
        for off, n in segments:
            if off < end_prev or off + n > entry.realsize:
                raise Ext4Error(f"GNU sparse map is unsorted, overlapping or beyond the file size at offset {off}")
            end_prev = off + n
        if sum(n for _, n in segments) != entry.size:
            raise Ext4Error(f"GNU sparse map covers {sum(n for _, n in segments)} bytes but {entry.size} are stored")
        # Block ranges covering the segments, merged where they touch.
        ranges: list[list[int]] = []
        for off, n in segments:
            b0, b1 = off // BLOCK_SIZE, -(-(off + n) // BLOCK_SIZE)
            if ranges and b0 <= ranges[-1][1]:
                ranges[-1][1] = max(ranges[-1][1], b1)
            else:
                ranges.append([b0, b1])
        mapped: list[tuple[int, int, int]] = []
        if self.turbo is not None:
            mapped = _sparse_remote_runs(segments, entry.data_offset)
            self._remote[inode.ino] = (inode, mapped)
        seg_index, seg_pos = 0, segments[0][0] if segments else 0
        window_blocks = DATA_CHUNK // BLOCK_SIZE
        for b0, b1 in ranges:
            extents = self.fs.allocate_file_blocks(inode, b1 - b0, logical=b0)
            for w0 in range(b0, b1, window_blocks):
                w1 = min(b1, w0 + window_blocks)
                lo, hi = w0 * BLOCK_SIZE, w1 * BLOCK_SIZE
                window = bytearray(hi - lo)
                while seg_index < len(segments):
                    off, n = segments[seg_index]
                    seg_pos = max(seg_pos, off)
                    if seg_pos >= hi:
                        break
                    take = min(off + n, hi) - seg_pos
                    window[seg_pos - lo : seg_pos - lo + take] = reader.read_exact(take)
                    seg_pos += take
                    if seg_pos == off + n:
                        seg_index += 1
                    else:
                        break
                if self._data is not None:
                    self._write_logical(self._data, extents, w0 * BLOCK_SIZE, window)
                if self.turbo is not None:
                    # Every sector of an allocated block that is not mapped to the tar (holes inside the
                    # file, segment edges off the 512 grid) is written as metadata: left unmapped it would
                    # read a lower layer's stale block.
                    for a, b in _gaps(mapped, lo, hi):
                        self._write_logical(self.sink, extents, a, memoryview(window)[a - lo : b - lo])
        self.stats.data_bytes += entry.size

    @staticmethod
    def _write_logical(sink: BlockSink, extents: list[Extent], start: int,
                       data: bytes | bytearray | memoryview) -> None:
        """Write `data` (a multiple of 512 bytes) at file byte `start` through the file's extents."""
        view = memoryview(data)
        for disk_offset, n in _physical_runs(extents, start, len(view)):
            sink.write(disk_offset, view[:n])
            view = view[n:]

    def _emit_remote(self, turbo: RemoteSink) -> None:
        """Map the data runs of this layer's files that are still alive (TurboOCI §2.6 step 4)."""
        inodes = self.fs.inodes
        for ino, (inode, runs) in self._remote.items():
            if inodes.get(ino) is not inode:
                continue  # replaced or deleted within this layer: its blocks are free (or reused)
            for start, length, tar_offset in runs:
                for disk_offset, n in _physical_runs(inode.extents, start, length):
                    turbo.map_remote(disk_offset, n, tar_offset)
                    tar_offset += n
        self._remote.clear()

    # ------------------------------------------------------------------ paths (see below for turbo helpers)

    def _resolve_dir(self, comps: list[bytes], entry: TarEntry, create: bool = True) -> int:
        """Directory inode for parent components, following symlinks inside the root (fs.RootPath)."""
        key = tuple(comps)
        if create:
            cached = self._dir_cache.get(key)
            if cached is not None:
                return cached
        fs = self.fs
        stack = [ROOT_INO]
        pending = list(comps)
        follows = 0
        while pending:
            name = pending.pop(0)
            if name in (b"", b"."):
                continue
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            current = stack[-1]
            child = fs.lookup(current, name)
            if child is None:
                if not create:
                    raise Ext4Error(f"path component {name!r} does not exist")
                inode = fs.mkdir(current, name, 0o755)
                self._added_inodes.add(inode.ino)
                stack.append(inode.ino)
                continue
            inode = fs.inodes[child]
            if inode.kind == S_IFLNK:
                follows += 1
                if follows > MAX_SYMLINK_FOLLOWS:
                    raise Ext4Error("too many levels of symbolic links in the parent path")
                if inode.target.startswith(b"/"):
                    stack = [ROOT_INO]
                pending = inode.target.split(b"/") + pending
                continue
            if inode.kind != S_IFDIR:
                raise Ext4Error(
                    f"parent path component {name.decode('utf-8', 'backslashreplace')!r} is not a directory"
                )
            if create:
                # Every directory on an entry's path belongs to this layer's upper tree (as in an
                # overlayfs upper dir), so a later opaque marker or whiteout of the same layer keeps it.
                self._added_inodes.add(child)
            stack.append(child)
        if create:
            self._dir_cache[key] = stack[-1]
        return stack[-1]

    def _resolve_link_target(self, entry: TarEntry) -> int:
        comps = clean_path(entry.linkname)
        shown = display(entry.linkname)
        if not comps:
            raise Ext4Error(f"hardlink to the root directory ({shown!r})")
        try:
            parent = self._resolve_dir(comps[:-1], entry, create=False)
        except Ext4Error:
            parent = None
        target = None if parent is None else self.fs.lookup(parent, comps[-1])
        if target is None:
            raise Ext4Error(f"hardlink target {shown!r} does not exist")
        if self.fs.inodes[target].is_dir:
            raise Ext4Error(f"hardlink target {shown!r} is a directory")
        return target

    # ------------------------------------------------------------------ whiteouts

    def _remove(self, parent: int, name: bytes) -> None:
        self._dir_cache.clear()
        self.fs.remove(parent, name)

    def _whiteout(self, parent: int, name: bytes) -> None:
        child = self.fs.lookup(parent, name)
        if child is None:
            return
        if self._is_added(parent, name, child):
            # Created by this layer: the whiteout only hides what lies below it.
            if self.fs.inodes[child].is_dir:
                self._clear_lower(child)
            return
        self._remove(parent, name)

    def _is_added(self, parent: int, name: bytes, child: int) -> bool:
        """Did this layer create (or re-declare) `name` in directory `parent`, which leads to `child`?"""
        return child in self._added_inodes or name in self._added_links.get(parent, ())

    def _clear_lower(self, dir_ino: int) -> None:
        """Remove every child of a directory that this layer did not create (recursively for kept dirs)."""
        children = self.fs.inodes[dir_ino].children
        assert children is not None
        for name, child in list(children.items()):
            if not self._is_added(dir_ino, name, child):
                self._remove(dir_ino, name)
            elif self.fs.inodes[child].is_dir:
                self._clear_lower(child)


# ---------------------------------------------------------------------------------------- turbo helpers


def _physical_runs(extents: list[Extent], start: int, length: int) -> Iterator[tuple[int, int]]:
    """(disk byte offset, bytes) pieces of file bytes start..start+length, following the extents in order.
    The last piece may end inside a block (a file's partial last block)."""
    end = start + length
    for e in extents:
        lo, hi = e.logical * BLOCK_SIZE, (e.logical + e.length) * BLOCK_SIZE
        if hi <= start or lo >= end:
            continue
        a, b = max(lo, start), min(hi, end)
        yield e.physical * BLOCK_SIZE + (a - lo), b - a


def _sparse_remote_runs(segments: list[tuple[int, int]], data_offset: int) -> list[tuple[int, int, int]]:
    """The 512-aligned parts of a sparse file's data segments as (file offset, length, tar offset) runs.

    Segments are stored back to back in the tar, so only those whose file offset and tar offset agree
    modulo 512 can be mapped sector by sector; anything else is written as metadata by the caller."""
    runs: list[tuple[int, int, int]] = []
    tar = data_offset
    for off, n in segments:
        if (tar - off) % SECTOR_SIZE == 0:
            a = -(-off // SECTOR_SIZE) * SECTOR_SIZE
            b = (off + n) // SECTOR_SIZE * SECTOR_SIZE
            if b > a:
                runs.append((a, b - a, tar + (a - off)))
        tar += n
    return runs


def _gaps(runs: list[tuple[int, int, int]], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The parts of file bytes lo..hi that no run covers (runs sorted by file offset, non-overlapping)."""
    pos = lo
    for start, length, _ in runs:
        end = start + length
        if end <= pos:
            continue
        if start >= hi:
            break
        if start > pos:
            yield pos, start
        pos = max(pos, end)
        if pos >= hi:
            return
    if pos < hi:
        yield pos, hi
