"""Opening layer blobs (tar / ZFile / bare LSMT detection) and reading a stack of them as one virtual disk
with overlaybd's merge rules (reference §1.9): the topmost layer covering a sector wins, zeroed entries
mask lower data, holes fall through, and sectors no layer covers read as zeros.

Turbo layers (turbooci §2.5) stack the same way: a layer given as a TurboLayerSpec (meta blob + original
blob) is opened by turbo.open_turbo_layer, and its tag-1 entries read the original layer's tar. Native and
turbo layers mix freely; every (layer, tag) pair is its own data source in the merged map.
"""

from __future__ import annotations

import os
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence

from .common import SECTOR, FileView, FormatError
from .lsmt import MAX_MERGED_INDEX_ENTRIES, MAX_STACK_LAYERS, LsmtLayer, resolve_extents
from .tarwrap import read_tar_wrapping
from .turbo import TurboLayerSpec, open_turbo_layer
from .zfile import ZF_HT_SPACE, ZFileReader, is_zfile

READ_CHUNK = 8 << 20  # materialize() reads mapped data in pieces of this size
ZERO_PROBE = 64 << 10  # ...and skips all-zero stretches of this granularity, keeping the raw file sparse
_ZEROS = bytes(ZERO_PROBE)


def open_layer(path: str | os.PathLike[str], *, verify_blocks: bool = True) -> LsmtLayer:
    """Open a layer blob the way overlaybd-tcmu does (§2.7): strip a tar wrapper (PAX or ustar) if the
    first block is a ustar header, decompress if a ZFile header follows, then open and validate the LSMT
    layer. `verify_blocks` checks every ZFile block's CRC as it is read."""
    fv = FileView(path)
    try:
        wrapping = read_tar_wrapping(fv)
        payload = fv.sub(wrapping.data_offset, wrapping.payload_size)
        zfile = None
        view: FileView | ZFileReader = payload
        if is_zfile(payload.pread(0, min(ZF_HT_SPACE, payload.size))):
            zfile = view = ZFileReader(payload, verify_blocks=verify_blocks)
        return LsmtLayer(view, wrapper=wrapping, zfile=zfile, on_close=fv.close)
    except BaseException:
        fv.close()
        raise


class RemoteData:
    """The tag-1 data of a turbo layer, as extents() hands it out: pread_data() reads the original tar."""

    def __init__(self, layer: LsmtLayer) -> None:
        self.layer = layer

    def pread_data(self, byte_offset: int, length: int) -> bytes:
        return self.layer.pread_data(byte_offset, length, tag=1)


def open_any(item: str | os.PathLike[str] | TurboLayerSpec, *, verify_blocks: bool = True) -> LsmtLayer:
    """A native layer blob by path, or a turbo layer by its TurboLayerSpec."""
    if isinstance(item, TurboLayerSpec):
        return open_turbo_layer(item, verify_blocks=verify_blocks)
    return open_layer(item, verify_blocks=verify_blocks)


class StackedReader:
    """Layers bottom to top, merged once into a sorted extent map; serves pread() and materialize().

    A layer is a native blob's path, a TurboLayerSpec, or an opened LsmtLayer (the caller closes it)."""

    def __init__(self, layers: Sequence[str | os.PathLike[str] | TurboLayerSpec | LsmtLayer], *,
                 verify_blocks: bool = True) -> None:
        if not layers:
            raise FormatError("a stack needs at least one layer")
        if len(layers) > MAX_STACK_LAYERS:
            raise FormatError(f"{len(layers)} layers exceed overlaybd's MAX_STACK_LAYERS {MAX_STACK_LAYERS}")
        self.layers: list[LsmtLayer] = []
        self._owned: list[LsmtLayer] = []
        try:
            for item in layers:
                if isinstance(item, LsmtLayer):
                    self.layers.append(item)
                else:
                    layer = open_any(item, verify_blocks=verify_blocks)
                    self._owned.append(layer)
                    self.layers.append(layer)
            self._merge()
        except BaseException:
            self.close()
            raise

    def _merge(self) -> None:
        sizes = [layer.virtual_size for layer in self.layers if layer.virtual_size > 0]
        self.virtual_size: int = sizes[-1] if sizes else 0  # the topmost layer with a size wins
        total = sum(len(layer) for layer in self.layers)
        if total >= MAX_MERGED_INDEX_ENTRIES:
            raise FormatError(f"merged index of {total} entries exceeds {MAX_MERGED_INDEX_ENTRIES}")
        for layer in self.layers:
            if layer.warp and layer.remote is None and 1 in layer.tags:
                raise FormatError(f"{layer.name}: turbo meta layer in a stack without its original layer")
        # source 2*i + tag: layer i's own data (tag 0) and its original tar (tag 1) never coalesce
        pieces = resolve_extents(
            (o for layer in self.layers for o in layer.offsets),
            (n for layer in self.layers for n in layer.lengths),
            (m for layer in self.layers for m in layer.moffsets),
            (bool(z) for layer in self.layers for z in layer.zeroed),
            (i for i, layer in enumerate(self.layers) for _ in range(len(layer))),
            (2 * i + t for i, layer in enumerate(self.layers) for t in layer.tags))
        self._starts = array("Q", (p[0] for p in pieces))
        self._pieces = pieces
        self._sources = [source for layer in self.layers for source in (layer, RemoteData(layer))]

    def _read(self, src: int, byte_offset: int, length: int) -> bytes:
        return self.layers[src >> 1].pread_data(byte_offset, length, tag=src & 1)

    def extents(self) -> Iterator[tuple[int, int, LsmtLayer | RemoteData | None, int]]:
        """Mapped stretches as (byte offset, byte length, data source or None when zeroed, byte offset of
        the data in it), clipped to the virtual size, in LBA order. The source is the layer (data in its
        LSMT blob) or a turbo layer's RemoteData (data in its original tar); both have pread_data()."""
        for start, length, moff, zero, src in self._pieces:
            off = start * SECTOR
            n = min(length * SECTOR, self.virtual_size - off)
            if n <= 0:
                break
            yield off, n, None if zero else self._sources[src], moff * SECTOR

    def pread(self, offset: int, length: int) -> bytes:
        if offset % SECTOR or length % SECTOR or offset < 0 or length < 0:
            raise FormatError(f"stacked read at {offset}, length {length}: must be {SECTOR}-byte aligned")
        if offset + length > self.virtual_size:
            raise FormatError(f"stacked read at {offset}, length {length}: beyond virtual size "
                              f"{self.virtual_size}")
        parts: list[bytes] = []
        lba, end = offset // SECTOR, (offset + length) // SECTOR
        i = max(bisect_right(self._starts, lba) - 1, 0)
        while lba < end:
            if i >= len(self._pieces) or self._pieces[i][0] >= end:
                parts.append(bytes((end - lba) * SECTOR))
                break
            start, plen, moff, zero, src = self._pieces[i]
            if start + plen <= lba:
                i += 1
                continue
            if start > lba:
                parts.append(bytes((start - lba) * SECTOR))
                lba = start
            n = min(start + plen, end) - lba
            if zero:
                parts.append(bytes(n * SECTOR))
            else:
                parts.append(self._read(src, (moff + lba - start) * SECTOR, n * SECTOR))
            lba += n
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def materialize(self, out_path: str | os.PathLike[str]) -> None:
        """Write the virtual disk to a sparse raw file: truncate to virtual_size, then write only mapped data
        that is not all zeros (zeroed and unmapped ranges, and zero stretches of data, stay holes)."""
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.virtual_size)
            for off, n, layer, data_off in self.extents():
                if layer is None:
                    continue
                for pos in range(0, n, READ_CHUNK):
                    chunk = layer.pread_data(data_off + pos, min(READ_CHUNK, n - pos))
                    _write_nonzero(fd, chunk, off + pos)
        finally:
            os.close(fd)

    def close(self) -> None:
        for layer in self._owned:
            layer.close()
        self._owned.clear()

    def __enter__(self) -> StackedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_nonzero(fd: int, data: bytes, offset: int) -> None:
    """pwrite `data` at `offset`, leaving ZERO_PROBE-sized all-zero stretches unwritten (holes)."""
    mv = memoryview(data)
    run_start = None
    for pos in range(0, len(data), ZERO_PROBE):
        piece = data[pos:pos + ZERO_PROBE]  # bytes == bytes is a memcmp; memoryview == bytes is 70x slower
        if piece == _ZEROS[:len(piece)]:
            if run_start is not None:
                os.pwrite(fd, mv[run_start:pos], offset + run_start)
                run_start = None
        elif run_start is None:
            run_start = pos
    if run_start is not None:
        os.pwrite(fd, mv[run_start:], offset + run_start)
