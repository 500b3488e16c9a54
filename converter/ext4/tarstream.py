"""A strict, streaming reader of OCI layer tars (ustar, PAX, GNU), over a LayerStream's uncompressed chunks.

Why not `tarfile`: in stream mode it takes a corrupt or truncated header anywhere after the first
entry for the end of the archive, so a damaged layer would convert "successfully" with files
missing. It also cannot hand out a GNU sparse file's map without expanding the holes. This reader
fails loudly (naming the byte offset and the entry) and yields sparse maps as they are.

Supported: typeflags 0/\\0/7 (file), 1 (hardlink), 2 (symlink), 3/4 (devices), 5 (dir), 6 (fifo),
x/g (PAX, per-entry and global), L/K (GNU long names), S (old GNU sparse), PAX GNU sparse 0.0, 0.1
and 1.0; octal and base-256 numbers; PAX path/linkpath/size/uid/gid/mtime/SCHILY.xattr.*.

Bounds (like Go's archive/tar): a PAX `x` or `g` header, a GNU `L`/`K` long name and a sparse map may
each hold at most MAX_SPECIAL (1 MiB); the PAX records pending for one entry and the global ones each
stay within MAX_SPECIAL too. Anything larger is refused before it is read into memory, with a short
error naming the offset and the record's own name. Names quoted in messages are shortened (MAX_NAME).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

from ..errors import MAX_NAME, shorten

if TYPE_CHECKING:
    from .layerstream import LayerStream

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20
MAX_SPECIAL = 1 << 20  # bytes of one special record or sparse map (Go's archive/tar maxSpecialFileSize)
SPECIAL_KINDS = {b"x": "PAX extended header", b"g": "PAX global header", b"L": "GNU long name",
                 b"K": "GNU long link name"}  # fmt: skip

REGULAR_TYPES = (b"0", b"\0", b"7")
HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
GNU_SPARSE = b"S"
GNU_DUMPDIR = b"D"
KNOWN_TYPES = {*REGULAR_TYPES, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO, GNU_SPARSE, GNU_DUMPDIR}


class TarFormatError(ValueError):
    """The layer is not a valid tar stream; the message names the offset and the entry.

    `entry` names the record at fault when it is not the reader's current entry (a special header)."""

    def __init__(self, message: str, entry: str | None = None) -> None:
        super().__init__(shorten(message))
        self.entry = entry


@dataclass
class TarEntry:
    name: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int  # bytes of data stored in the archive for this entry
    mtime: int
    mtime_ns: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None  # (offset, length) data segments of a sparse file
    realsize: int = 0  # logical size of a sparse file
    offset: int = 0  # byte offset of this entry's header in the uncompressed stream
    # byte offset of the entry's first stored data byte in the uncompressed stream: after its PAX / GNU
    # long-name headers, old-GNU sparse extension blocks and a PAX 1.0 sparse map (TurboOCI maps file
    # blocks to it, reference turbooci §2.6); always a multiple of 512
    data_offset: int = 0

    @property
    def file_size(self) -> int:
        return self.realsize if self.sparse is not None else self.size

    @property
    def is_regular(self) -> bool:
        return self.type in REGULAR_TYPES or self.type == GNU_SPARSE

    @property
    def display_name(self) -> str:
        """The name for messages: decoded, and shortened to MAX_NAME characters."""
        return display(self.name)


def display(name: bytes) -> str:
    """A tar name as shown in messages: undecodable bytes escaped, at most MAX_NAME characters."""
    # names are at most MAX_SPECIAL bytes (a GNU long name or PAX path), so decoding one whole is cheap
    return shorten(name.decode("utf-8", "backslashreplace"), MAX_NAME)


def _number(field_bytes: bytes, what: str, offset: int) -> int:
    """Fast path for the common octal field ("0000644\0", "   644 "); anything else goes the long way."""
    try:
        return int(field_bytes.rstrip(b"\0"), 8)
    except ValueError:
        return _parse_number(field_bytes, what, offset)


def _parse_number(field_bytes: bytes, what: str, offset: int) -> int:
    if field_bytes and field_bytes[0] & 0x80:
        # base-256 (GNU): big-endian two's complement with the top bit of the first byte as a marker
        value = int.from_bytes(field_bytes, "big", signed=False)
        if field_bytes[0] == 0xFF:
            return value - (1 << (8 * len(field_bytes)))
        return value & ((1 << (8 * len(field_bytes) - 1)) - 1)
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"tar header at offset {offset}: field {what} is not a number: {text!r}") from None


def _byte_sum(piece: bytes) -> int:
    """Sum of the bytes of a piece of at most 256 bytes, in C: Adler-32's first half is 1 + that sum
    modulo 65521, and 256 x 255 < 65521. Four times faster than sum() on a tar header; the checksum
    field (bytes 148-156) counts as eight spaces and is left out by the caller."""
    return (zlib.adler32(piece) & 0xFFFF) - 1


def _signed_checksum(header: bytes) -> int:
    """Historic tar writers summed the header as signed chars."""
    blanked = header[:148] + b" " * 8 + header[156:]
    return sum(b - 256 if b > 127 else b for b in blanked)


def _cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


def _pax_int(pax: dict[str, bytes], key: str, offset: int) -> int:
    try:
        return int(pax[key])
    except ValueError:
        raise TarFormatError(f"PAX header before offset {offset}: {key} is not a number: {pax[key][:40]!r}") from None


def _pax_size(records: dict[str, bytes]) -> int:
    return sum(len(k) + len(v) for k, v in records.items())


def _parse_pax(data: bytes, offset: int) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    sparse_map: list[bytes] = []  # GNU sparse 0.0 offsets and sizes, joined once at the end
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise TarFormatError(f"PAX header at offset {offset}: malformed record at byte {pos}")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"PAX header at offset {offset}: bad record length at byte {pos}") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError(f"PAX header at offset {offset}: malformed record at byte {pos}")
        key_bytes, _, value = record[:-1].partition(b"=")
        key = key_bytes.decode("utf-8", "surrogateescape")
        if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            # GNU sparse 0.0 repeats these two keys once per segment: keep them all, in order.
            sparse_map.append(value)
        else:
            records[key] = value
        pos += length
    if sparse_map:
        records["GNU.sparse.map"] = b",".join(sparse_map)
    return records


def _parse_pax_time(value: bytes, offset: int) -> tuple[int, int]:
    try:
        d = Decimal(value.decode("ascii"))
    except (InvalidOperation, UnicodeDecodeError):
        raise TarFormatError(f"PAX header at offset {offset}: bad mtime {value!r}") from None
    seconds = int(d.to_integral_value(rounding="ROUND_FLOOR"))
    nanos = int((d - seconds) * 1_000_000_000)
    return seconds, nanos


class TarReader:
    """Iterate entries; read each entry's data with `read_exact`/`read_data` (or it is skipped) before the next.

    Data comes from a LayerStream's chunks. Entry data is returned as views of those immutable chunks
    (bytes only where a piece spans two chunks), so file content is not copied here at all.
    """

    def __init__(self, source: LayerStream) -> None:
        self._source = source
        self._chunk = memoryview(b"")
        self._at = 0  # position in the current chunk
        self._pos = 0  # position in the tar stream
        self._pending = 0  # data bytes (plus padding) of the current entry not consumed yet
        self._data_left = 0  # data bytes (without padding) of the current entry not consumed yet
        self._global: dict[str, bytes] = {}
        self.current: TarEntry | None = None

    def _next_chunk(self) -> bool:
        chunk = self._source.next_chunk()
        self._chunk, self._at = memoryview(chunk), 0
        return bool(chunk)

    def _read(self, n: int) -> memoryview | bytes:
        """The next n bytes of the tar: a view of the current chunk when they lie in it."""
        at = self._at
        if at + n <= len(self._chunk):
            self._at = at + n
            self._pos += n
            return self._chunk[at:at + n]
        parts = [self._chunk[at:]]
        got = len(parts[0])
        while got < n:
            if not self._next_chunk():
                where = f" in entry {self.current.display_name!r}" if self.current else ""
                raise TarFormatError(f"unexpected end of tar stream at offset {self._pos + got}{where}")
            take = min(n - got, len(self._chunk))
            parts.append(self._chunk[:take])
            self._at = take
            got += take
        self._pos += n
        return b"".join(parts)

    def _read_bytes(self, n: int) -> bytes:
        data = self._read(n)
        return data if isinstance(data, bytes) else data.tobytes()

    def _skip(self, n: int) -> None:
        while n:
            step = min(n, len(self._chunk) - self._at)
            if not step:
                if not self._next_chunk():
                    where = f" in entry {self.current.display_name!r}" if self.current else ""
                    raise TarFormatError(f"unexpected end of tar stream at offset {self._pos}{where}")
                continue
            self._at += step
            self._pos += step
            n -= step

    def _header(self, offset: int) -> bytes | None:
        """The next 512-byte header block; None at a clean end of the stream."""
        if self._at == len(self._chunk) and not self._next_chunk():
            return None
        try:
            return self._read_bytes(BLOCK)
        except TarFormatError:
            raise TarFormatError(f"truncated tar header at offset {offset}") from None

    def read_data(self, max_chunk: int = CHUNK) -> Iterator[memoryview | bytes]:
        """The stored data of the current entry, in pieces of at most max_chunk bytes."""
        assert self.current is not None
        remaining = self._data_left
        padding = self._pending - remaining
        while remaining:
            step = min(remaining, max_chunk)
            chunk = self._read(step)
            remaining -= step
            self._pending -= step
            yield chunk
        self._data_left = 0
        self._skip(padding)
        self._pending = 0

    def read_exact(self, n: int) -> memoryview | bytes:
        """Exactly n more bytes of the current entry's data (padding skipped after the last byte)."""
        assert self.current is not None
        data = self._read(n)
        self._pending -= n
        self._data_left -= n
        if self._data_left == 0:
            self._skip(self._pending)
            self._pending = 0
        return data

    def read_all(self) -> bytes:
        return b"".join(self.read_data())

    def __iter__(self) -> Iterator[TarEntry]:
        return self

    def __next__(self) -> TarEntry:
        if self._pending:
            self._skip(self._pending)
            self._pending = 0
        self.current = None  # errors from here on are about the next record, not the one just read
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            offset = self._pos
            header = self._header(offset)
            if header is None:
                raise TarFormatError(f"tar stream ends at offset {offset} without an end-of-archive marker")
            if header == ZERO_BLOCK:
                # End of archive: a second zero block normally follows; tolerate its absence.
                self.current = None
                raise StopIteration
            self._check_checksum(header, offset)
            typeflag = header[156:157]
            size = _number(header[124:136], "size", offset)
            if "size" in pax and typeflag not in (b"x", b"g"):
                size = _pax_int(pax, "size", offset)
                if size < 0:
                    raise TarFormatError(f"PAX header before offset {offset}: negative size {size}")
            if typeflag in SPECIAL_KINDS:
                if size > MAX_SPECIAL or size < 0:
                    name = display(_cstr(header[0:100]))
                    raise TarFormatError(f"{SPECIAL_KINDS[typeflag]} at offset {offset} is {size} bytes; at most "
                                         f"{MAX_SPECIAL} are allowed", entry=name)
                data = self._read_bytes(size)
                self._skip(-size % BLOCK)
                if typeflag == b"x":
                    pax.update(_parse_pax(data, offset))
                    self._check_pax_total(pax, "pending PAX records", header, offset)
                elif typeflag == b"g":
                    self._global.update(_parse_pax(data, offset))
                    self._check_pax_total(self._global, "global PAX records", header, offset)
                elif typeflag == b"L":
                    long_name = _cstr(data)
                else:
                    long_link = _cstr(data)
                continue
            entry = self._build_entry(header, typeflag, size, offset, {**self._global, **pax}, long_name, long_link)
            self.current = entry
            self._pending = size + (-size % BLOCK)
            self._data_left = size
            if entry.type == GNU_SPARSE:
                self._read_old_gnu_sparse(entry, header)
            elif entry.sparse is None and pax.get("GNU.sparse.major") == b"1":
                self._read_sparse_1_0_map(entry)
            entry.data_offset = self._pos
            return entry

    @staticmethod
    def _check_pax_total(records: dict[str, bytes], what: str, header: bytes, offset: int) -> None:
        """Several PAX headers in a row may not add up to more than one could hold."""
        total = _pax_size(records)
        if total > MAX_SPECIAL:
            raise TarFormatError(f"{what} at offset {offset} add up to {total} bytes; at most {MAX_SPECIAL} are "
                                 "allowed", entry=display(_cstr(header[0:100])))

    @staticmethod
    def _check_checksum(header: bytes, offset: int) -> None:
        stored = header[148:156]
        text = stored.split(b"\0", 1)[0].strip(b" ")
        try:
            expected = int(text, 8)
        except ValueError:
            raise TarFormatError(f"invalid tar header at offset {offset}: checksum field {stored!r}") from None
        unsigned = _byte_sum(header[:148]) + _byte_sum(header[156:412]) + _byte_sum(header[412:]) + 8 * 0x20
        if expected != unsigned and expected != _signed_checksum(header):
            name = display(_cstr(header[0:100]))
            raise TarFormatError(
                f"bad tar header checksum at offset {offset} (entry {name!r}): stored {expected}, computed {unsigned}"
            )

    def _build_entry(
        self,
        header: bytes,
        typeflag: bytes,
        size: int,
        offset: int,
        pax: dict[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarEntry:
        name = _cstr(header[0:100])
        if header[257:263] == b"ustar\0" and header[345] != 0:
            # POSIX ustar: a prefix may precede the name (GNU uses those bytes for other things)
            name = _cstr(header[345:500]) + b"/" + name
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"]
        if "GNU.sparse.name" in pax:
            name = pax["GNU.sparse.name"]
        linkname = _cstr(header[157:257])
        if long_link is not None:
            linkname = long_link
        if "linkpath" in pax:
            linkname = pax["linkpath"]
        if typeflag not in KNOWN_TYPES:
            shown = display(name)
            raise TarFormatError(f"unsupported tar entry type {typeflag!r} for {shown!r} at offset {offset}")
        device = typeflag in (CHARDEV, BLOCKDEV)
        entry = TarEntry(
            name=name,
            type=typeflag,
            mode=_number(header[100:108], "mode", offset) & 0o7777,
            uid=_pax_int(pax, "uid", offset) if "uid" in pax else _number(header[108:116], "uid", offset),
            gid=_pax_int(pax, "gid", offset) if "gid" in pax else _number(header[116:124], "gid", offset),
            size=size,
            mtime=_number(header[136:148], "mtime", offset),
            linkname=linkname,
            devmajor=_number(header[329:337], "devmajor", offset) if device else 0,
            devminor=_number(header[337:345], "devminor", offset) if device else 0,
            offset=offset,
        )
        if "mtime" in pax:
            entry.mtime, entry.mtime_ns = _parse_pax_time(pax["mtime"], offset)
        if pax:
            for key, value in pax.items():
                if key.startswith("SCHILY.xattr."):
                    entry.xattrs[key[len("SCHILY.xattr.") :]] = value
            self._pax_sparse_0x(entry, pax)
        return entry

    @staticmethod
    def _pax_sparse_0x(entry: TarEntry, pax: dict[str, bytes]) -> None:
        """GNU sparse formats 0.0 and 0.1 carry the map in PAX records."""
        if "GNU.sparse.realsize" in pax or "GNU.sparse.size" in pax:
            key = "GNU.sparse.realsize" if "GNU.sparse.realsize" in pax else "GNU.sparse.size"
            entry.realsize = _pax_int(pax, key, entry.offset)
        if "GNU.sparse.map" in pax and pax.get("GNU.sparse.major") != b"1":
            try:
                numbers = [int(x) for x in pax["GNU.sparse.map"].split(b",") if x]
            except ValueError:
                raise TarFormatError(f"entry {entry.display_name!r}: GNU.sparse.map holds a non-number") from None
            if len(numbers) % 2:
                raise TarFormatError(f"entry {entry.display_name!r}: odd number of values in GNU.sparse.map")
            entry.sparse = list(zip(numbers[0::2], numbers[1::2], strict=True))

    def _read_old_gnu_sparse(self, entry: TarEntry, header: bytes) -> None:
        segments = []

        def take(area: bytes, count: int) -> None:
            for k in range(count):
                off = _parse_number(area[k * 24 : k * 24 + 12], "sparse offset", entry.offset)
                num = _parse_number(area[k * 24 + 12 : k * 24 + 24], "sparse numbytes", entry.offset)
                if off or num:
                    segments.append((off, num))

        take(header[386:482], 4)
        extended = header[482]
        read = 0
        while extended:
            read += BLOCK
            if read > MAX_SPECIAL:
                raise TarFormatError(f"entry {entry.display_name!r} at offset {entry.offset}: old GNU sparse map "
                                     f"extends over more than {MAX_SPECIAL} bytes")
            ext = self._read_bytes(BLOCK)
            take(ext[:504], 21)
            extended = ext[504]
        entry.sparse = segments
        entry.realsize = _parse_number(header[483:495], "realsize", entry.offset)

    def _read_sparse_1_0_map(self, entry: TarEntry) -> None:
        """GNU sparse 1.0: the map is a list of decimal lines at the start of the data, padded to 512.
        At most MAX_SPECIAL bytes of map, like the other special records."""
        buf = bytearray()
        pos = 0
        consumed = 0

        def next_number() -> int:
            nonlocal pos, consumed
            while (end := buf.find(b"\n", pos)) < 0:
                if consumed + BLOCK > MAX_SPECIAL or consumed + BLOCK > self._data_left:
                    raise TarFormatError(f"entry {entry.display_name!r} at offset {entry.offset}: GNU sparse 1.0 "
                                         f"map is unterminated or longer than {MAX_SPECIAL} bytes")
                buf.extend(self._read(BLOCK))
                consumed += BLOCK
            line, pos = bytes(buf[pos:end]), end + 1
            try:
                return int(line)
            except ValueError:
                raise TarFormatError(f"entry {entry.display_name!r}: GNU sparse 1.0 map line {line[:40]!r} is not "
                                     "a number") from None

        count = next_number()
        entry.sparse = [(next_number(), next_number()) for _ in range(count)]
        entry.size -= consumed
        self._pending -= consumed
        self._data_left -= consumed
        if not entry.realsize:
            entry.realsize = max((o + n for o, n in entry.sparse), default=0)
