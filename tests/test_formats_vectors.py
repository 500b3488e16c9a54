"""Our readers and writers against the real data: the official ext4_64 base layer and the blobs made by the
real overlaybd tools (reference §5). Materialised disks are 64 GiB sparse files under tmp_path."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from converter.formats.common import FormatError
from converter.formats.layer import LayerBlobWriter, wrap_blob
from converter.formats.lsmt import HT_SPACE, INDEX_ALIGN_ENTRIES, SECTOR
from converter.formats.stack import StackedReader, open_layer
from converter.formats.tarwrap import PAX_DATA_OFFSET, TAR_BLOCK
from converter.formats.zfile import ZF_HT_SPACE, ZFileHeaderTrailer, compute_digest
from tests.formats_helpers import (
    BASE_ZFILE,
    REAL_LAYERS,
    REAL_TOOLS,
    allocated_bytes,
    debugfs_tree,
    e2fsck,
    needs_e2fsprogs,
    needs_vectors,
    read_tree_tsv,
)

pytestmark = needs_vectors

GiB = 1 << 30
REAL_UUIDS = ["185D10DB-2ADB-181A-AF87-E0708BA96AD9", "5CC26DB7-D982-C35F-78B8-965E94452903",
              "34C46A89-BF1E-BA26-F415-914EBD832669"]


def test_base_layer_headers_use_trailer_fallback_and_match_reference() -> None:
    with open_layer(BASE_ZFILE) as layer:
        assert layer.wrapper.form == "none"
        zf = layer.zfile
        assert zf.info_source == "trailer"  # header is garbage with the digest flag clear
        assert not zf.header.flags >> 4 & 1
        info = zf.info
        assert (info.index_offset, info.index_size, info.original_file_size) == (4207947, 132309, 541937664)
        assert (info.block_size, info.algo, info.verify) == (4096, 1, 1)
        h, t = layer.header, layer.trailer
        assert (h.size, h.flags, h.index_offset, h.index_size, h.virtual_size) == (390, 7, 0, 0, 64 * GiB)
        assert h.uuid == "C02FB491-B4D4-4904-8684-A014D032AF78"
        assert h.parent_uuid == "00000000-0000-0000-0000-000000000000"
        assert (h.version, h.sub_version) == (1, 1)
        assert (t.size, t.flags, t.index_offset, t.index_size) == (390, 6, 541798400, 8448)
        assert len(layer) == 8323 and layer.padding_entries == 125
        entries = list(layer.iter_entries())
        first = [(e.offset, e.length, e.zeroed, e.moffset) for e in entries[:7]]
        assert first == [(0, 8272, False, 8), (8272, 120, True, 8280), (8392, 8, False, 8280),
                         (8400, 120, True, 8288), (8520, 8, False, 8288), (8528, 7855, True, 8296),
                         (16383, 16383, True, 8296)]
        data = [e for e in entries if not e.zeroed]
        assert len(data) == 114 and len(entries) - len(data) == 8209
        assert sum(e.length for e in data) * SECTOR == 541794304
        assert sum(e.length for e in entries) == 134217728  # covers the whole 64 GiB


def test_base_layer_every_block_crc() -> None:
    with open_layer(BASE_ZFILE) as layer:
        assert layer.zfile.verify_all_blocks() == 132309


@needs_e2fsprogs
def test_base_layer_materialises_to_a_clean_sparse_ext4(tmp_path: Path) -> None:
    raw = tmp_path / "base.raw"
    with StackedReader([BASE_ZFILE]) as stack:
        assert stack.virtual_size == 64 * GiB
        stack.materialize(raw)
    try:
        assert raw.stat().st_size == 64 * GiB
        assert allocated_bytes(raw) < 600 << 20  # only the 541 MB of mapped data at most, never 64 GiB
        result = e2fsck(raw)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "11/4194304 files" in result.stdout and "407675/16777216 blocks" in result.stdout
    finally:
        raw.unlink()


@needs_e2fsprogs
def test_real_tools_stack_materialises_to_the_recorded_tree(tmp_path: Path) -> None:
    raw = tmp_path / "stack.raw"
    with StackedReader(REAL_LAYERS) as stack:
        assert [layer.uuid for layer in stack.layers] == REAL_UUIDS
        assert [layer.parent_uuid for layer in stack.layers] == ["00000000-0000-0000-0000-000000000000",
                                                                 *REAL_UUIDS[:2]]
        stack.materialize(raw)
    try:
        result = e2fsck(raw)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "238/4194304 files" in result.stdout and "267578/16777216 blocks" in result.stdout
        assert debugfs_tree(raw) == read_tree_tsv(REAL_TOOLS / "tree.tsv")
    finally:
        raw.unlink()


def test_real_blob_digests_match_readme() -> None:
    prefixes = ["086681363bafe8c1", "4a7a576c3d049a1f", "2f869efd66033538"]
    for path, prefix in zip(REAL_LAYERS, prefixes, strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(prefix)


def _rewrite_through_our_writer(src: Path, dst: Path, uuid: str, parent: str | None) -> None:
    """Copy a real layer's mappings (data in reverse LBA order, to exercise free data order) into our blob."""
    with open_layer(src) as layer, LayerBlobWriter(dst, virtual_size=layer.virtual_size, uuid=uuid.lower(),
                                                   parent_uuid=parent, workers=2) as writer:
        for e in reversed(list(layer.iter_entries())):
            if e.zeroed:
                writer.zero(e.offset * SECTOR, e.length * SECTOR)
            else:
                writer.write(e.offset * SECTOR, layer.pread_data(e.moffset * SECTOR, e.length * SECTOR))


def test_our_blobs_match_real_blobs_field_by_field(tmp_path: Path) -> None:
    ours = [tmp_path / f"ours{i}.obd" for i in (1, 2, 3)]
    for i, (src, dst) in enumerate(zip(REAL_LAYERS, ours, strict=True)):
        _rewrite_through_our_writer(src, dst, REAL_UUIDS[i], REAL_UUIDS[i - 1] if i else None)
    for real_path, our_path in zip(REAL_LAYERS, ours, strict=True):
        real_raw, our_raw = real_path.read_bytes(), our_path.read_bytes()
        with open_layer(real_path) as real, open_layer(our_path) as our:
            # tar: PAX form, payload at 1536, identical member header block, same PAX keys, same tail layout
            assert (our.wrapper.form, our.wrapper.data_offset) == (real.wrapper.form, real.wrapper.data_offset)
            assert our.wrapper.data_offset == PAX_DATA_OFFSET
            assert our_raw[2 * TAR_BLOCK:3 * TAR_BLOCK] == real_raw[2 * TAR_BLOCK:3 * TAR_BLOCK]
            assert our.wrapper.pax_records.keys() == real.wrapper.pax_records.keys() == {"size"}
            assert our.wrapper.member_name == real.wrapper.member_name == "overlaybd.commit"
            for raw, layer in ((real_raw, real), (our_raw, our)):
                end = layer.wrapper.data_offset + layer.wrapper.payload_size
                assert len(raw) == -(-end // TAR_BLOCK) * TAR_BLOCK + 2 * TAR_BLOCK
                assert not any(raw[end:])
            # ZFile: same options, header 0x1B with digest, trailer 0x16 with digest, same info in both
            for raw, layer in ((real_raw, real), (our_raw, our)):
                payload_end = layer.wrapper.data_offset + layer.wrapper.payload_size
                trailer_raw = raw[payload_end - ZF_HT_SPACE:payload_end]
                trailer = ZFileHeaderTrailer.unpack(trailer_raw)
                assert trailer.flags == 0x16 and trailer.digest == compute_digest(trailer_raw)
                header = layer.zfile.header
                assert header.flags == 0x1B and layer.zfile.info_source == "header"
                for name in ("index_offset", "index_size", "original_file_size", "index_crc"):
                    assert getattr(trailer, name) == getattr(header, name)
            for name in ("size", "block_size", "algo", "level", "use_dict", "dict_size", "verify",
                         "reserved", "padding", "reserved2"):
                assert getattr(our.zfile.header, name) == getattr(real.zfile.header, name), name
            # LSMT: flags, struct size, versions, UUIDs, virtual size, padded index, data from byte 4096
            for name in ("flags", "size", "version", "sub_version", "virtual_size", "uuid", "parent_uuid",
                         "index_offset", "index_size", "user_tag"):
                assert getattr(our.header, name) == getattr(real.header, name), name
            for name in ("flags", "size", "version", "sub_version", "virtual_size", "uuid", "parent_uuid"):
                assert getattr(our.trailer, name) == getattr(real.trailer, name), name
            assert our.trailer.index_size % INDEX_ALIGN_ENTRIES == 0
            assert our.trailer.index_offset == our.size - HT_SPACE - 16 * our.trailer.index_size
            assert our.size == our.zfile.size
            # the same mappings after coalescing, and the same bytes behind them
            assert [(e.offset, e.length, e.zeroed) for e in our.iter_entries()] == \
                [(e.offset, e.length, e.zeroed) for e in real.iter_entries()]


@needs_e2fsprogs
def test_restacked_copies_of_real_layers_give_the_same_disk(tmp_path: Path) -> None:
    ours = [tmp_path / f"ours{i}.obd" for i in (1, 2, 3)]
    for i, (src, dst) in enumerate(zip(REAL_LAYERS, ours, strict=True)):
        _rewrite_through_our_writer(src, dst, REAL_UUIDS[i], REAL_UUIDS[i - 1] if i else None)
    with StackedReader(REAL_LAYERS) as real, StackedReader(ours) as our:
        real_map = [(off, n, layer is None) for off, n, layer, _ in real.extents()]
        assert [(off, n, layer is None) for off, n, layer, _ in our.extents()] == real_map
        for off, n, zeroed in real_map:
            if not zeroed:
                assert our.pread(off, n) == real.pread(off, n), f"data differs at {off}"
        raw = tmp_path / "ours.raw"
        our.materialize(raw)
    try:
        result = e2fsck(raw)
        assert result.returncode == 0, result.stdout + result.stderr
        assert debugfs_tree(raw) == read_tree_tsv(REAL_TOOLS / "tree.tsv")
    finally:
        raw.unlink()


@pytest.mark.parametrize("name", ["mkfs-only.obd.commit"])
def test_mkfs_only_blob_opens(name: str) -> None:
    with open_layer(REAL_TOOLS / name) as layer:
        assert layer.header.flags == 7 and layer.trailer.flags == 6
        assert layer.zfile.verify_all_blocks() == layer.zfile.blocks


def test_wrap_base_layer_like_the_convertor(tmp_path: Path) -> None:
    dst = tmp_path / "base.tar"
    info = wrap_blob(BASE_ZFILE, dst)
    raw = dst.read_bytes()
    assert info.digest == "sha256:" + hashlib.sha256(raw).hexdigest() and info.size == len(raw)
    assert raw[512:512 + BASE_ZFILE.stat().st_size] == BASE_ZFILE.read_bytes()
    assert (info.lsmt_size, info.data_bytes, info.index_entries) == (541937664, 541794304, 8323)
    with tarfile.open(dst) as tf:
        (member,) = tf.getmembers()
        assert (member.name, member.mode, member.size, member.mtime) == \
            ("overlaybd.commit", 0o444, BASE_ZFILE.stat().st_size, 0)
    with open_layer(dst) as layer:
        assert (layer.wrapper.form, layer.wrapper.data_offset) == ("ustar", 512)
        assert layer.uuid == "C02FB491-B4D4-4904-8684-A014D032AF78"
    with pytest.raises(FormatError, match="already tar-wrapped"):
        wrap_blob(dst, tmp_path / "twice.tar")
    assert not (tmp_path / "twice.tar").exists()
