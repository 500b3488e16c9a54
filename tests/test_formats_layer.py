"""The one-pass pipeline (LayerBlobWriter) and the stacked reader: property-based round trips with rewrites
and zeroed ranges, overlaybd's stacking rules, blob metadata, abort and error paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converter.formats.common import FormatError
from converter.formats.layer import LayerBlobWriter
from converter.formats.lsmt import MAX_LENGTH
from converter.formats.stack import StackedReader, open_layer

SECTOR = 512
VSIZE_SECTORS = 512  # 256 KiB virtual disks keep the model small and the examples fast
VSIZE = VSIZE_SECTORS * SECTOR

# an op: ("w", first sector, sector count, fill seed) or ("z", first sector, sector count, 0)
op = st.tuples(st.sampled_from("wwz"), st.integers(0, VSIZE_SECTORS - 1), st.integers(1, 64),
               st.integers(0, 2**32 - 1))
CONFIGS = [dict(compress=True, wrapper="pax"), dict(compress=True, wrapper="ustar"),
           dict(compress=False, wrapper="none"), dict(compress=False, wrapper="pax")]


def payload(seed: int, sectors: int) -> bytes:
    # partly compressible, distinct per op, so misplaced data is always detected
    unit = seed.to_bytes(4, "little") + os.urandom(12)
    return (unit * (sectors * SECTOR // len(unit) + 1))[:sectors * SECTOR]


class Model:
    """Expected per-sector state of one layer: bytes (written), b"" (zeroed) or absent (hole)."""

    def __init__(self) -> None:
        self.sectors: dict[int, bytes] = {}

    def apply(self, writer: LayerBlobWriter, ops: list[tuple[str, int, int, int]]) -> None:
        for kind, first, count, seed in ops:
            count = min(count, VSIZE_SECTORS - first)
            if kind == "w":
                data = payload(seed, count)
                writer.write(first * SECTOR, bytearray(data))
                for i in range(count):
                    self.sectors[first + i] = data[i * SECTOR:(i + 1) * SECTOR]
            else:
                writer.zero(first * SECTOR, count * SECTOR)
                for i in range(count):
                    self.sectors[first + i] = b""


def expected_disk(models: list[Model]) -> bytes:
    disk = bytearray(VSIZE)
    for s in range(VSIZE_SECTORS):
        for m in reversed(models):  # the top layer that has the sector wins, zeroed included
            if s in m.sectors:
                disk[s * SECTOR:(s + 1) * SECTOR] = m.sectors[s] or bytes(SECTOR)
                break
    return bytes(disk)


def check_index_invariants(path: Path) -> None:
    with open_layer(path) as layer:
        prev_end = 0
        for e in layer.iter_entries():
            assert 1 <= e.length <= MAX_LENGTH and e.offset >= prev_end
            prev_end = e.end
        assert layer.trailer.index_size % 256 == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=25), config=st.sampled_from(CONFIGS))
def test_single_layer_round_trip(tmp_path: Path, ops: list[tuple[str, int, int, int]], config: dict) -> None:
    path = tmp_path / "layer.obd"
    model = Model()
    with LayerBlobWriter(path, virtual_size=VSIZE, workers=2, **config) as w:
        model.apply(w, ops)
        info = w.close()
    check_index_invariants(path)
    with StackedReader([path]) as stack:
        assert stack.virtual_size == VSIZE
        assert stack.pread(0, VSIZE) == expected_disk([model])
    assert info.size == path.stat().st_size


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(st.lists(op, max_size=12), min_size=1, max_size=4))
def test_stacked_round_trip(tmp_path: Path, layers: list[list[tuple[str, int, int, int]]]) -> None:
    paths, models = [], []
    for i, ops in enumerate(layers):
        path = tmp_path / f"l{i}.obd"
        model = Model()
        with LayerBlobWriter(path, virtual_size=VSIZE, workers=2) as w:
            model.apply(w, ops)
        paths.append(path)
        models.append(model)
    expected = expected_disk(models)
    with StackedReader(paths) as stack:
        assert stack.pread(0, VSIZE) == expected
        for off, n in ((512, 1024), (VSIZE - 512, 512), (4096 * 3, 4096 * 5)):
            assert stack.pread(off, n) == expected[off:off + n]
        out = tmp_path / "disk.raw"
        stack.materialize(out)
        assert out.read_bytes() == expected


def test_large_writes_in_parallel_keep_order(tmp_path: Path) -> None:
    """Enough 1 MiB writes to keep several compression batches in flight; the caller reuses its buffer."""
    path = tmp_path / "big.obd"
    buf = bytearray(1 << 20)
    expected = []
    with LayerBlobWriter(path, virtual_size=64 << 30, workers=2) as w:
        for i in range(24):
            chunk = os.urandom(1 << 19) + bytes([i]) * (1 << 19)
            buf[:] = chunk
            w.write((i * 3) << 20, buf)  # gaps between the writes
            expected.append(chunk)
        info = w.close()
    assert info.index_entries == 24
    with StackedReader([path]) as stack:
        for i, chunk in enumerate(expected):
            assert stack.pread((i * 3) << 20, 1 << 20) == chunk
        assert stack.pread((1 << 20), 1 << 20) == bytes(1 << 20)  # a hole reads as zeros


def test_blob_info(tmp_path: Path) -> None:
    path = tmp_path / "info.obd"
    with LayerBlobWriter(path, virtual_size=1 << 30, uuid="5cc26db7-d982-c35f-78b8-965e94452903",
                         parent_uuid="185D10DB-2ADB-181A-AF87-E0708BA96AD9", user_tag=b"test layer") as w:
        w.write(0, b"x" * 8192)
        w.write(0, b"y" * 4096)  # a rewrite leaves dead data behind
        w.zero(1 << 20, 1 << 20)
        info = w.close()
    raw = path.read_bytes()
    assert info.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert info.size == len(raw) and info.path == str(path)
    assert (info.data_bytes, info.index_entries) == (12288, 3)
    with open_layer(path) as layer:
        assert info.lsmt_size == layer.size == 4096 + 12288 + 256 * 16 + 4096
        assert layer.uuid == "5CC26DB7-D982-C35F-78B8-965E94452903"
        assert layer.parent_uuid == "185D10DB-2ADB-181A-AF87-E0708BA96AD9"
        assert layer.header.user_tag == b"test layer"


def test_abort_and_exception_remove_the_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "partial.obd"
    w = LayerBlobWriter(path, virtual_size=1 << 30)
    w.write(0, os.urandom(4 << 20))
    assert path.exists()
    w.abort()
    assert not path.exists()
    with pytest.raises(RuntimeError), LayerBlobWriter(path, virtual_size=1 << 30) as w:
        w.write(0, os.urandom(1 << 20))
        raise RuntimeError("builder failed")
    assert not path.exists()
    with pytest.raises(FormatError, match=r"multiples of 512"), LayerBlobWriter(path, virtual_size=1 << 30) as w:
        w.write(100, b"x" * 512)
    assert not path.exists()


def test_clean_with_exit_commits(tmp_path: Path) -> None:
    path = tmp_path / "ok.obd"
    with LayerBlobWriter(path, virtual_size=1 << 30) as w:
        w.write(4096, b"z" * 4096)
    assert w.info is not None and w.info.size == path.stat().st_size
    with pytest.raises(FormatError, match=r"already finished"):
        w.close()


def test_bad_wrapper_name(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"wrapper"):
        LayerBlobWriter(tmp_path / "x", virtual_size=1 << 30, wrapper="zip")
    assert not (tmp_path / "x").exists()


def test_stack_rules_and_limits(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower.obd", tmp_path / "upper.obd"
    with LayerBlobWriter(lower, virtual_size=1 << 20) as w:
        w.write(0, b"L" * 16384)
    with LayerBlobWriter(upper, virtual_size=2 << 20) as w:
        w.zero(4096, 4096)  # masks lower data
        w.write(12288, b"U" * 4096)
    with StackedReader([lower, upper]) as stack:
        assert stack.virtual_size == 2 << 20  # topmost layer with a size
        assert stack.pread(0, 16384) == b"L" * 4096 + bytes(4096) + b"L" * 4096 + b"U" * 4096
        assert stack.pread(16384, 4096) == bytes(4096)  # nothing anywhere
        with pytest.raises(FormatError, match=r"aligned"):
            stack.pread(1, 512)
        with pytest.raises(FormatError, match=r"beyond virtual size"):
            stack.pread((2 << 20) - 512, 1024)
    with pytest.raises(FormatError, match=r"MAX_STACK_LAYERS"):
        StackedReader([lower] * 256)
    with pytest.raises(FormatError, match=r"at least one layer"):
        StackedReader([])


def test_sparse_materialisation(tmp_path: Path) -> None:
    path = tmp_path / "sparse.obd"
    with LayerBlobWriter(path, virtual_size=64 << 30) as w:
        w.write(10 << 30, os.urandom(1 << 20))
        w.write(20 << 30, bytes(1 << 20))  # mapped but all zero: stays a hole
    out = tmp_path / "disk.raw"
    with StackedReader([path]) as stack:
        stack.materialize(out)
    try:
        assert out.stat().st_size == 64 << 30
        assert out.stat().st_blocks * 512 <= 2 << 20
        with open(out, "rb") as f:
            f.seek(10 << 30)
            with open_layer(path) as layer:
                assert f.read(1 << 20) == layer.pread_data(4096, 1 << 20)
    finally:
        out.unlink()


def test_corrupt_lsmt_index_inside_our_blob(tmp_path: Path) -> None:
    """A flipped bit in the LSMT index of a bare (uncompressed) blob is named by entry."""
    path = tmp_path / "bare.obd"
    with LayerBlobWriter(path, virtual_size=1 << 30, compress=False, wrapper="pax") as w:
        w.write(0, b"a" * 4096)
        w.write(1 << 20, b"b" * 4096)
    raw = bytearray(path.read_bytes())
    with open_layer(path) as layer:
        index_at = 1536 + layer.trailer.index_offset
    raw[index_at + 17] = 0  # entry 1: LBA 0x800 becomes 0, inside entry 0
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"LSMT index entry 1 .*not sorted / overlaps entry 0"):
        open_layer(path)


def test_truncated_blob(tmp_path: Path) -> None:
    path = tmp_path / "t.obd"
    with LayerBlobWriter(path, virtual_size=1 << 30) as w:
        w.write(0, os.urandom(1 << 20))
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(FormatError, match=r"truncated tar"):
        open_layer(path)


@pytest.fixture(scope="module")
def fuzz_blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    path = tmp_path_factory.mktemp("fuzz") / "blob.obd"
    data = payload(7, 64) + os.urandom(8192)
    with LayerBlobWriter(path, virtual_size=VSIZE, workers=2) as w:
        w.write(0, data)
        w.zero(VSIZE // 2, 4096)
    return path.read_bytes(), data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_flipped_byte_gives_a_format_error_or_the_right_data(
        tmp_path: Path, fuzz_blob: tuple[bytes, bytes], position: float, xor: int) -> None:
    raw, data = fuzz_blob
    at = int(position * len(raw))
    damaged = bytearray(raw)
    damaged[at] ^= xor
    path = tmp_path / "damaged.obd"
    path.write_bytes(bytes(damaged))
    try:
        with StackedReader([path]) as stack:
            disk = stack.pread(0, VSIZE)
    except FormatError:
        return
    # the flip hit bytes no reader looks at (tar padding, the end-of-archive blocks, ...)
    assert disk[:len(data)] == data and disk[len(data):] == bytes(VSIZE - len(data))
