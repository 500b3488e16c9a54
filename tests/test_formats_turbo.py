"""TurboOCIv1 formats (turbooci reference §1–2): the meta layer (warp file) writer and reader, the
turboOCIv1.tar.gz archive, its annotations, turbo and mixed stacks, and the errors of §8 and the issue."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converter.cli import main
from converter.formats.common import SECTOR, FileView, FormatError
from converter.formats.gzindex import build_gzip_index
from converter.formats.layer import LayerBlobWriter
from converter.formats.lsmt import HT_SPACE, ZERO_UUID, LsmtLayer
from converter.formats.stack import StackedReader
from converter.formats.turbo import (
    GO_GZIP_HEADER,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    TurboLayerSpec,
    layer_media_type,
    open_turbo_layer,
    read_turbo_blob,
    target_media_type,
    turbo_annotations,
    turbo_target,
    ustar_header,
    write_turbo_blob,
)
from converter.formats.warp import MetaLayerWriter, merge_raw_index
from converter.formats.zfile import ZFileReader
from tests.formats_helpers import (
    REAL_LAYERS,
    REAL_TOOLS,
    VECTORS,
    debugfs_tree,
    e2fsck,
    needs_e2fsprogs,
    needs_vectors,
    read_tree_tsv,
)

TURBO = VECTORS / "turbooci"
DIGESTS = {1: "sha256:379565409868af41e53002f9a1a39f0410d41a58c821651daec49bd5925bf063",
           2: "sha256:114b26a5f2a0b9111eaee08a8629f646bf7eb35be554481637a08504102705d4",
           3: "sha256:46ae828842ef08debc624656f8bd6dba9812d43dfb522a2e3f95cc8415b40370"}
ORIGINALS = {1: REAL_TOOLS / "layer1.tar.gz", 2: REAL_TOOLS / "layer2.tar", 3: REAL_TOOLS / "layer3.tar.gz"}
DIFF_IDS = {1: "sha256:bd2be44b44e7b81b28f73f666a50ed9439a4da8d4696ce6dfa41c6494eddebc7",
            2: "sha256:c96d952be36d035003c803ec2fcd70a4025a9ef0764666f5d48757e0343e375f",
            3: "sha256:b13f5b432ba852fe52d32a61a505d758d1f89df72c5fe797dbbfef62fdaa674e"}
MiB = 1 << 20


def vector_spec(i: int, *, digest: bool = True) -> TurboLayerSpec:
    return TurboLayerSpec(meta=str(TURBO / f"layer{i}" / "turboOCIv1.tar.gz"), target=str(ORIGINALS[i]),
                          target_digest=DIGESTS[i] if digest else None)


def index_tsv(path: Path) -> list[tuple[int, ...]]:
    return [tuple(map(int, line.split("\t"))) for line in path.read_text().splitlines() if line[:1].isdigit()]


def open_meta_file(path: Path) -> LsmtLayer:
    view = FileView(path)
    zfile = ZFileReader(view)
    return LsmtLayer(zfile, zfile=zfile, warp=True, on_close=view.close)


# ----------------------------------------------------------------------------------------------------------
# The archive (§1.2) and descriptor (§1.3)


@needs_vectors
@pytest.mark.parametrize("i", [1, 2, 3])
def test_inner_tar_is_byte_identical_to_the_vectors(tmp_path: Path, i: int) -> None:
    layer = TURBO / f"layer{i}"
    index = (layer / "gzip.meta").read_bytes() if i != 2 else None
    info = write_turbo_blob(tmp_path / "turboOCIv1.tar.gz", layer / "ext4.fs.meta", index)
    ours = (tmp_path / "turboOCIv1.tar.gz").read_bytes()
    assert gzip.decompress(ours) == gzip.decompress((layer / "turboOCIv1.tar.gz").read_bytes())
    assert info.diff_id == DIFF_IDS[i] == "sha256:" + hashlib.sha256(gzip.decompress(ours)).hexdigest()
    assert info.digest == "sha256:" + hashlib.sha256(ours).hexdigest() and info.size == len(ours)
    assert ours[:10] == GO_GZIP_HEADER  # Go's gzip header; the deflate bytes are ours (documented)
    assert info.meta_size == (layer / "ext4.fs.meta").stat().st_size
    assert info.gzip_index_size == (None if index is None else len(index))


def test_ustar_header_is_go_archive_tar_shaped() -> None:
    header = ustar_header("gzip.meta", 405)
    assert header[100:108] == b"0000644\0" and header[124:136] == b"00000000625\0"
    assert header[329:345] == b"0000000\x000000000\0" and header[257:265] == b"ustar\x0000"
    info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")  # the checksum is valid
    assert (info.name, info.size, info.mode, info.mtime) == ("gzip.meta", 405, 0o644, 0)


@needs_vectors
@pytest.mark.parametrize("i", [1, 2, 3])
def test_read_turbo_blob_of_the_vectors(i: int) -> None:
    blob = read_turbo_blob(TURBO / f"layer{i}" / "turboOCIv1.tar.gz")
    try:
        assert blob.meta_name == "ext4.fs.meta" and blob.diff_id == DIFF_IDS[i]
        assert blob.meta.read() == (TURBO / f"layer{i}" / "ext4.fs.meta").read_bytes()
        expected = (TURBO / f"layer{i}" / "gzip.meta").read_bytes() if i != 2 else None
        assert blob.gzip_index == expected
    finally:
        blob.close()


@pytest.mark.parametrize(("members", "message"), [
    ([("ext4.fs.meta", b"x")], "needs at least"),
    ([(".turbo.ociv1", b""), ("ext4.fs.meta", b"x")], "unexpected turbo archive member '.turbo.ociv1' at position 1"),
    ([("ext4.fs.meta", b"x"), (".turbo.ociv1", b"1")], "must be empty"),
    ([("ext4.fs.meta", b"x"), (".turbo.ociv1", b""), ("evil", b"")], "unexpected turbo archive member 'evil'"),
])
def test_bad_archives_are_refused(tmp_path: Path, members: list[tuple[str, bytes]], message: str) -> None:
    tar = b"".join(ustar_header(name, len(data)) + data + bytes(-len(data) % 512) for name, data in members)
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(gzip.compress(tar + bytes(1024)))
    with pytest.raises(FormatError, match=message):
        read_turbo_blob(path)


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda tar: tar[:512 * 11 + 10] + b"X" + tar[512 * 11 + 11:], "member 2: tar header checksum mismatch"),
    (lambda tar: tar + b"junk" + bytes(508), "data after the turbo archive's end-of-archive block"),
    (lambda tar: tar[:512 * 11], "truncated in a member header"),
    (lambda tar: tar[:4000], "truncated in ext4.fs.meta"),
])
def test_damaged_inner_tar_is_an_error_not_an_early_end(tmp_path: Path, mangle: object, message: str) -> None:
    meta = tmp_path / "m"
    meta.write_bytes(b"m" * 5000)  # header + 10 blocks: the marker's header is block 11
    write_turbo_blob(tmp_path / "t.tar.gz", meta, b"index")
    tar = gzip.decompress((tmp_path / "t.tar.gz").read_bytes())
    (tmp_path / "bad.tar.gz").write_bytes(gzip.compress(mangle(tar)))  # type: ignore[operator]
    with pytest.raises(FormatError, match=message):
        read_turbo_blob(tmp_path / "bad.tar.gz")


def test_corrupt_and_non_gzip_archives_are_refused(tmp_path: Path) -> None:
    meta = tmp_path / "m"
    meta.write_bytes(b"m" * 5000)
    blob = tmp_path / "t.tar.gz"
    write_turbo_blob(blob, meta, None)
    data = blob.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(FormatError, match=r"corrupt turboOCIv1\.tar\.gz"):
        read_turbo_blob(tmp_path / "cut.tar.gz")
    with pytest.raises(FormatError, match="not gzip"):
        read_turbo_blob(meta)


@needs_vectors
@pytest.mark.parametrize(("flavour", "oci"), [("image-oci", True), ("image-docker", False)])
def test_descriptors_match_the_vector_manifests(flavour: str, oci: bool) -> None:
    manifest = json.loads((TURBO / flavour / "manifest.json").read_text())
    source = json.loads((TURBO / "source-manifest.json").read_text())
    for i, (layer, src) in enumerate(zip(manifest["layers"], source["layers"], strict=True), start=1):
        blob = TURBO / f"layer{i}" / "turboOCIv1.tar.gz"
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        compression = "gzip" if i != 2 else "none"
        assert layer["mediaType"] == layer_media_type(oci)
        annotations = turbo_annotations(digest, blob.stat().st_size, src["digest"],
                                        target_media_type(src["mediaType"], compression))
        assert json.dumps(annotations) == json.dumps(layer["annotations"])  # values and key order
        assert turbo_target(annotations) == (src["digest"], annotations[
            "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type"])


def test_target_media_type_follows_the_detected_compression() -> None:
    docker_gzip = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert target_media_type(docker_gzip, "gzip") == MEDIA_TYPE_DOCKER_LAYER_GZIP
    assert target_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip", "none") == \
        "application/vnd.docker.image.rootfs.diff.tar"
    assert target_media_type("application/vnd.oci.image.layer.v1.tar", "gzip") == \
        "application/vnd.oci.image.layer.v1.tar+gzip"
    with pytest.raises(FormatError, match="not zstd"):
        target_media_type("application/vnd.oci.image.layer.v1.tar+zstd", "zstd")
    assert turbo_target({"containerd.io/snapshot/overlaybd/fastoci/target-digest": "sha256:ab"}) == ("sha256:ab", "")
    assert turbo_target({"containerd.io/snapshot/overlaybd/blob-digest": "sha256:ab"}) is None


# ----------------------------------------------------------------------------------------------------------
# The meta layer (§2)


@needs_vectors
@pytest.mark.parametrize("name", ["layer1", "layer2", "layer3", "extra"])
def test_vector_meta_layers_read_back_with_their_index(name: str) -> None:
    with open_meta_file(TURBO / name / "ext4.fs.meta") as layer:
        entries = [(e.offset, e.length, e.moffset, int(e.zeroed), e.tag) for e in layer.iter_entries()]
        assert entries == index_tsv(TURBO / name / "index.tsv")
        assert layer.header.flags == 7 and layer.trailer.flags == 6 and layer.uuid == ZERO_UUID
        assert layer.size % SECTOR != 0  # the index is not padded


@needs_vectors
def test_meta_layer_opened_as_a_native_layer_fails_like_overlaybd() -> None:
    from converter.formats.stack import open_layer

    with pytest.raises(FormatError, match="outside the data section"):
        open_layer(TURBO / "layer1" / "ext4.fs.meta")


def test_writer_layout_and_index_rules(tmp_path: Path) -> None:
    path = tmp_path / "ext4.fs.meta"
    with MetaLayerWriter(path) as w:
        w.write(1024, b"S" * 1024)  # superblock: 512-granular writes are fine
        w.write(8 * 4096, b"B" * 4096)
        w.write(0, b"Z" * 512)
        w.map_remote(100 * 4096, 10_486_994, 15360)  # extra/x/big.bin: 16383 + 4100 sectors
        w.map_remote(30000 * 512, 5000, 6144)  # extra/x/f5000.bin: 10 sectors, the rest of the block unmapped
        w.write(100 * 4096 + 4096, b"M" * 4096)  # metadata written over a remote run wins
    info = w.info
    assert info is not None
    with open_meta_file(path) as layer:
        got = [(e.offset, e.length, e.moffset, e.tag) for e in layer.iter_entries()]
        # the big run was cut at 16383 before the metadata write punched its hole (as the RW index does)
        assert got == [(0, 1, 8, 0), (2, 2, 9, 0), (64, 8, 11, 0), (800, 8, 30, 1), (808, 8, 19, 0),
                       (816, 16367, 46, 1), (17183, 4100, 16413, 1), (30000, 10, 12, 1)]
        assert layer.size == info.lsmt_size == HT_SPACE + 19 * 512 + 8 * 16 + HT_SPACE
        assert (layer.header.flags, layer.trailer.flags, layer.header.version, layer.header.sub_version) == (7, 6, 1, 1)
        assert layer.uuid == layer.parent_uuid == ZERO_UUID and layer.virtual_size == 64 << 30
        assert layer.pread_data(8 * 512, 512) == b"Z" * 512 and layer.pread_data(9 * 512, 1024) == b"S" * 1024
    assert (info.tag0_entries, info.tag1_entries, info.tar_end) == (4, 4, (16413 + 4100) * 512)


def test_merge_follows_compress_raw_index() -> None:
    # same tag and contiguous: merged; another tag: not; a combined length of 16383 or more: not
    entries = [(0, 8, 8, False, 0), (8, 8, 16, False, 0), (16, 8, 100, False, 1), (24, 8, 108, False, 1),
               (32, 16380, 116, False, 1), (16412, 3, 16496, False, 1), (16415, 1, 3, False, 0),
               (16416, 2, 5, False, 1)]
    assert merge_raw_index(entries) == [(0, 16, 8, False, 0), (16, 16, 100, False, 1), (32, 16380, 116, False, 1),
                                        (16412, 3, 16496, False, 1), (16415, 1, 3, False, 0),
                                        (16416, 2, 5, False, 1)]


def test_writer_refuses_bad_calls_and_a_layer_without_metadata(tmp_path: Path) -> None:
    w = MetaLayerWriter(tmp_path / "m", virtual_size=1 << 30)
    with pytest.raises(FormatError, match="tar offset 100 is not a multiple of 512"):
        w.map_remote(0, 512, 100)
    with pytest.raises(FormatError, match="multiples of 512"):
        w.write(100, b"x" * 512)
    with pytest.raises(FormatError, match="beyond the virtual size"):
        w.map_remote(1 << 30, 512, 0)
    w.write(0, b"s" * 4096)
    w.map_remote(0, 4096, 512)  # overrides the only metadata
    with pytest.raises(FormatError, match=r"at least one tag-0 .* no metadata write survives"):
        w.close()
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())  # no spool or partial file left


def test_writer_abort_on_exception_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), MetaLayerWriter(tmp_path / "m") as w:
        w.write(0, b"x" * 4096)
        raise RuntimeError("builder failed")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------
# Round trip: random writes and maps over a native lower layer, original plain or gzip


# block 0 (the superblock) is written once and never mapped, as the ext4 builder does
OPS = st.lists(st.tuples(st.sampled_from(["write", "map", "zero"]), st.integers(1, 255), st.integers(1, 40),
                         st.integers(0, 2000)), min_size=1, max_size=40)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ops=OPS, seed=st.integers(0, 2**32 - 1), gz=st.booleans())
def test_mixed_stack_round_trip(tmp_path: Path, ops: list[tuple[str, int, int, int]], seed: int, gz: bool) -> None:
    """A native layer below a turbo layer: every sector reads as the model says (later calls win, unmapped
    sectors fall through to the native layer, zeroed ones read zeros, tag-1 sectors come from the tar)."""
    rng = random.Random(seed)
    vsize = 256 * 4096
    tar = rng.randbytes(2048 * SECTOR + 40 * 4096)
    lower = rng.randbytes(vsize)
    model = bytearray(lower)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        _mixed_case(work, ops, rng, vsize, tar, lower, model, gz)
    finally:
        shutil.rmtree(work)


def _mixed_case(work: Path, ops: list[tuple[str, int, int, int]], rng: random.Random, vsize: int, tar: bytes,
                lower: bytes, model: bytearray, gz: bool) -> None:
    with LayerBlobWriter(work / "lower.obd", virtual_size=vsize) as native:
        native.write(0, lower)
    with MetaLayerWriter(work / "ext4.fs.meta", virtual_size=vsize) as meta:
        meta.write(0, model[:4096])  # the builder always writes the superblock
        for kind, block, count, tar_sector in ops:
            off, n = block * 4096, min(count * 4096, vsize - block * 4096)
            if kind == "write":
                data = rng.randbytes(n)
                meta.write(off, data)
                model[off:off + n] = data
            elif kind == "zero":
                meta.zero(off, n)
                model[off:off + n] = bytes(n)
            else:
                size = n - rng.randrange(0, 4096) if n > 4096 else n  # a partial last block
                meta.map_remote(off, size, tar_sector * SECTOR)
                mapped = -(-size // SECTOR) * SECTOR
                model[off:off + mapped] = tar[tar_sector * SECTOR:tar_sector * SECTOR + mapped]
    original = work / ("layer.tar.gz" if gz else "layer.tar")
    original.write_bytes(gzip.compress(tar, 1) if gz else tar)
    index = build_gzip_index(str(original)) if gz else None
    write_turbo_blob(work / "turboOCIv1.tar.gz", work / "ext4.fs.meta", index)
    digest = "sha256:" + hashlib.sha256(original.read_bytes()).hexdigest()
    spec = TurboLayerSpec(meta=str(work / "turboOCIv1.tar.gz"), target=str(original), target_digest=digest)
    with StackedReader([work / "lower.obd", spec]) as stack:
        assert stack.virtual_size == vsize
        assert stack.pread(0, vsize) == bytes(model)
        raw = work / "disk.raw"
        stack.materialize(raw)
        assert raw.read_bytes() == bytes(model)


# ----------------------------------------------------------------------------------------------------------
# The vectors' turbo stack through our reader (§10 "Expected reads")


def _rdump(disk: Path, out: Path) -> Path:
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {out}", str(disk)], capture_output=True, check=True, timeout=300)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@needs_vectors
@needs_e2fsprogs
def test_vector_turbo_stack_is_clean_and_equals_the_native_stack(tmp_path: Path) -> None:
    turbo, native = tmp_path / "turbo.raw", tmp_path / "native.raw"
    specs = [vector_spec(1), vector_spec(2),  # a bare ext4.fs.meta with its gzip.meta works as well
             TurboLayerSpec(meta=str(TURBO / "layer3" / "ext4.fs.meta"), target=str(ORIGINALS[3]),
                            gzip_index=str(TURBO / "layer3" / "gzip.meta"), target_digest=DIGESTS[3])]
    with StackedReader(specs) as stack:
        assert [layer.warp for layer in stack.layers] == [True, True, True]
        stack.materialize(turbo)
    with StackedReader(REAL_LAYERS) as stack:
        stack.materialize(native)
    result = e2fsck(turbo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "238/4194304 files" in result.stdout and "267578/16777216 blocks" in result.stdout
    assert debugfs_tree(turbo) == read_tree_tsv(REAL_TOOLS / "tree.tsv")
    ours, theirs = _files(_rdump(turbo, tmp_path / "t")), _files(_rdump(native, tmp_path / "n"))
    assert len(ours) > 100 and ours == theirs


@needs_vectors
@needs_e2fsprogs
def test_vector_turbo_prefix_stack_layer1(tmp_path: Path) -> None:
    raw = tmp_path / "l1.raw"
    with StackedReader([vector_spec(1)]) as stack:
        stack.materialize(raw)
    result = e2fsck(raw)
    assert result.returncode == 0 and "341/4194304 files" in result.stdout and "266911/16777216" in result.stdout


@needs_vectors
@needs_e2fsprogs
def test_vector_extra_layer_equals_its_tar(tmp_path: Path) -> None:
    raw = tmp_path / "extra.raw"
    spec = TurboLayerSpec(meta=str(TURBO / "extra" / "turboOCIv1.tar.gz"), target=str(TURBO / "extra" / "layer.tar.gz"))
    with StackedReader([spec]) as stack:
        stack.materialize(raw)
    result = e2fsck(raw)
    assert result.returncode == 0 and "18/4194304 files" in result.stdout and "268840/16777216" in result.stdout
    expected: dict[str, bytes] = {}
    with tarfile.open(TURBO / "extra" / "layer.tar.gz") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                expected[member.name.lstrip("./")] = f.read()  # later copies (x/dup.txt) win
            elif member.islnk():
                expected[member.name.lstrip("./")] = expected[member.linkname.lstrip("./")]
    assert _files(_rdump(raw, tmp_path / "x")) == expected


# ----------------------------------------------------------------------------------------------------------
# Errors named by the issue


@needs_vectors
def test_changed_original_blob_is_refused(tmp_path: Path) -> None:
    changed = tmp_path / "layer2.tar"
    data = bytearray(ORIGINALS[2].read_bytes())
    data[5000] ^= 1
    changed.write_bytes(bytes(data))
    spec = TurboLayerSpec(meta=vector_spec(2).meta, target=str(changed), target_digest=DIGESTS[2])
    with pytest.raises(FormatError, match=r"has digest sha256:\w+, but the meta layer's turbo-oci/target-digest is "
                                          + DIGESTS[2]):
        open_turbo_layer(spec)


@needs_vectors
def test_wrong_gzip_original_is_refused_by_the_index(tmp_path: Path) -> None:
    spec = TurboLayerSpec(meta=vector_spec(1).meta, target=str(ORIGINALS[3]))  # no digest given: size check
    with pytest.raises(FormatError, match="gzip_file_size 206593 does not match the target blob"):
        open_turbo_layer(spec)


@needs_vectors
def test_truncated_gzip_index_is_refused(tmp_path: Path) -> None:
    index = (TURBO / "layer3" / "gzip.meta").read_bytes()
    spec = TurboLayerSpec(meta=str(TURBO / "layer3" / "ext4.fs.meta"), target=str(ORIGINALS[3]),
                          gzip_index=index[:-100])
    with pytest.raises(FormatError, match="gzip.meta: gzip index: index_file_size 66002 != file size 65902 "
                                          r"\(truncated\)"):
        open_turbo_layer(spec)
    missing = TurboLayerSpec(meta=str(TURBO / "layer3" / "ext4.fs.meta"), target=str(ORIGINALS[3]))
    with pytest.raises(FormatError, match=r"is gzip but there is no gzip\.meta"):
        open_turbo_layer(missing)


@needs_vectors
def test_tag1_range_past_the_end_of_the_tar_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "layer2.tar"
    short.write_bytes(ORIGINALS[2].read_bytes()[:10 * 1024])  # its last tag-1 range ends at 16896
    with pytest.raises(FormatError, match=r"reads up to tar byte \d+, past the end of the original layer's tar"):
        open_turbo_layer(TurboLayerSpec(meta=vector_spec(2).meta, target=str(short)))


def test_meta_layer_without_metadata_entries_is_refused(tmp_path: Path) -> None:
    from converter.formats.lsmt import TRAILER_FLAGS_COMMITTED, LsmtHeaderTrailer, pack_entry
    from converter.formats.zfile import ZFileWriter

    path = tmp_path / "ext4.fs.meta"
    index = pack_entry(0, 8, 3, False, 1)
    with open(path, "wb", buffering=0) as f:
        zf = ZFileWriter(f, workers=1)
        zf.write(LsmtHeaderTrailer(flags=7, index_offset=0, index_size=0, virtual_size=1 << 30).pack())
        zf.write(index)
        zf.write(LsmtHeaderTrailer(flags=TRAILER_FLAGS_COMMITTED, index_offset=HT_SPACE, index_size=1,
                                   virtual_size=1 << 30).pack())
        zf.close()
    with pytest.raises(FormatError, match=r"no tag-0 \(metadata\) entry"):
        open_meta_file(path)


@needs_vectors
def test_stack_refuses_a_meta_layer_without_its_original() -> None:
    layer = open_meta_file(TURBO / "layer2" / "ext4.fs.meta")
    with layer, pytest.raises(FormatError, match="without its original layer"):
        StackedReader([layer])


# ----------------------------------------------------------------------------------------------------------
# obd-convert inspect / dump


@needs_vectors
def test_cli_inspect_turbo_blob_alone_and_paired(capsys: pytest.CaptureFixture[str]) -> None:
    paired = f"{vector_spec(3).meta}={ORIGINALS[3]}@{DIGESTS[3]}"
    assert main(["inspect", vector_spec(1).meta, paired]) == 0
    alone, pair = json.loads(capsys.readouterr().out)
    assert alone["ok"] and alone["turbo"]["diff_id"] == DIFF_IDS[1]
    assert [m["name"] for m in alone["turbo"]["members"]] == ["ext4.fs.meta", ".turbo.ociv1", "gzip.meta"]
    assert alone["lsmt"]["index"]["tag0_entries"] == 532 and alone["lsmt"]["index"]["tag1_entries"] == 314
    assert [c["de_pos"] for c in pair["turbo"]["gzip_index"]["checkpoints"]] == [0, 1036089, 2085159]
    assert pair["ok"] and pair["lsmt"]["index"]["tar_size"] == 3153920
    assert "every tag-1 range inside the original tar" in pair["checks_passed"]


@needs_vectors
def test_cli_inspect_reports_a_digest_mismatch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", f"{vector_spec(3).meta}={ORIGINALS[1]}@{DIGESTS[3]}"]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert not report["ok"] and "turbo-oci/target-digest" in report["error"]


@needs_vectors
def test_cli_digest_implied_by_an_oci_layout_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    wrong = blobs / ("0" * 64)
    shutil.copy(ORIGINALS[2], wrong)
    assert main(["inspect", f"{vector_spec(2).meta}={wrong}"]) == 1
    assert "wrong or changed original blob" in json.loads(capsys.readouterr().out)[0]["error"]
    right = blobs / DIGESTS[2].removeprefix("sha256:")
    shutil.copy(ORIGINALS[2], right)
    assert main(["inspect", f"{vector_spec(2).meta}={right}"]) == 0


@needs_vectors
@needs_e2fsprogs
def test_cli_dump_turbo_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.raw"
    args = [f"{vector_spec(i).meta}={ORIGINALS[i]}" for i in (1, 2, 3)]
    assert main(["dump", "-o", str(raw), *args]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 3
    assert e2fsck(raw).returncode == 0
    assert main(["dump", "-o", str(raw), f"{vector_spec(1).meta}=/nonexistent"]) == 1
    assert "not META=ORIGINAL with both files present" in capsys.readouterr().err


@needs_vectors
@pytest.mark.parametrize("i", [1, 2, 3])
def test_erofs_variant_archives_and_meta_layers_read(i: int) -> None:
    """The --fstype erofs set (TURBO §7): same archive (member erofs.fs.meta) and warp container."""
    layer = TURBO / "erofs" / f"layer{i}"
    blob = read_turbo_blob(layer / "turboOCIv1.tar.gz")
    try:
        assert blob.meta_name == "erofs.fs.meta" and blob.meta.read() == (layer / "erofs.fs.meta").read_bytes()
        expected_index = (TURBO / f"layer{i}" / "gzip.meta").read_bytes() if i != 2 else None
        assert blob.gzip_index == expected_index  # identical to the ext4 set's
    finally:
        blob.close()
    spec = TurboLayerSpec(meta=str(layer / "turboOCIv1.tar.gz"), target=str(ORIGINALS[i]), target_digest=DIGESTS[i])
    with open_turbo_layer(spec) as meta:
        entries = [(e.offset, e.length, e.moffset, int(e.zeroed), e.tag) for e in meta.iter_entries()]
        assert entries == index_tsv(layer / "index.tsv")


@needs_vectors
def test_cli_inspect_bare_meta_layer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["inspect", str(TURBO / "extra" / "ext4.fs.meta")]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["turbo"] == {"bare_meta": True} and report["lsmt"]["index"]["tag1_entries"] == 7
    broken = tmp_path / "broken.obd"
    broken.write_bytes((TURBO / "extra" / "ext4.fs.meta").read_bytes()[:5000])
    assert main(["inspect", str(broken)]) == 1  # neither a native layer nor a meta layer: the native error
    assert json.loads(capsys.readouterr().out)[0]["ok"] is False


@needs_vectors
def test_cli_inspect_gzip_index_alone(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["inspect", str(TURBO / "extra" / "gzip.meta")]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert [(c["de_pos"], c["bits"]) for c in report["gzip_index"]["checkpoints"]] == [
        (0, 0), (891564, 6), (2927627, 3), (4964762, 0), (7003152, 1)]
    cut = tmp_path / "gzip.meta"
    cut.write_bytes((TURBO / "extra" / "gzip.meta").read_bytes()[:-10])
    assert main(["inspect", str(cut)]) == 1
    assert "truncated" in json.loads(capsys.readouterr().out)[0]["error"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=st.binary(max_size=5000), index=st.one_of(st.none(), st.binary(max_size=3000)),
       erofs=st.booleans())
def test_archive_round_trip(tmp_path: Path, meta: bytes, index: bytes | None, erofs: bool) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        (work / "meta").write_bytes(meta)
        name = "erofs.fs.meta" if erofs else "ext4.fs.meta"
        info = write_turbo_blob(work / "t.tar.gz", work / "meta", index, meta_name=name)
        inner = gzip.decompress((work / "t.tar.gz").read_bytes())
        assert len(inner) % 512 == 0 and inner.endswith(bytes(1024))
        assert info.diff_id == "sha256:" + hashlib.sha256(inner).hexdigest()
        blob = read_turbo_blob(work / "t.tar.gz")
        try:
            assert (blob.meta_name, blob.meta.read(), blob.gzip_index, blob.diff_id) == (name, meta, index,
                                                                                       info.diff_id)
        finally:
            blob.close()
        with tarfile.open(work / "t.tar.gz") as tar:  # any tar reader agrees on the members
            assert tar.getnames() == [name, ".turbo.ociv1"] + (["gzip.meta"] if index is not None else [])
    finally:
        shutil.rmtree(work)
