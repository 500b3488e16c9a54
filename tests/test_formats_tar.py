"""Tar wrapper (reference §3): the overlaybd-commit -t PAX form byte for byte against the real blobs, the plain
ustar form, and the reader's detection with clear errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from converter.formats.common import FileView, FormatError
from converter.formats.tarwrap import (
    pax_prefix,
    pax_record,
    read_tar_wrapping,
    tar_checksum,
    tar_suffix,
    ustar_prefix,
)
from tests.formats_helpers import REAL_TOOLS, needs_vectors


def test_pax_record_length_counts_itself() -> None:
    for value in ("1", "9" * 4, "12345", "1" * 90, "1" * 91, "1" * 92, "1" * 995):
        rec = pax_record("size", value)
        assert int(rec.split(b" ", 1)[0]) == len(rec)
        assert rec.endswith(b" size=" + value.encode() + b"\n")
    assert pax_record("size", "867251") == b"15 size=867251\n"  # as in the real layer1 blob


def test_pax_prefix_hand_checked_fields() -> None:
    raw = pax_prefix(867251)
    assert len(raw) == 1536
    assert raw[0:14] == b"overlaybd.pax\0"
    assert raw[100:124] == bytes(24)  # mode, uid, gid all NUL
    assert raw[124:136] == b"         17 "  # the 15-byte record, in space-padded octal
    assert raw[136:148] == bytes(12)
    assert raw[156:157] == b"x" and raw[257:265] == b"ustar\x0000"
    assert raw[512:527] == b"15 size=867251\n" and raw[527:1024] == bytes(497)
    member = raw[1024:1536]
    assert member[0:17] == b"overlaybd.commit\0"
    assert member[100:108] == b"100644 \0" and member[108:116] == b"     0 \0" and member[116:124] == b"     0 \0"
    assert member[124:136] == b"          0 " and member[136:148] == b"          0 "
    assert member[156:157] == b"0" and member[257:265] == b"ustar\x0000"
    assert member[265:270] == b"root\0" and member[297:302] == b"root\0"
    for block in (raw[:512], member):
        assert int(block[148:154].strip(), 8) == tar_checksum(block)[0]
        assert block[154:156] == b" \0"


@needs_vectors
@pytest.mark.parametrize("name", ["layer1", "layer2", "layer3", "mkfs-only"])
def test_pax_form_is_byte_identical_to_overlaybd_commit(name: str) -> None:
    raw = (REAL_TOOLS / f"{name}.obd.commit").read_bytes()
    fv = FileView(REAL_TOOLS / f"{name}.obd.commit")
    try:
        w = read_tar_wrapping(fv)
    finally:
        fv.close()
    assert (w.form, w.data_offset, w.member_name) == ("pax", 1536, "overlaybd.commit")
    assert raw[:1536] == pax_prefix(w.payload_size)
    assert raw[1536 + w.payload_size:] == tar_suffix(w.payload_size)


@pytest.mark.parametrize(("prefix", "form", "offset"), [(pax_prefix, "pax", 1536), (ustar_prefix, "ustar", 512)])
def test_both_forms_read_by_python_tarfile_and_by_us(tmp_path: Path, prefix, form: str, offset: int) -> None:
    payload = b"zfile-payload" * 100
    blob = prefix(len(payload)) + payload + tar_suffix(len(payload))
    assert len(blob) % 512 == 0 and blob.endswith(bytes(1024))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        (member,) = tf.getmembers()
        assert (member.name, member.size) == ("overlaybd.commit", len(payload))
        assert tf.extractfile(member).read() == payload
    p = tmp_path / "b.tar"
    p.write_bytes(blob)
    fv = FileView(p)
    w = read_tar_wrapping(fv)
    fv.close()
    assert (w.form, w.data_offset, w.payload_size) == (form, offset, len(payload))


def test_ustar_form_fields() -> None:
    raw = ustar_prefix(0o1234)  # Go archive/tar's USTAR form, as the convertor's uploadBaseLayer writes it
    assert raw[0:17] == b"overlaybd.commit\0"
    assert raw[100:108] == b"0000444\0" and raw[108:116] == b"0000000\0" and raw[116:124] == b"0000000\0"
    assert raw[124:136] == b"00000001234\0" and raw[136:148] == b"00000000000\0"
    assert raw[156:157] == b"0" and raw[257:265] == b"ustar\x0000" and raw[265:329] == bytes(64)
    assert raw[329:337] == b"0000000\0" and raw[337:345] == b"0000000\0" and raw[345:] == bytes(167)
    assert raw[148:156] == b"%06o\0 " % tar_checksum(raw)[0]


def read(tmp_path: Path, blob: bytes):
    p = tmp_path / "b.bin"
    p.write_bytes(blob)
    fv = FileView(p)
    try:
        return read_tar_wrapping(fv)
    finally:
        fv.close()


def test_no_wrapper(tmp_path: Path) -> None:
    w = read(tmp_path, b"ZFile\0\1\0" + bytes(2000))
    assert (w.form, w.data_offset, w.payload_size) == ("none", 0, 2008)


def test_wrong_checksum(tmp_path: Path) -> None:
    blob = bytearray(pax_prefix(10) + bytes(10) + tar_suffix(10))
    blob[5] ^= 1
    with pytest.raises(FormatError, match=r"tar header at byte 0: checksum mismatch"):
        read(tmp_path, bytes(blob))
    blob = bytearray(pax_prefix(10) + bytes(10) + tar_suffix(10))
    blob[1024 + 3] ^= 1
    with pytest.raises(FormatError, match=r"tar member header at byte 1024: checksum mismatch"):
        read(tmp_path, bytes(blob))


def test_truncated_tar(tmp_path: Path) -> None:
    payload = bytes(5000)
    with pytest.raises(FormatError, match=r"truncated tar: member 'overlaybd.commit' claims 5000 bytes"):
        read(tmp_path, ustar_prefix(len(payload)) + payload[:3000])


def test_gnu_tar_header_refused(tmp_path: Path) -> None:
    blob = bytearray(ustar_prefix(10))
    blob[257:265] = b"ustar  \0"
    with pytest.raises(FormatError, match=r"not '00'"):
        read(tmp_path, bytes(blob))


def test_non_regular_member_refused(tmp_path: Path) -> None:
    blob = bytearray(ustar_prefix(0))
    blob[156] = ord("5")
    blob[148:156] = b"%06o\0 " % tar_checksum(blob)[0]
    with pytest.raises(FormatError, match=r"typeflag '5'"):
        read(tmp_path, bytes(blob) + tar_suffix(0))
