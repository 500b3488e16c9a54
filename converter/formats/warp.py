"""TurboOCI meta layers (turbooci reference §2): the LSMT "warp file" inside `ext4.fs.meta`, writer side.

A warp file is a committed LSMT layer whose index entries carry a meaningful tag (§2.4):

    tag 0 (fsMeta)      moffset = sector in this LSMT blob (its data follows the 4 KiB header, in LBA order)
    tag 1 (remoteData)  moffset = byte offset in the *uncompressed* original layer tar / 512

Layout (§2.3): header (flags 7) | tag-0 data in LBA order | index, NOT padded | trailer (flags 6), with
all-zero UUIDs, version 1.1 and a 64 GiB virtual size, stored as a bare ZFile (LZ4, 4 KiB blocks, verify,
no tar wrapper, §2.1). The reading side is LsmtLayer(..., warp=True) in lsmt.py, stacked by stack.py.

The ext4 builder writes metadata in any order and may write a block several times, so tag-0 data goes to
an anonymous spool file next to the output as it arrives; close() resolves "later call wins" per sector
over all tag-0 writes and tag-1 maps, then copies the surviving tag-0 data out in LBA order. Memory
holds one small record per call, never data.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from .common import SECTOR, BytesLike, CommitOnExit, FormatError
from .layer import sha256_file
from .lsmt import (
    HEADER_FLAGS_COMMITTED,
    HT_SPACE,
    MAX_LENGTH,
    MAX_LSMT_RO_INDEX_SIZE,
    TRAILER_FLAGS_COMMITTED,
    LsmtHeaderTrailer,
    pack_entry,
    resolve_extents,
)
from .zfile import ZFileWriter

TAG_FS_META = 0  # SegmentType fsMeta: data in this blob
TAG_REMOTE_DATA = 1  # SegmentType remoteData: data in the original layer's uncompressed tar
DEFAULT_META_VSIZE = 64 << 30  # every turbo layer, upper ones included (§2.2)
REMOTE_SPLIT = MAX_LENGTH  # tag-1 runs are cut into chunks of exactly 16383 sectors (§2.4)
META_SPLIT = 16376  # tag-0 runs: what compress_raw_index's greedy merge of 4 KiB writes leaves (2047 blocks)
COPY_CHUNK = 8 << 20  # tag-0 data is copied from the spool in pieces of at most this size
SPOOL_BUFFER = 1 << 20
_ZEROED = 1 << 63  # marks a zeroed run in the records' moffset array (real moffsets are < 2**55)

# (lba, length, moffset, zeroed, tag), all in sectors
WarpEntry = tuple[int, int, int, bool, int]


@dataclass(frozen=True)
class MetaLayerInfo:
    path: str
    digest: str  # "sha256:<hex>" of the ext4.fs.meta file (the ZFile)
    size: int  # bytes of the ZFile
    lsmt_size: int  # bytes of the LSMT warp file inside (not a multiple of 512: the index is not padded)
    data_bytes: int  # tag-0 data section
    index_entries: int
    tag0_entries: int
    tag1_entries: int
    tar_end: int  # highest tar byte a tag-1 entry reads (exclusive); 0 without tag-1 entries


def merge_raw_index(entries: Iterable[WarpEntry]) -> list[WarpEntry]:
    """overlaybd's compress_raw_index (§2.4, OBD §1.6): merge an entry into the previous one when they are
    adjacent in LBA, their data is contiguous (zeroed: same moffset), the zeroed flag and the tag agree,
    and the combined length stays under 16383 sectors."""
    out: list[WarpEntry] = []
    for lba, n, moff, zero, tag in entries:
        if out:
            plba, pn, pmoff, pzero, ptag = out[-1]
            mend = pmoff if pzero else pmoff + pn
            if plba + pn == lba and mend == moff and pzero == zero and ptag == tag and pn + n < MAX_LENGTH:
                out[-1] = (plba, pn + n, pmoff, pzero, ptag)
                continue
        out.append((lba, n, moff, zero, tag))
    return out


class MetaLayerWriter(CommitOnExit):
    """Writes one turbo meta layer (`ext4.fs.meta`) to `path`; a BlockSink for the ext4 builder.

    write(offset, data) and zero(offset, length) take byte offsets and lengths that are multiples of 512
    (tag 0); map_remote(offset, length, tar_offset) maps `length` bytes of the disk at `offset` to the
    uncompressed tar at `tar_offset` (tag 1). Per sector the latest call wins. close() writes the blob
    and returns its MetaLayerInfo; abort() (or leaving a `with` block by an exception) removes it.
    """

    def __init__(self, path: str | os.PathLike[str], *, virtual_size: int = DEFAULT_META_VSIZE,
                 workers: int | None = None) -> None:
        if virtual_size <= 0 or virtual_size % SECTOR:
            raise FormatError(f"meta layer virtual_size {virtual_size} must be a positive multiple of {SECTOR}")
        self.path = os.fspath(path)
        self.virtual_size = virtual_size
        self._workers = workers
        self._lbas = array("Q")
        self._lens = array("Q")
        self._moffs = array("Q")  # tag 0: sector in the spool (| _ZEROED); tag 1: tar sector
        self._tags = bytearray()
        self._spool_sectors = 0
        self._done = False
        self.info: MetaLayerInfo | None = None  # set by close()
        spool_dir = os.path.dirname(os.path.abspath(self.path))
        # buffered: the builder's metadata comes as many 4 KiB writes, one syscall each would add up
        self._spool = tempfile.TemporaryFile(dir=spool_dir, prefix=".warp-spool-", buffering=SPOOL_BUFFER)  # noqa: SIM115

    # -- the BlockSink side ------------------------------------------------------------------------------

    def _check(self, what: str, offset: int, length: int) -> None:
        if self._done:
            raise FormatError(f"{self.path}: meta layer writer already finished")
        if offset % SECTOR or length % SECTOR or offset < 0 or length < 0:
            raise FormatError(f"meta layer {what} at byte {offset}, length {length}: offset and length must "
                              f"be multiples of {SECTOR}")
        if offset + length > self.virtual_size:
            raise FormatError(f"meta layer {what} at byte {offset}, length {length}: beyond the virtual size "
                              f"{self.virtual_size}")

    def _record(self, lba: int, n: int, moff: int, tag: int) -> None:
        i = len(self._lens) - 1
        # tag-1 calls stay separate records: upstream splits each extent on its own (§2.6 step 4)
        if i >= 0 and tag == TAG_FS_META == self._tags[i] and self._lbas[i] + self._lens[i] == lba:
            pm = self._moffs[i]
            if (pm & _ZEROED and moff & _ZEROED) or (not (pm | moff) & _ZEROED and pm + self._lens[i] == moff):
                self._lens[i] += n  # extends the newest record, so "latest call wins" still holds
                return
        self._lbas.append(lba)
        self._lens.append(n)
        self._moffs.append(moff)
        self._tags.append(tag)

    def write(self, offset: int, data: BytesLike) -> None:
        """Metadata (tag 0): `data` is the content of the disk at byte `offset`."""
        mv = memoryview(data).cast("B")
        self._check("write", offset, len(mv))
        if not len(mv):
            return
        self._spool.write(mv)  # a buffered file writes all of it
        n = len(mv) // SECTOR
        self._record(offset // SECTOR, n, self._spool_sectors, TAG_FS_META)
        self._spool_sectors += n

    def zero(self, offset: int, length: int) -> None:
        """A zeroed tag-0 range: reads as zeros, masking lower layers."""
        self._check("zero", offset, length)
        if length:
            self._record(offset // SECTOR, length // SECTOR, _ZEROED, TAG_FS_META)

    def map_remote(self, offset: int, length: int, tar_offset: int) -> None:
        """File data (tag 1): `length` bytes of the disk at `offset` are the uncompressed tar's bytes at
        `tar_offset`. `length` is rounded up to whole sectors (a file's last partial sector is followed
        by tar padding, §2.6); `offset` and `tar_offset` must be multiples of 512."""
        if tar_offset % SECTOR or tar_offset < 0:
            raise FormatError(f"meta layer map_remote at byte {offset}: tar offset {tar_offset} is not a "
                              f"multiple of {SECTOR}")
        if length <= 0:
            raise FormatError(f"meta layer map_remote at byte {offset}: length {length} must be positive")
        rounded = -(-length // SECTOR) * SECTOR
        self._check("map_remote", offset, rounded)
        self._record(offset // SECTOR, rounded // SECTOR, tar_offset // SECTOR, TAG_REMOTE_DATA)

    # -- commit ------------------------------------------------------------------------------------------

    def index_entries(self) -> list[WarpEntry]:
        """The final index as close() writes it; tag-0 moffsets still point into the spool (sectors)."""
        # A tag-1 call is cut into 16383-sector chunks before anything overrides part of it, as the RW
        # index stores them. Every chunk and record is its own source, so pieces never coalesce across
        # them: the greedy merge below then decides exactly as overlaybd's commit does.
        lbas, lens, moffs, tags = array("Q"), array("Q"), array("Q"), bytearray()
        for lba, n, moff, tag in zip(self._lbas, self._lens, self._moffs, self._tags, strict=True):
            step = REMOTE_SPLIT if tag == TAG_REMOTE_DATA else n
            for done in range(0, n, step):
                lbas.append(lba + done)
                lens.append(min(step, n - done))
                moffs.append(moff if moff & _ZEROED else moff + done)
                tags.append(tag)
        pieces = resolve_extents(lbas, lens, (m & ~_ZEROED for m in moffs), (bool(m & _ZEROED) for m in moffs),
                                 range(len(lbas)), range(len(lbas)))
        cut: list[WarpEntry] = []
        for lba, n, moff, zero, src in pieces:
            tag = tags[src]
            step = REMOTE_SPLIT if tag == TAG_REMOTE_DATA else META_SPLIT
            for done in range(0, n, step):
                cut.append((lba + done, min(step, n - done), moff if zero else moff + done, zero, tag))
        if not any(entry[4] == TAG_FS_META for entry in cut):
            raise FormatError(f"{self.path}: a meta layer needs at least one tag-0 (metadata) entry, and no "
                              f"metadata write survives; the reader's tag rebasing would read remote data from the "
                              f"meta blob (turbooci §2.5)")
        return cut

    def close(self) -> MetaLayerInfo:
        if self._done:
            raise FormatError(f"{self.path}: meta layer writer already finished")
        try:
            info = self._commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.info = info
        return info

    def _commit(self) -> MetaLayerInfo:
        spool_entries = self.index_entries()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # replaced, not truncated (see LayerBlobWriter)
        out = open(self.path, "x+b", buffering=0)  # noqa: SIM115 - closed below on every path
        try:
            zf = ZFileWriter(out, workers=self._workers)
            try:
                header = LsmtHeaderTrailer(flags=HEADER_FLAGS_COMMITTED, index_offset=0, index_size=0,
                                           virtual_size=self.virtual_size)
                zf.write(header.pack())
                cursor = HT_SPACE // SECTOR
                final: list[WarpEntry] = []
                self._spool.flush()
                spool_fd = self._spool.fileno()
                for lba, n, moff, zero, tag in spool_entries:
                    if tag == TAG_FS_META and not zero:
                        for pos in range(0, n * SECTOR, COPY_CHUNK):
                            want = min(COPY_CHUNK, n * SECTOR - pos)
                            piece = os.pread(spool_fd, want, moff * SECTOR + pos)
                            if len(piece) != want:
                                raise FormatError(f"{self.path}: metadata spool file is short (disk full?)")
                            zf.write(piece)
                        final.append((lba, n, cursor, False, tag))
                        cursor += n
                    elif zero:
                        final.append((lba, n, cursor, True, tag))  # commit stores the data cursor
                    else:
                        final.append((lba, n, moff, False, tag))
                entries = merge_raw_index(final)
                if len(entries) > MAX_LSMT_RO_INDEX_SIZE:
                    raise FormatError(f"{self.path}: meta layer index needs {len(entries)} entries; overlaybd "
                                      f"opens at most {MAX_LSMT_RO_INDEX_SIZE}")
                index = b"".join(pack_entry(lba, n, moff, zero, tag) for lba, n, moff, zero, tag in entries)
                zf.write(index)
                trailer = LsmtHeaderTrailer(flags=TRAILER_FLAGS_COMMITTED, index_offset=cursor * SECTOR,
                                            index_size=len(entries), virtual_size=self.virtual_size)
                zf.write(trailer.pack())
                zf.close()
            except BaseException:
                zf.abort()
                raise
            digest = sha256_file(out.fileno())
            size = os.fstat(out.fileno()).st_size
        finally:
            out.close()
            self._spool.close()
        tag1 = [e for e in entries if e[4] == TAG_REMOTE_DATA]
        return MetaLayerInfo(path=self.path, digest=digest, size=size,
                             lsmt_size=cursor * SECTOR + len(index) + HT_SPACE,
                             data_bytes=cursor * SECTOR - HT_SPACE, index_entries=len(entries),
                             tag0_entries=len(entries) - len(tag1), tag1_entries=len(tag1),
                             tar_end=max(((m + n) * SECTOR for _l, n, m, _z, _t in tag1), default=0))

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._spool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
