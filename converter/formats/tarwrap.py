"""The single-member tar around a layer blob (reference §3): writer of the `overlaybd-commit -t` PAX form
and of the plain ustar form, and a reader that accepts both forms or no wrapper at all.

PAX form: PAX header (`overlaybd.pax`, typeflag x) | the record "<n> size=<P>\\n" | ustar header
(`overlaybd.commit`, size field 0) | payload at byte 1536 | zero padding to 512 | two zero blocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .common import BytesLike, FormatError, RandomAccess

TAR_BLOCK = 512
PAX_HEADER_NAME = "overlaybd.pax"
COMMIT_MEMBER_NAME = "overlaybd.commit"
PAX_DATA_OFFSET = 3 * TAR_BLOCK  # the payload position overlaybd assumes whenever a PAX header is present
USTAR_DATA_OFFSET = TAR_BLOCK
END_OF_ARCHIVE = bytes(2 * TAR_BLOCK)
USTAR_MAGIC = b"ustar\0"
USTAR_VERSION = b"00"
COMMIT_MODE = 0o100644  # st_mode of overlaybd-commit's output under umask 022
USTAR_MODE = 0o444  # what the convertor's uploadBaseLayer puts in its Go tar header (§3.2)
USTAR_MAX_SIZE = 8**11 - 1  # 11 octal digits

# (offset, length) of the ustar header fields we touch
_NAME, _MODE, _UID, _GID, _SIZE, _MTIME, _CHKSUM = (0, 100), (100, 8), (108, 8), (116, 8), (124, 12), \
    (136, 12), (148, 8)
_TYPEFLAG = 156
_MAGIC, _VERSION, _UNAME, _GNAME = (257, 6), (263, 2), (265, 32), (297, 32)
_DEVMAJOR, _DEVMINOR = (329, 8), (337, 8)


def _put(block: bytearray, fld: tuple[int, int], value: bytes) -> None:
    off, size = fld
    if len(value) > size:
        raise FormatError(f"tar header field at {off} cannot hold {value!r}")
    block[off:off + len(value)] = value


def _get(block: BytesLike, fld: tuple[int, int]) -> bytes:
    off, size = fld
    return bytes(block[off:off + size])


def tar_checksum(block: BytesLike) -> tuple[int, int]:
    """(unsigned, signed) sum of the 512 bytes with the checksum field counted as spaces."""
    raw = bytes(block[:TAR_BLOCK])
    raw = raw[:_CHKSUM[0]] + b" " * 8 + raw[_CHKSUM[0] + 8:]
    unsigned = sum(raw)
    signed = sum(struct.unpack("512b", raw))
    return unsigned, signed


def _finish(block: bytearray, chksum_format: bytes) -> bytes:
    _put(block, _CHKSUM, chksum_format % tar_checksum(block)[0])
    return bytes(block)


def pax_record(key: str, value: str) -> bytes:
    """One PAX record "<len> key=value\\n", where <len> counts the whole record including its own digits."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax_prefix(payload_size: int) -> bytes:
    """The 1536 bytes `overlaybd-commit -t` writes before the payload (space-padded octal, as libtar)."""
    record = pax_record("size", str(payload_size))
    pax = bytearray(TAR_BLOCK)
    _put(pax, _NAME, PAX_HEADER_NAME.encode())
    _put(pax, _SIZE, b"%11o " % len(record))
    pax[_TYPEFLAG] = ord("x")
    _put(pax, _MAGIC, USTAR_MAGIC)
    _put(pax, _VERSION, USTAR_VERSION)
    member = bytearray(TAR_BLOCK)
    _put(member, _NAME, COMMIT_MEMBER_NAME.encode())
    _put(member, _MODE, b"%6o \0" % COMMIT_MODE)
    _put(member, _UID, b"%6o \0" % 0)
    _put(member, _GID, b"%6o \0" % 0)
    _put(member, _SIZE, b"%11o " % 0)  # the real size lives only in the PAX record
    _put(member, _MTIME, b"%11o " % 0)
    member[_TYPEFLAG] = ord("0")
    _put(member, _MAGIC, USTAR_MAGIC)
    _put(member, _VERSION, USTAR_VERSION)
    _put(member, _UNAME, b"root")
    _put(member, _GNAME, b"root")
    return _finish(pax, b"%6o \0") + record.ljust(TAR_BLOCK, b"\0") + _finish(member, b"%6o \0")


def ustar_prefix(payload_size: int) -> bytes:
    """A plain ustar header for the payload, as the convertor's Go archive/tar writes the base layer's:
    zero-padded NUL-terminated octal, mode 0444, zero times and ids, no user names, no PAX."""
    if payload_size > USTAR_MAX_SIZE:
        raise FormatError(f"payload of {payload_size} bytes does not fit a plain ustar header; use the PAX form")
    hdr = bytearray(TAR_BLOCK)
    _put(hdr, _NAME, COMMIT_MEMBER_NAME.encode())
    _put(hdr, _MODE, b"%07o\0" % USTAR_MODE)
    _put(hdr, _UID, b"%07o\0" % 0)
    _put(hdr, _GID, b"%07o\0" % 0)
    _put(hdr, _SIZE, b"%011o\0" % payload_size)
    _put(hdr, _MTIME, b"%011o\0" % 0)
    hdr[_TYPEFLAG] = ord("0")
    _put(hdr, _MAGIC, USTAR_MAGIC)
    _put(hdr, _VERSION, USTAR_VERSION)
    _put(hdr, _DEVMAJOR, b"%07o\0" % 0)
    _put(hdr, _DEVMINOR, b"%07o\0" % 0)
    return _finish(hdr, b"%06o\0 ")


def tar_suffix(payload_size: int) -> bytes:
    """Zero padding of the payload to a 512 boundary, then the two zero blocks that end the archive."""
    return bytes(-payload_size % TAR_BLOCK) + END_OF_ARCHIVE


WRAPPERS = {"pax": (PAX_DATA_OFFSET, pax_prefix), "ustar": (USTAR_DATA_OFFSET, ustar_prefix)}


# ----------------------------------------------------------------------------------------------------------
# Reader


@dataclass(frozen=True)
class TarWrapping:
    form: str  # "pax", "ustar" or "none"
    data_offset: int
    payload_size: int
    member_name: str = ""
    pax_records: dict[str, str] = field(default_factory=dict)


def _parse_number(raw: bytes, where: str) -> int:
    if raw and raw[0] & 0x80:  # GNU base-256
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise FormatError(f"{where}: not an octal number: {raw!r}") from None


def _check_header(block: bytes, where: str) -> None:
    if block[_MAGIC[0]:_MAGIC[0] + 5] != b"ustar":
        raise FormatError(f"{where}: no ustar magic")
    if _get(block, _VERSION) != USTAR_VERSION:
        raise FormatError(f"{where}: ustar version {_get(block, _VERSION)!r} is not '00' (GNU tar format?); "
                          f"overlaybd does not recognise it")
    stored = _parse_number(_get(block, _CHKSUM), f"{where} checksum field")
    unsigned, signed = tar_checksum(block)
    if stored not in (unsigned, signed):
        raise FormatError(f"{where}: checksum mismatch (field says {stored}, header sums to {unsigned})")


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos)
        try:
            n = int(data[pos:sp])
        except ValueError:
            raise FormatError(f"{where}: malformed PAX record at byte {pos}") from None
        rec = data[sp + 1:pos + n]
        if n <= 0 or not rec.endswith(b"\n") or b"=" not in rec:
            raise FormatError(f"{where}: malformed PAX record at byte {pos}")
        key, value = rec[:-1].split(b"=", 1)
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += n
    return records


def read_tar_wrapping(view: RandomAccess) -> TarWrapping:
    """Find the payload the way overlaybd's tar adaptor does (§2.7/§3.1), with clear errors.

    No ustar magic at byte 0 means no wrapper (the whole file is the payload)."""
    name = view.name
    if view.size < TAR_BLOCK:
        return TarWrapping("none", 0, view.size)
    first = view.pread(0, TAR_BLOCK)
    if first[_MAGIC[0]:_MAGIC[0] + 5] != b"ustar":
        return TarWrapping("none", 0, view.size)
    _check_header(first, f"{name}: tar header at byte 0")
    typeflag = chr(first[_TYPEFLAG])
    if typeflag == "x":
        pax_len = _parse_number(_get(first, _SIZE), f"{name}: PAX header size field")
        if pax_len > TAR_BLOCK:
            raise FormatError(f"{name}: PAX data of {pax_len} bytes; overlaybd only reads PAX data that "
                              f"fits one 512-byte block")
        if view.size < PAX_DATA_OFFSET:
            raise FormatError(f"{name}: truncated tar: {view.size} bytes, the PAX form needs {PAX_DATA_OFFSET}")
        records = _parse_pax(view.pread(TAR_BLOCK, pax_len), f"{name}: PAX data at byte {TAR_BLOCK}")
        member = view.pread(2 * TAR_BLOCK, TAR_BLOCK)
        _check_header(member, f"{name}: tar member header at byte {2 * TAR_BLOCK}")
        form, data_offset = "pax", PAX_DATA_OFFSET
        try:
            size = int(records.get("size", "0") or 0)
        except ValueError:
            raise FormatError(f"{name}: PAX record 'size' is not a number: {records['size']!r}") from None
        if size <= 0:
            size = _parse_number(_get(member, _SIZE), f"{name}: tar member size field")
    else:
        member, records, form, data_offset = first, {}, "ustar", USTAR_DATA_OFFSET
        size = _parse_number(_get(member, _SIZE), f"{name}: tar size field")
    member_type = chr(member[_TYPEFLAG])
    member_name = _get(member, _NAME).split(b"\0", 1)[0].decode("utf-8", "replace")
    if member_type not in ("0", "\0"):
        raise FormatError(f"{name}: tar member {member_name!r} has typeflag {member_type!r}, "
                          f"expected a regular file")
    if data_offset + size > view.size:
        raise FormatError(f"{name}: truncated tar: member {member_name!r} claims {size} bytes at "
                          f"{data_offset} but the file has {view.size}")
    return TarWrapping(form, data_offset, size, member_name, records)
