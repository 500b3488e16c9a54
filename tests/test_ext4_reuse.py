"""Continuing a filesystem read back from disk: lower layers converted before, and the official
mke2fs base layer (journal, uninit_bg) used when converting without --mkfs."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from converter.ext4 import ImageBuilder, RawDisk
from converter.formats.layer import LayerBlobWriter
from converter.formats.stack import StackedReader
from tests import ext4_judge as judge
from tests.test_ext4_build import DEBUGFS_FIELDS, VECTORS, VSIZE, torture_layers

BASE = VECTORS / "ext4_64.zfile"


def _blobs(tmp_path: Path, builder: ImageBuilder, layers: list[bytes], first: int, tag: str) -> list[str]:
    digests = []
    for k, layer in enumerate(layers, first):
        with LayerBlobWriter(tmp_path / f"{tag}{k}.obd", virtual_size=VSIZE) as writer:
            builder.apply_layer(io.BytesIO(layer), writer, label=str(k))
        digests.append(writer.info.digest)
    return digests


@pytest.mark.parametrize("split", [1, 2, 4])
def test_upper_layers_from_reloaded_lower_blobs_are_byte_identical(tmp_path: Path, split: int) -> None:
    layers = torture_layers()
    fresh = _blobs(tmp_path, ImageBuilder(VSIZE), layers, 0, "fresh")
    with StackedReader([tmp_path / f"fresh{k}.obd" for k in range(split)]) as lower:
        resumed = ImageBuilder.from_disk(lower)
    assert _blobs(tmp_path, resumed, layers[split:], split, "resumed") == fresh[split:]


@pytest.mark.skipif(not BASE.is_file(), reason="shared/vectors is not next to the checkout")
def test_layers_on_the_official_base_layer(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with StackedReader([BASE]) as base:
        base.materialize(disk)
    layers = torture_layers()
    with RawDisk(disk) as raw:
        builder = ImageBuilder.from_disk(raw)
        assert 8 in builder.fs.raw_inodes  # the journal inode, kept verbatim
        for layer in layers:
            builder.apply_layer(io.BytesIO(layer), raw)
    judge.e2fsck(disk)  # includes the uninit_bg descriptor checksums
    header = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, text=True, check=True).stdout
    assert "has_journal" in header and "uninit_bg" in header
    expected = judge.expected_tree(layers)
    judge.assert_same_tree(judge.debugfs_tree(disk), expected, fields=DEBUGFS_FIELDS)
    if judge.can_mount():
        with judge.mounted(disk) as root:
            actual = judge.kernel_tree(root)
            expected["/"].mtime_ns = actual["/"].mtime_ns  # mke2fs stamped the base's root in 2021
            judge.assert_same_tree(actual, expected)
