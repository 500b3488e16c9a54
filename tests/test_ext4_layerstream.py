"""LayerStream (decompression ahead, on a helper thread) and the tar reader's zero-copy slicing of its chunks."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from converter.ext4 import ImageBuilder, LayerApplyError
from converter.ext4.layerstream import LayerStream
from converter.ext4.tarstream import TarFormatError, TarReader, _byte_sum
from converter.formats.layer import LayerBlobWriter


def sample_tar() -> bytes:
    """Entries whose headers, PAX records, data and padding land across chunk boundaries of any size."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(40):
            data = bytes((i * 7 + k) % 251 for k in range(i * 997 % 9000))
            info = tarfile.TarInfo(f"dir/{'long-name-' * (i % 20)}{i}")
            info.size, info.mtime = len(data), 1_700_000_000 + i
            if i % 5 == 0:
                info.pax_headers = {"SCHILY.xattr.user.k": "v" * i}
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("dir/link")
        link.type, link.linkname = tarfile.SYMTYPE, "x" * 150  # GNU/PAX long link name
        tf.addfile(link)
    return raw.getvalue()


def entries(stream: LayerStream) -> list[tuple[bytes, int, bytes, bytes]]:
    reader = TarReader(stream)
    out = []
    for entry in reader:
        data = b"".join(bytes(p) for p in reader.read_data(max_chunk=3000))
        out.append((entry.name, entry.mtime, entry.linkname, data))
    return out


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
def test_content_hash_and_count_per_compression(codec: str) -> None:
    tar = sample_tar()
    blob = {"none": tar, "gzip": gzip.compress(tar), "zstd": zstandard.ZstdCompressor().compress(tar)}[codec]
    with LayerStream(io.BytesIO(blob), hash_content=True, chunk_bytes=5000) as stream:
        assert stream.compression == codec
        pieces = []
        while chunk := stream.next_chunk():
            pieces.append(chunk)
        assert b"".join(pieces) == tar
        assert stream.count == len(tar)
        assert stream.hexdigest() == hashlib.sha256(tar).hexdigest()


@pytest.mark.parametrize("chunk_bytes", [7, 511, 512, 513, 4097, 1 << 20])
def test_tar_reader_same_entries_whatever_the_chunk_size(chunk_bytes: int) -> None:
    tar = sample_tar()
    with LayerStream(io.BytesIO(gzip.compress(tar)), chunk_bytes=chunk_bytes) as stream:
        got = entries(stream)
    expected = []
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
            expected.append((m.name.encode(), m.mtime, m.linkname.encode(), data))
    assert got == expected


def test_entry_data_is_a_view_of_the_chunk_not_a_copy() -> None:
    tar = sample_tar()
    with LayerStream(io.BytesIO(tar)) as stream:
        reader = TarReader(stream)
        for entry in reader:
            if entry.size > 1000:
                piece = reader.read_exact(entry.size)
                assert isinstance(piece, memoryview) and isinstance(piece.obj, bytes)
                return
    pytest.fail("no entry with data")


def test_truncated_header_across_chunks_is_named() -> None:
    tar = sample_tar()
    cut = tar[: 512 * 3 + 100]  # inside the second header
    with LayerStream(io.BytesIO(cut), chunk_bytes=300) as stream, pytest.raises(TarFormatError) as caught:
        entries(stream)
    assert str(caught.value) == "truncated tar header at offset 1536"


class FailingStream(io.RawIOBase):
    """Serves `data`, then fails like a dropped connection."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._data.readinto(buffer)
        if not n:
            raise ConnectionResetError("registry connection reset")
        return n


def test_source_error_is_raised_in_the_reading_thread_and_names_the_layer(tmp_path) -> None:
    blob = gzip.compress(sample_tar())[:-40]
    stream = LayerStream(FailingStream(blob), chunk_bytes=4096)
    with pytest.raises(ConnectionResetError, match="connection reset"):
        while stream.next_chunk():
            pass
    assert stream.next_chunk() == b""  # the end, after the error
    stream.close()
    with (pytest.raises(LayerApplyError, match=r"layer L3.*cannot read layer data: ConnectionResetError"),
          LayerBlobWriter(tmp_path / "l.obd", virtual_size=1 << 30) as writer):
        ImageBuilder(1 << 30).apply_layer(FailingStream(blob), writer, label="L3")
    assert not (tmp_path / "l.obd").exists()  # nothing half-written is left


def test_close_stops_a_helper_waiting_for_room() -> None:
    stream = LayerStream(io.BytesIO(bytes(10 << 20)), chunk_bytes=4096)
    stream.next_chunk()  # the helper is now blocked: the queue is full
    before = {t.name for t in threading.enumerate()}
    assert "obd-layer-decompress" in before
    stream.close()
    assert all(t.name != "obd-layer-decompress" for t in threading.enumerate())


def test_hexdigest_needs_the_whole_content() -> None:
    with LayerStream(io.BytesIO(sample_tar()), hash_content=True) as stream:
        with pytest.raises(RuntimeError, match="before the end"):
            stream.hexdigest()
        stream.drain()
        assert stream.hexdigest() == hashlib.sha256(sample_tar()).hexdigest()
    with LayerStream(io.BytesIO(b"")) as stream, pytest.raises(RuntimeError, match="without hash_content"):
        stream.drain()
        stream.hexdigest()


@given(st.binary(min_size=0, max_size=256))
def test_byte_sum_is_exact_for_any_piece_up_to_256_bytes(piece: bytes) -> None:
    assert _byte_sum(piece) == sum(piece)
    assert _byte_sum(b"\xff" * 256) == 255 * 256


def test_headers_with_high_bytes_pass_the_checksum_both_ways() -> None:
    """Names in UTF-8 have bytes > 127: the unsigned sum must match, and a header whose checksum was
    written as a signed sum (old tars) is accepted too."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("é" * 40)
        tf.addfile(info)
    tar = bytearray(raw.getvalue())
    signed = sum(b - 256 if b > 127 else b for b in tar[:148] + b" " * 8 + tar[156:512])
    with LayerStream(io.BytesIO(bytes(tar))) as stream:
        assert [e[0] for e in entries(stream)] == ["é".encode() * 40]
    tar[148:156] = b"%06o\0 " % signed
    with LayerStream(io.BytesIO(bytes(tar))) as stream:
        assert [e[0] for e in entries(stream)] == ["é".encode() * 40]
    tar[148:156] = b"%06o\0 " % (signed + 1)
    with LayerStream(io.BytesIO(bytes(tar))) as stream, pytest.raises(TarFormatError, match="bad tar header checksum"):
        entries(stream)


def test_multi_frame_zstd_is_read_across_frames_into_full_chunks() -> None:
    """zstd:chunked layers are a series of small frames; every frame must be read, in full chunks."""
    tar = sample_tar()
    frames = b"".join(zstandard.ZstdCompressor().compress(tar[i:i + 3000]) for i in range(0, len(tar), 3000))
    with LayerStream(io.BytesIO(frames), hash_content=True, chunk_bytes=64 << 10) as stream:
        first = stream.next_chunk()
        assert len(first) == min(64 << 10, len(tar))  # not cut at the first frame's end
        stream.drain()
        assert stream.hexdigest() == hashlib.sha256(tar).hexdigest()
    with LayerStream(io.BytesIO(frames)) as stream:
        assert [e[0] for e in entries(stream)][-1] == b"dir/link"


def test_multi_member_gzip_is_read_to_the_end() -> None:
    """eStargz layers are one gzip member per file (and a footer member): all members are the tar."""
    tar = sample_tar()
    members = b"".join(gzip.compress(tar[i:i + 5000], mtime=0) for i in range(0, len(tar), 5000))
    with LayerStream(io.BytesIO(members), hash_content=True, chunk_bytes=64 << 10) as stream:
        stream.drain()
        assert stream.count == len(tar) and stream.hexdigest() == hashlib.sha256(tar).hexdigest()

