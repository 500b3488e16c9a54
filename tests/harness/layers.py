"""Deterministic layer-tar builder shared by the ext4 tests and the OCI image builder.

Every archive is a pure function of its entries: no wall-clock time, no host user names,
gzip header mtime 0. Headers are produced by the stdlib ``tarfile`` so the bytes are what
real tools (GNU tar, Python, Go's archive/tar) read; only the GNU PAX 1.0 sparse layout,
which ``tarfile`` can read but not write, is assembled here.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

BLOCK = 512
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}
FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}


@dataclass
class Entry:
    """One tar member. ``mode`` None means the usual default for the kind."""

    path: str
    kind: str
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    uname: str = ""
    gname: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"entry {self.path!r}: unknown kind {self.kind!r} (expected one of {sorted(KINDS)})"
            )
        if self.data and self.kind != "file":
            raise ValueError(f"entry {self.path!r}: only 'file' entries carry data, not {self.kind!r}")
        if self.mode is None:
            self.mode = DEFAULT_MODES.get(self.kind, 0o644)


def file(path: str, data: bytes = b"", **kw) -> Entry:
    return Entry(path, "file", data=data, **kw)


def dir(path: str, **kw) -> Entry:
    return Entry(path, "dir", **kw)


def symlink(path: str, target: str, **kw) -> Entry:
    return Entry(path, "symlink", linkname=target, **kw)


def hardlink(path: str, target: str, **kw) -> Entry:
    return Entry(path, "hardlink", linkname=target, **kw)


def char(path: str, major: int, minor: int, **kw) -> Entry:
    return Entry(path, "char", devmajor=major, devminor=minor, **kw)


def block(path: str, major: int, minor: int, **kw) -> Entry:
    return Entry(path, "block", devmajor=major, devminor=minor, **kw)


def fifo(path: str, **kw) -> Entry:
    return Entry(path, "fifo", **kw)


def whiteout(path: str) -> Entry:
    """An OCI whiteout: an empty file ``.wh.<basename>`` next to the deleted path."""
    parent, name = os.path.split(path.rstrip("/"))
    return file(os.path.join(parent, WHITEOUT_PREFIX + name))


def opaque(dirpath: str) -> Entry:
    """An OCI opaque-directory marker: lower layers' children of ``dirpath`` are hidden."""
    return file(os.path.join(dirpath.rstrip("/"), OPAQUE_MARKER))


def _pax_record(key: str, value: bytes) -> bytes:
    """One ``"<len> <key>=<value>\\n"`` record; ``len`` counts the whole record including itself."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    if len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def _pax_member(info: tarfile.TarInfo, records: dict[str, bytes], payload: bytes = b"") -> bytes:
    """A PAX extended header (if any records) followed by the member's ustar header and data.

    The records are written here rather than by tarfile because tarfile marks any non-UTF-8
    value with ``hdrcharset=BINARY``, a keyword GNU tar warns about; GNU tar itself stores
    binary xattr values raw, and so do we.
    """
    out = b""
    if records:
        blob = b"".join(_pax_record(key, value) for key, value in records.items())
        xhdr = tarfile.TarInfo("././@PaxHeader")
        xhdr.type, xhdr.size = tarfile.XHDTYPE, len(blob)
        out = xhdr.tobuf(tarfile.USTAR_FORMAT) + _padded(blob)
    return out + info.tobuf(tarfile.USTAR_FORMAT) + _padded(payload)


def _pax_fields(info: tarfile.TarInfo, records: dict[str, bytes]) -> None:
    """Move every field that a ustar header cannot hold into PAX records (as tarfile's PAX writer does)."""
    for attr, key, limit in (("name", "path", 100), ("linkname", "linkpath", 100),
                             ("uname", "uname", 32), ("gname", "gname", 32)):
        value = getattr(info, attr) + ("/" if attr == "name" and info.type == tarfile.DIRTYPE else "")
        if len(value.encode()) > limit or not value.isascii():
            records[key] = value.encode()
            setattr(info, attr, value.encode("ascii", "replace")[: limit - 1].decode())
    for key, digits in (("uid", 8), ("gid", 8), ("size", 12)):
        if getattr(info, key) >= 8 ** (digits - 1):
            records[key] = str(getattr(info, key)).encode()
            setattr(info, key, 0)
    mtime = info.mtime
    if mtime != int(mtime) or not 0 <= mtime < 8**11:
        records["mtime"] = (str(int(mtime)) if mtime == int(mtime) else f"{mtime:.9f}".rstrip("0")).encode()
        info.mtime = min(max(int(mtime), 0), 8**11 - 1)


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.type = KINDS[entry.kind]
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname, info.gname = entry.uname, entry.gname
    info.mtime = entry.mtime
    info.linkname = entry.linkname
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    info.size = len(entry.data)
    return info


def _end_of_archive(length: int) -> bytes:
    """Two zero blocks, then zeros up to a whole tar record, as GNU tar and tarfile end archives."""
    end = length + 2 * BLOCK
    return bytes(2 * BLOCK + -end % tarfile.RECORDSIZE)


def make_tar(entries: Iterable[Entry], *, format: str = "pax") -> bytes:
    """Serialise ``entries`` in order into one tar archive (with end-of-archive blocks)."""
    if format not in FORMATS:
        raise ValueError(f"unknown tar format {format!r} (expected one of {sorted(FORMATS)})")
    if format != "pax":
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=FORMATS[format], encoding="utf-8") as tar:
            for entry in entries:
                if entry.xattrs:
                    raise ValueError(f"entry {entry.path!r}: xattrs need the 'pax' format")
                if entry.mtime != int(entry.mtime):
                    raise ValueError(f"entry {entry.path!r}: fractional mtime needs the 'pax' format")
                info = _tarinfo(entry)
                tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
        return out.getvalue()
    parts = []
    for entry in entries:
        info = _tarinfo(entry)
        records: dict[str, bytes] = {}
        _pax_fields(info, records)
        for name in sorted(entry.xattrs):
            records["SCHILY.xattr." + name] = entry.xattrs[name]
        parts.append(_pax_member(info, records, entry.data))
    body = b"".join(parts)
    return body + _end_of_archive(len(body))


def compress(data: bytes, algo: str = "gzip") -> bytes:
    """Compress deterministically: gzip with mtime 0 and no file name, zstd level 3 with checksum."""
    if algo == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if algo == "zstd":
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    if algo == "none":
        return data
    raise ValueError(f"unknown compression {algo!r} (expected gzip, zstd or none)")


def _sparse_regions(size: int, data_at: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """Merge data regions and pad all but the last to whole blocks.

    GNU tar stores every region in whole 512-byte blocks while Python's tarfile assumes the
    regions follow each other byte for byte; both agree when every region but the last has a
    length that is a multiple of 512. Padding bytes are zeros, which is what the hole holds anyway.
    """
    regions: list[list] = []
    for offset in sorted(data_at):
        data = data_at[offset]
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"sparse data at {offset} (+{len(data)}) lies outside the file size {size}")
        if not data:
            continue
        if regions and offset < regions[-1][0] + len(regions[-1][1]):
            raise ValueError(f"sparse data at {offset} overlaps the region at {regions[-1][0]}")
        regions.append([offset, bytearray(data)])
    merged: list[list] = []
    for offset, data in regions:
        if merged:
            prev_off, prev = merged[-1]
            padded_end = prev_off + -(-len(prev) // BLOCK) * BLOCK
            if offset <= padded_end:
                prev.extend(bytes(offset - prev_off - len(prev)))
                prev.extend(data)
                continue
            prev.extend(bytes(padded_end - prev_off - len(prev)))
        merged.append([offset, data])
    if merged:
        last_off, last = merged[-1]
        del last[size - last_off :]
    return [(off, bytes(data)) for off, data in merged]


def gnu_tar_sparse(workdir: Path, name: str, size: int, pieces: dict[int, bytes], version: str) -> bytes:
    """A tar made by GNU tar itself of a sparse file `name` (`size` bytes, `pieces` at their offsets, holes
    elsewhere) in one of its sparse formats: "gnu" (old GNU 'S' headers) or PAX "0.0", "0.1", "1.0"."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / name, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    fmt = ["--format=gnu"] if version == "gnu" else ["--format=posix", f"--sparse-version={version}"]
    return subprocess.run(["tar", "--sparse", *fmt, "-C", str(workdir), "-cf", "-", name],
                          capture_output=True, check=True).stdout


def sparse_file_tar(path: str, size: int, data_at: dict[int, bytes], *, mode: int = 0o644,
                    mtime: float = 0) -> bytes:
    """A complete archive holding one GNU PAX 1.0 sparse file of logical ``size`` bytes.

    Only the bytes in ``data_at`` ({offset: data}) are stored, so a file of many GiB costs
    only its data. The map (``count\\n`` then ``offset\\nlength\\n`` pairs, padded to a block)
    precedes the data inside the member, as GNU tar writes it.
    """
    regions = _sparse_regions(size, data_at)
    if not regions or regions[-1][0] + len(regions[-1][1]) < size:
        regions.append((size, b""))  # GNU tar's marker for a trailing hole: extend the file to size
    lines = [str(len(regions))] + [f"{off}\n{len(data)}" for off, data in regions]
    sparse_map = ("\n".join(lines) + "\n").encode()
    sparse_map += bytes(-len(sparse_map) % BLOCK)
    payload = sparse_map + b"".join(data for _, data in regions)

    parent, name = os.path.split(path)
    info = tarfile.TarInfo(os.path.join(parent, "GNUSparseFile.0", name))
    info.mode, info.mtime, info.size = mode, int(mtime), len(payload)
    records = {
        "GNU.sparse.major": b"1",
        "GNU.sparse.minor": b"0",
        "GNU.sparse.name": path.encode(),
        "GNU.sparse.realsize": str(size).encode(),
    }
    if mtime != int(mtime):
        records["mtime"] = f"{mtime:.9f}".rstrip("0").encode()
    member = _pax_member(info, records, payload)
    return member + _end_of_archive(len(member))
