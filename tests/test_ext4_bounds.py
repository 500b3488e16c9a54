"""Issue 14 items 3 and 6 (converter side): tar special records are bounded like Go's archive/tar (1 MiB),
and every tar name or problem put into an error message is shortened at the source."""

from __future__ import annotations

import io
import tarfile

import pytest

from converter.errors import MAX_MESSAGE, ConversionError, PermanentError, shorten
from converter.ext4 import ImageBuilder, LayerApplyError, RawDisk
from converter.ext4.layerstream import LayerStream
from converter.ext4.tarstream import MAX_SPECIAL, TarFormatError, TarReader
from tests.harness import layers as L

VSIZE = 1 << 30
BIG = MAX_SPECIAL + 4096  # just over the cap


def special(typeflag: bytes, payload: bytes, name: str = "././@LongLink") -> bytes:
    """One special record (PAX x/g, GNU L/K) with its payload, as GNU tar and tarfile write them."""
    info = tarfile.TarInfo(name)
    info.type, info.size = typeflag, len(payload)
    return info.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)


def member(name: str, data: bytes = b"") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


def finish(*parts: bytes) -> bytes:
    return b"".join(parts) + bytes(1024)


def apply(tmp_path, tar: bytes) -> None:
    with RawDisk(tmp_path / "disk.raw", VSIZE) as raw:
        ImageBuilder(VSIZE).apply_layer(io.BytesIO(tar), raw, label="3 (sha256:abc)")


def entries_of(tar: bytes) -> list:
    with LayerStream(io.BytesIO(tar)) as stream:
        reader = TarReader(stream)
        out = []
        for entry in reader:
            reader.read_all()
            out.append(entry)
        return out


def test_pax_header_over_1_mib_is_refused_with_a_short_error(tmp_path) -> None:
    # Harmless content (a comment): before the cap this converted, after reading all of it into memory.
    tar = finish(special(b"x", L._pax_record("comment", b"c" * BIG), "PaxHeaders/big"), member("a", b"1"))
    with pytest.raises(LayerApplyError) as err:
        apply(tmp_path, tar)
    message = str(err.value)
    assert message.startswith("layer 3 (sha256:abc), entry 'PaxHeaders/big': PAX extended header at offset 0")
    assert f"at most {MAX_SPECIAL}" in message and len(message) < 300


def test_global_pax_headers_may_not_add_up_past_the_cap(tmp_path) -> None:
    half = L._pax_record("comment.a", b"a" * (MAX_SPECIAL // 2 + 10))
    other = L._pax_record("comment.b", b"b" * (MAX_SPECIAL // 2 + 10))
    tar = finish(special(b"g", half, "g1"), special(b"g", other, "g2"), member("a"))
    with pytest.raises(LayerApplyError, match=r"entry 'g2': global PAX records at offset \d+ add up to"):
        apply(tmp_path, tar)


def test_chained_pax_headers_may_not_add_up_past_the_cap(tmp_path) -> None:
    part = L._pax_record("comment", b"a" * (MAX_SPECIAL // 2 + 10))
    tar = finish(special(b"x", part, "x1"), special(b"x", L._pax_record("comment2", b"b" * (MAX_SPECIAL // 2 + 10)),
                                                    "x2"), member("a"))
    with pytest.raises(LayerApplyError, match=r"entry 'x2': pending PAX records"):
        apply(tmp_path, tar)


@pytest.mark.parametrize(("typeflag", "what"), [(b"L", "GNU long name"), (b"K", "GNU long link name")])
def test_gnu_long_names_over_1_mib_are_refused(tmp_path, typeflag: bytes, what: str) -> None:
    tar = finish(special(typeflag, b"n" * BIG + b"\0"), member("a"))
    with pytest.raises(LayerApplyError) as err:
        apply(tmp_path, tar)
    message = str(err.value)
    assert f"entry '././@LongLink': {what} at offset 0 is {BIG + 1} bytes" in message
    assert len(message) < 300


def test_records_at_the_cap_are_still_read() -> None:
    name = b"d/" * 20000 + b"f"  # a long but legal GNU long name
    value = b"v" * (MAX_SPECIAL - 100)
    tar = finish(special(b"L", name + b"\0"), member("ignored"),
                 special(b"x", L._pax_record("comment", value)), member("b"))
    first, second = entries_of(tar)
    assert first.name == name and second.name == b"b"


def test_old_gnu_sparse_map_over_the_cap() -> None:
    info = tarfile.TarInfo("sparse")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[482] = 1  # an extension block follows
    header[148:156] = b"%06o\0 " % (sum(header[:148]) + 256 + sum(header[156:512]))
    ext = bytearray(512)
    ext[504] = 1  # ... and another one, forever
    tar = bytes(header) + bytes(ext) * (MAX_SPECIAL // 512 + 2) + bytes(1024)
    with pytest.raises(TarFormatError, match=rf"entry 'sparse' at offset 0: old GNU sparse map extends over more "
                                             rf"than {MAX_SPECIAL} bytes"):
        entries_of(tar)


def test_sparse_1_0_map_over_the_cap() -> None:
    count = 120_000
    lines = b"%d\n" % count + b"".join(b"%d\n1\n" % (k * 8192) for k in range(count))
    data = lines + bytes(-len(lines) % 512) + b"x" * count
    assert len(lines) > MAX_SPECIAL
    records = {"GNU.sparse.major": b"1", "GNU.sparse.minor": b"0", "GNU.sparse.name": b"sparse",
               "GNU.sparse.realsize": str(count * 8192).encode()}
    pax = b"".join(L._pax_record(k, v) for k, v in records.items())
    tar = finish(special(b"x", pax, "PaxHeaders/sparse"), member("GNUSparseFile.0/sparse", data))
    with pytest.raises(TarFormatError, match=rf"GNU sparse 1.0 map is unterminated or longer than {MAX_SPECIAL}"):
        entries_of(tar)


def test_sparse_1_0_map_without_a_newline_stops_at_the_entry_end() -> None:
    records = {"GNU.sparse.major": b"1", "GNU.sparse.minor": b"0", "GNU.sparse.name": b"s",
               "GNU.sparse.realsize": b"10"}
    pax = b"".join(L._pax_record(k, v) for k, v in records.items())
    tar = finish(special(b"x", pax), member("GNUSparseFile.0/s", b"7" * 1024), member("next"))
    with pytest.raises(TarFormatError, match="unterminated"):
        entries_of(tar)


def test_pax_numbers_that_are_not_numbers_name_the_field(tmp_path) -> None:
    tar = finish(special(b"x", L._pax_record("uid", b"12x")), member("a"))
    with pytest.raises(LayerApplyError, match=r"PAX header before offset \d+: uid is not a number: b'12x'"):
        apply(tmp_path, tar)


def test_long_entry_names_are_shortened_in_errors(tmp_path) -> None:
    # A 600 KB name (legal as a GNU long name) whose last component is too long for ext4.
    name = "a/" * 300_000 + "n" * 300
    tar = finish(special(b"L", name.encode() + b"\0"), member("placeholder"))
    with pytest.raises(LayerApplyError) as err:
        apply(tmp_path, tar)
    message = str(err.value)
    assert "name component longer than 255 bytes (300)" in message
    assert len(message) < 1500 and "chars cut" in message
    assert len(err.value.entry) <= 1024


def test_conversion_errors_are_bounded_at_the_source() -> None:
    huge = "registry said: " + "x" * 5_000_000
    error = PermanentError(huge)
    assert len(str(error)) <= MAX_MESSAGE and str(error).startswith("registry said: xxx")
    assert "chars cut" in str(error) and isinstance(error, ConversionError)
    assert shorten("short") == "short"
    assert len(shorten("y" * 10_000, 100)) <= 100


def test_long_hardlink_targets_and_xattr_names_are_shortened_in_errors(tmp_path) -> None:
    target = "t/" * 300_000 + "x"
    link = tarfile.TarInfo("link")
    link.type = tarfile.LNKTYPE
    tar = finish(special(b"K", target.encode() + b"\0"), link.tobuf(tarfile.USTAR_FORMAT))
    with pytest.raises(LayerApplyError, match="does not exist") as err:
        apply(tmp_path, tar)
    assert len(str(err.value)) < 1500 and "chars cut" in str(err.value)

    pax = L._pax_record("SCHILY.xattr.user." + "n" * 500_000, b"v")
    with pytest.raises(LayerApplyError, match="extended attribute name too long") as err:
        apply(tmp_path, finish(special(b"x", pax), member("f")))
    assert len(str(err.value)) < MAX_MESSAGE + 100 and "chars cut" in str(err.value)
