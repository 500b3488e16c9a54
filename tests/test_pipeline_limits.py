"""Issue 14 items 7 and 15: images overlaybd cannot open (more than 255 layers, 254 with --mkfs=false) are
refused before anything is pushed, and a failed conversion into a new `oci:` layout leaves no layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converter.errors import ImageError, PermanentError
from converter.formats.stack import StackedReader
from converter.pipeline import LayerConversionError, convert
from tests.harness import layers as L
from tests.harness import oci
from tests.test_pipeline_errors import GOOD_TAR, TAR, opts, write_layout
from tests.test_pipeline_registry import BASE

REPOS = Path("storage") / "docker" / "registry" / "v2" / "repositories"


def many_layers(root: Path, count: int) -> Path:
    tars = [L.make_tar([L.file(f"f{k}", b"%d" % k)]) for k in range(count)]
    return write_layout(root, [(t, TAR) for t in tars], [oci.sha256(t) for t in tars])


def wrap_in_index(root: Path, *extra_children: Path) -> None:
    """Turn the layout's tagged image (and those of other layouts, blobs copied) into an index tagged v1."""
    children = []
    for k, layout in enumerate([root, *extra_children]):
        entry = json.loads((layout / "index.json").read_bytes())["manifests"][0]
        if layout != root:
            for blob in (layout / "blobs" / "sha256").iterdir():
                (root / "blobs" / "sha256" / blob.name).write_bytes(blob.read_bytes())
        children.append({"mediaType": oci.OCI_MANIFEST, "digest": entry["digest"], "size": entry["size"],
                         "platform": {"os": "linux", "architecture": ["amd64", "arm64"][k]}})
    index = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": children})
    digest = oci.sha256(index)
    (root / "blobs" / "sha256" / digest[7:]).write_bytes(index)
    (root / "index.json").write_bytes(oci.canonical_json({"schemaVersion": 2, "manifests": [
        {"mediaType": oci.OCI_INDEX, "digest": digest, "size": len(index), "annotations": {oci.REF_NAME: "v1"}}]}))


def registry_opts(tmp_path: Path, **extra) -> dict:
    return opts(tmp_path, registry={"plain_http": True}, **extra)


def test_256_layers_are_refused_before_anything_is_pushed(registry, tmp_path: Path) -> None:
    src = many_layers(tmp_path / "src", 256)
    with pytest.raises(ImageError, match=r"256 layers, but overlaybd stacks at most 255, so at most 255 may come"):
        convert(f"oci:{src}:v1", f"{registry.host}/many:v1_obd", registry_opts(tmp_path))
    assert not (registry.workdir / REPOS / "many").exists(), "something was pushed"


@pytest.mark.skipif(not BASE.is_file(), reason="shared/vectors is not next to the checkout")
def test_255_layers_with_mkfs_false_are_refused_before_the_base_layer_is_pushed(registry, tmp_path: Path) -> None:
    src = many_layers(tmp_path / "src", 255)
    with pytest.raises(ImageError, match=r"255 layers, but overlaybd stacks at most 255 \(--mkfs=false adds the "
                                         r"base layer\), so at most 254 may come from the image") as err:
        convert(f"oci:{src}:v1", f"{registry.host}/based:v1_obd",
                registry_opts(tmp_path, mkfs=False, base_layer=str(BASE)))
    assert isinstance(err.value, PermanentError)
    assert not (registry.workdir / REPOS / "based").exists(), "the base layer was pushed"


def test_one_child_over_the_limit_refuses_the_whole_index_before_any_push(registry, tmp_path: Path) -> None:
    src = many_layers(tmp_path / "src", 2)
    wrap_in_index(src, many_layers(tmp_path / "big", 256))
    with pytest.raises(ImageError, match=r"\[linux/arm64\]: 256 layers"):
        convert(f"oci:{src}:v1", f"{registry.host}/multi:v1_obd", registry_opts(tmp_path))
    assert not (registry.workdir / REPOS / "multi").exists(), "the good child was pushed"


def test_255_layers_convert_and_stack(tmp_path: Path) -> None:
    src = many_layers(tmp_path / "src", 255)
    out = tmp_path / "out"
    result = convert(f"oci:{src}:v1", f"oci:{out}:v1_obd", opts(tmp_path))
    assert result.layers_converted == 255
    manifest = json.loads((out / "blobs" / "sha256" / result.target_digest[7:]).read_bytes())
    paths = [str(out / "blobs" / "sha256" / layer["digest"][7:]) for layer in manifest["layers"]]
    with StackedReader(paths) as disk:  # the limit is exact: overlaybd's reader opens all 255
        assert disk.pread(1024, 1024)[56:58] == b"\x53\xef"  # the ext4 superblock magic


def test_failed_conversion_into_a_new_layout_leaves_nothing(tmp_path: Path) -> None:
    corrupt = b"\x1f\x8b" + bytes(200)  # a gzip header and garbage
    src = write_layout(tmp_path / "src", [(GOOD_TAR, TAR), (corrupt, oci.LAYER_TYPES["oci"]["gzip"])],
                       [oci.sha256(GOOD_TAR), oci.sha256(b"x")])
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(LayerConversionError):
        convert(f"oci:{src}:v1", f"oci:{out}:v1_obd", opts(tmp_path))
    assert not (tmp_path / "new").exists(), "a layout (or its parent) was left behind"


def test_failed_conversion_never_removes_a_pre_existing_layout(tmp_path: Path) -> None:
    good = write_layout(tmp_path / "good", [(GOOD_TAR, TAR)], [oci.sha256(GOOD_TAR)])
    out = tmp_path / "out"
    convert(f"oci:{good}:v1", f"oci:{out}:v1_obd", opts(tmp_path))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    bad = write_layout(tmp_path / "bad", [(b"\x1f\x8b" + bytes(200), oci.LAYER_TYPES["oci"]["gzip"])],
                       [oci.sha256(b"x")])
    with pytest.raises(LayerConversionError):
        convert(f"oci:{bad}:v1", f"oci:{out}:v2_obd", opts(tmp_path))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayerConversionError):
        convert(f"oci:{bad}:v1", f"oci:{empty}:v1_obd", opts(tmp_path))
    assert empty.is_dir(), "a directory the user made was removed"
