"""gzip.meta (turbooci reference §3): builder byte-identical to the real tools, reader random access, the
helper-process decompressor, LayerStream's gzip_index mode, and clear errors for bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import random
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converter.ext4.layerstream import LayerStream
from converter.formats.common import FileView, FormatError
from converter.formats.gzindex import (
    HEADER_SIZE,
    GzipIndex,
    GzipIndexer,
    MultiMemberError,
    build_gzip_index,
)
from converter.formats.gzstream import GzipIndexStream
from converter.formats.libz import BACKENDS, backend
from tests.formats_helpers import REAL_TOOLS, VECTORS, needs_vectors

TURBO = VECTORS / "turbooci"
# (gzip source blob, the real tools' gzip.meta for it): every gzip vector
GZIP_VECTORS = [
    pytest.param(REAL_TOOLS / "layer1.tar.gz", TURBO / "layer1" / "gzip.meta", id="layer1"),
    pytest.param(REAL_TOOLS / "layer3.tar.gz", TURBO / "layer3" / "gzip.meta", id="layer3"),
    pytest.param(TURBO / "extra" / "layer.tar.gz", TURBO / "extra" / "gzip.meta", id="extra"),
]


class BytesView:
    """A RandomAccess over bytes (the target blob for reader tests)."""

    def __init__(self, data: bytes, name: str = "blob") -> None:
        self.data, self.name, self.size = data, name, len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]

    def close(self) -> None:
        pass


def index_of(data: bytes, *, span: int = 1 << 20, input_bytes: int = 1 << 20,
             chunk: int = 8 << 20, backend: str | None = None) -> tuple[bytes, bytes]:
    """(decompressed data, gzip.meta) through GzipIndexer in this thread."""
    indexer = GzipIndexer(io.BytesIO(data).read, span=span, input_bytes=input_bytes, backend=backend)
    parts = []
    while piece := indexer.read(chunk):
        parts.append(piece)
    return b"".join(parts), indexer.index_file()


# ----------------------------------------------------------------------------------------------------------
# Builder: byte-identical to the vectors


@needs_vectors
@pytest.mark.parametrize(("source", "expected"), GZIP_VECTORS)
def test_index_is_byte_identical_to_the_real_tools(source: Path, expected: Path) -> None:
    assert build_gzip_index(str(source)) == expected.read_bytes()


@needs_vectors
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(("source", "expected"), GZIP_VECTORS)
def test_every_inflate_backend_gives_the_real_tools_index(source: Path, expected: Path, name: str) -> None:
    assert backend(name).name == name  # both are installed here: zlib-ng (the `zlib-ng` package) and libz
    indexer = GzipIndexer(open(source, "rb").read, backend=name)  # noqa: SIM115 - read to the end below
    while indexer.read():
        pass
    assert indexer.index_file() == expected.read_bytes()
    indexer.close()


def test_preferred_backend_is_zlib_ng() -> None:
    assert backend().name == "zlib-ng"
    with pytest.raises(FormatError, match="inflate backend 'lzma' is not available"):
        backend("lzma")


def test_system_zlib_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from converter.formats import libz

    monkeypatch.setitem(libz._loaded, "zlib-ng", ImportError("no zlib_ng here"))
    assert backend().name == "zlib"
    data = b"fallback " * 10_000
    assert index_of(gzip.compress(data))[0] == data
    with pytest.raises(FormatError, match="'zlib-ng' is not available: no zlib_ng here"):
        backend("zlib-ng")


@needs_vectors
@pytest.mark.parametrize(("source", "expected"), GZIP_VECTORS)
@pytest.mark.parametrize(("input_bytes", "chunk"), [(7, 32768), (4096, 100_001), (1 << 20, 1 << 20)])
def test_index_does_not_depend_on_read_sizes(source: Path, expected: Path, input_bytes: int, chunk: int) -> None:
    data, meta = index_of(source.read_bytes(), input_bytes=input_bytes, chunk=chunk)
    assert meta == expected.read_bytes()
    assert data == gzip.decompress(source.read_bytes())


@needs_vectors
def test_extra_vector_checkpoints_and_bits() -> None:
    """The README's table: 5 entries, the 2 MiB mark skipped, non-zero bits (inflatePrime needed)."""
    index = GzipIndex(build_gzip_index(str(TURBO / "extra" / "layer.tar.gz")))
    assert [(e[0], e[3]) for e in index.entries] == [(0, 0), (891564, 6), (2927627, 3), (4964762, 0), (7003152, 1)]


@needs_vectors
@pytest.mark.parametrize(("source", "expected"), GZIP_VECTORS)
def test_helper_process_stream_gives_data_and_identical_index(source: Path, expected: Path) -> None:
    blob = source.read_bytes()
    for raw in (open(source, "rb"), io.BytesIO(blob)):  # noqa: SIM115 - fd read by the child / pumped
        with raw, GzipIndexStream(raw, chunk_bytes=1 << 20) as stream:
            data = b"".join(iter(stream.read, b""))
            assert stream.index_file() == expected.read_bytes()
        assert data == gzip.decompress(blob)


@needs_vectors
@pytest.mark.parametrize(("source", "expected"), GZIP_VECTORS)
def test_layerstream_gzip_index_mode(source: Path, expected: Path) -> None:
    blob = source.read_bytes()
    with open(source, "rb") as f, LayerStream(f, hash_content=True, gzip_index=True) as tar:
        assert tar.compression == "gzip"
        chunks = []
        while chunk := tar.next_chunk():
            chunks.append(chunk)
        assert tar.gzip_index() == expected.read_bytes()
        assert tar.hexdigest() == hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert b"".join(chunks) == gzip.decompress(blob)


@needs_vectors
def test_layerstream_gzip_index_is_none_for_plain_tar_and_without_the_option() -> None:
    with open(REAL_TOOLS / "layer2.tar", "rb") as f, LayerStream(f, gzip_index=True) as tar:
        tar.drain()
        assert tar.compression == "none" and tar.gzip_index() is None
    with open(REAL_TOOLS / "layer1.tar.gz", "rb") as f, LayerStream(f) as tar:
        tar.drain()
        assert tar.gzip_index() is None


def test_layerstream_gzip_index_closed_early_stops_the_helper() -> None:
    data = random.Random(5).randbytes(3 << 20)
    with LayerStream(io.BytesIO(gzip.compress(data)), gzip_index=True, chunk_bytes=1 << 20) as tar:
        assert tar.next_chunk() == data[:1 << 20]
        process = tar._indexed._proc  # type: ignore[union-attr]
    assert process.poll() is not None


def test_layerstream_gzip_index_before_end_is_refused() -> None:
    with LayerStream(io.BytesIO(gzip.compress(b"x" * 100)), gzip_index=True) as tar, \
            pytest.raises(RuntimeError, match="before the end"):
        tar.gzip_index()


# ----------------------------------------------------------------------------------------------------------
# Round trips on generated streams: many blocks, odd bit positions, small spans


def _gzip_with_blocks(data: bytes, cuts: list[int], level: int) -> bytes:
    """A gzip stream whose deflate blocks end at `cuts` (Z_BLOCK / Z_PARTIAL_FLUSH leave odd bit offsets)."""
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    out, pos = [], 0
    for i, cut in enumerate(sorted(set(cuts))):
        out.append(comp.compress(data[pos:cut]))
        out.append(comp.flush(zlib.Z_BLOCK if i % 2 else zlib.Z_PARTIAL_FLUSH))
        pos = cut
    out.append(comp.compress(data[pos:]))
    out.append(comp.flush())
    return b"".join(out)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 400_000), span=st.sampled_from([4096, 32768, 65536]),
       level=st.sampled_from([1, 6, 9]), ncuts=st.integers(0, 40))
def test_reader_reads_any_range_of_any_stream(seed: int, size: int, span: int, level: int, ncuts: int) -> None:
    rng = random.Random(seed)
    data = b"".join(rng.randbytes(rng.randrange(1, 5000)) if rng.random() < 0.3 else bytes([rng.randrange(4)]) *
                    rng.randrange(1, 9000) for _ in range(size // 2000 + 1))[:size]
    blob = _gzip_with_blocks(data, [rng.randrange(len(data)) for _ in range(ncuts)], level)
    out, meta = index_of(blob, span=span, input_bytes=rng.choice([1, 333, 1 << 16]), chunk=rng.choice([32768, 99_999]))
    assert out == data
    assert index_of(blob, span=span, backend="zlib")[1] == meta  # zlib-ng and the system zlib agree
    index = GzipIndex(meta, target=BytesView(blob))
    assert index.uncompressed_size == len(data) and index.header.gzip_file_size == len(blob)
    de = [e[0] for e in index.entries]
    assert de[0] == 0 and de == sorted(set(de))
    # the rule keeps the last boundary at or before each span mark M, i.e. in (M - span, M]: at most one
    # entry per such interval
    assert all(-(-b // span) > -(-a // span) for a, b in itertools.pairwise(de))
    for no in range(len(index.entries)):  # every checkpoint decodes from its own state
        start = index.entries[no][0]
        assert index.pread(start, 1000) == data[start:start + 1000]
    for _ in range(10):
        off = rng.randrange(len(data))
        n = rng.randrange(1, 70_000)
        assert index.pread(off, n) == data[off:off + n]


@needs_vectors
@pytest.mark.parametrize(("source", "expected"), GZIP_VECTORS)
def test_vector_index_serves_reads_from_every_checkpoint(source: Path, expected: Path) -> None:
    data = gzip.decompress(source.read_bytes())
    target = FileView(source)
    try:
        index = GzipIndex(expected.read_bytes(), target=target)
        for de, *_ in index.entries:
            assert index.pread(de, 70_000) == data[de:de + 70_000]
        assert index.pread(len(data) - 10, 100) == data[-10:]  # short at the end of the stream
    finally:
        target.close()


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def small_index() -> tuple[bytes, bytes]:
    data = random.Random(1).randbytes(200_000) * 3
    blob = _gzip_with_blocks(data, [100_000, 300_000, 500_000], 6)
    return blob, index_of(blob, span=65536)[1]


@pytest.mark.parametrize("cut", [0, 100, HEADER_SIZE - 1, HEADER_SIZE + 5, -1])
def test_truncated_index_is_refused(small_index: tuple[bytes, bytes], cut: int) -> None:
    _blob, meta = small_index
    with pytest.raises(FormatError, match="truncated"):
        GzipIndex(meta[:cut])


def test_header_crc_is_checked(small_index: tuple[bytes, bytes]) -> None:
    meta = bytearray(small_index[1])
    meta[60] ^= 1  # inside the reserved area: only the CRC can notice
    with pytest.raises(FormatError, match="header CRC mismatch"):
        GzipIndex(bytes(meta))


def _with_header_field(meta: bytes, offset: int, fmt: str, value: int) -> bytes:
    from converter.formats.crc import crc32c_raw

    raw = bytearray(meta)
    struct.pack_into(fmt, raw, offset, value)
    struct.pack_into("<I", raw, HEADER_SIZE - 4, crc32c_raw(bytes(raw[:HEADER_SIZE - 4])))
    return bytes(raw)


@pytest.mark.parametrize(("offset", "fmt", "value", "message"), [
    (0, "<B", ord("x"), "bad magic"),
    (8, "<B", 2, "major_version 2"),
    (21, "<i", 30, "index_size 30"),
    (25, "<q", 99, "index_num 99"),
    (41, "<q", 12345, "index_file_size 12345"),
    (321, "<q", 1, "index_start"),
])
def test_bad_header_fields_are_named(small_index: tuple[bytes, bytes], offset: int, fmt: str, value: int,
                                     message: str) -> None:
    with pytest.raises(FormatError, match=message):
        GzipIndex(_with_header_field(small_index[1], offset, fmt, value))


def test_target_size_mismatch_is_refused(small_index: tuple[bytes, bytes]) -> None:
    blob, meta = small_index
    with pytest.raises(FormatError, match=r"gzip_file_size .* does not match the target blob"):
        GzipIndex(meta, target=BytesView(blob + b"\0"))


def test_changed_target_gives_a_clear_read_error(small_index: tuple[bytes, bytes]) -> None:
    blob, meta = small_index
    index = GzipIndex(meta, target=BytesView(bytes(len(blob))))  # same size, other bytes
    with pytest.raises(FormatError):
        index.pread(400_000, 10_000)


def test_multi_member_gzip_is_rejected_clearly() -> None:
    blob = gzip.compress(b"a" * 10_000) + gzip.compress(b"b" * 10_000)
    with pytest.raises(MultiMemberError, match="another gzip member follows the first gzip member at compressed byte"):
        index_of(blob)
    with GzipIndexStream(io.BytesIO(blob), name="layer 2/3") as stream, \
            pytest.raises(MultiMemberError, match="layer 2/3: another gzip member"):
        while stream.read():
            pass


def test_zero_padding_after_the_member_is_accepted() -> None:
    data = b"tar bytes" * 1000
    out, meta = index_of(gzip.compress(data) + bytes(1024))
    assert out == data and GzipIndex(meta).header.gzip_file_size == len(gzip.compress(data)) + 1024


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda b: b[:len(b) // 2], "gzip stream truncated"),
    (lambda b: b[:12] + b"\xff" * 40 + b[52:], "corrupt deflate data"),
    (lambda b: b"\x1f\x8b\x08\x00" + b"\0" * 6 + b"\xff\xff\xff", "corrupt deflate data"),
])
def test_bad_gzip_streams_fail_with_a_clear_error(mangle: object, message: str) -> None:
    blob = mangle(gzip.compress(random.Random(2).randbytes(300_000)))  # type: ignore[operator]
    with pytest.raises(FormatError, match=message):
        index_of(blob)
    with GzipIndexStream(io.BytesIO(blob), name="layer 1/1") as stream, pytest.raises(FormatError, match=message):
        while stream.read():
            pass


def test_child_that_finished_early_is_not_a_crash() -> None:
    """A slow consumer: the child sends its last chunk and the index, then exits while the parent still
    holds slots; handing those back must not count as the child dying (regression)."""
    # 2.5 chunks: the child needs one slot back, then ends; compressible, so gzip.meta fits the pipe
    data = (random.Random(3).randbytes(1000) * 2700)[:5 << 19]
    with GzipIndexStream(io.BytesIO(gzip.compress(data, 1)), chunk_bytes=1 << 20) as stream:
        first = stream.read()
        assert stream._proc.wait(timeout=60) == 0  # everything is in the pipe now
        rest = b"".join(iter(stream.read, b""))
        assert first + rest == data
        assert GzipIndex(stream.index_file()).uncompressed_size == len(data)


@needs_vectors
def test_sequential_reads_go_on_from_the_last_one() -> None:
    """Reads in stream order (as materialize does) continue the previous inflate instead of restarting
    at the checkpoint; mixed with backward jumps they still return the right bytes."""
    source = TURBO / "extra" / "layer.tar.gz"
    data = gzip.decompress(source.read_bytes())
    target = FileView(source)
    try:
        index = GzipIndex((TURBO / "extra" / "gzip.meta").read_bytes(), target=target)
        pieces = [index.pread(off, 300_001) for off in range(0, len(data), 300_001)]
        assert b"".join(pieces) == data
        cursor = index._cursor
        assert cursor is not None and cursor.de == len(data)  # one inflate ran through the whole stream
        assert index.pread(1000, 10) == data[1000:1010] and index.pread(5_000_000, 10) == data[5_000_000:5_000_010]
        index.close()
    finally:
        target.close()


def test_empty_gzip_has_one_checkpoint_and_empty_input_is_truncated() -> None:
    out, meta = index_of(gzip.compress(b""))
    index = GzipIndex(meta)
    assert out == b"" and [e[:2] for e in index.entries] == [(0, 10)] and index.uncompressed_size == 0
    with pytest.raises(FormatError, match="gzip stream truncated"):
        index_of(b"")
