"""Bad input and failing registries: a clean error naming the manifest or layer, and no tag pointing anywhere."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import pytest

from converter.errors import PermanentError, TransientError
from converter.image import NotAnImageError
from converter.pipeline import ConversionAborted, LayerConversionError, convert
from converter.registry import AuthError, NotFoundError, UnsupportedManifestError
from tests.harness import layers as L
from tests.harness import oci
from tests.harness.faultproxy import FaultProxy
from tests.registry_helpers import client_for
from tests.test_pipeline_registry import VSIZE_GIB, app_image

GOOD_TAR = L.make_tar([L.file("a", b"a" * 5000)])
SECOND_TAR = L.make_tar([L.file("b", b"b" * 5000), L.dir("d")])


def write_layout(root: Path, layers: list[tuple[bytes, str]], diff_ids: list[str], *, name: str = "v1",
                 config_type: str = oci.OCI_CONFIG, config: dict | None = None) -> Path:
    """An OCI layout whose blobs are exactly the given bytes (so they can be corrupt on purpose)."""
    writer = oci._Writer(root, "oci")
    descs = [writer.put(media_type, blob) for blob, media_type in layers]
    config_body = config or {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_desc = writer.put(config_type, oci.canonical_json(config_body))
    manifest = writer.put(oci.OCI_MANIFEST, oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                                                                "config": config_desc, "layers": descs}))
    (root / "index.json").write_bytes(oci.canonical_json(
        {"schemaVersion": 2, "manifests": [{**manifest, "annotations": {oci.REF_NAME: name}}]}))
    return root


def opts(tmp_path: Path, **extra) -> dict:
    return {"vsize": VSIZE_GIB, "cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path), **extra}


def layout_tags(root: Path) -> list[str]:
    index = root / "index.json"
    if not index.exists():
        return []
    return [m["annotations"][oci.REF_NAME] for m in json.loads(index.read_bytes())["manifests"]]


GZ = oci.LAYER_TYPES["oci"]["gzip"]
TAR = oci.LAYER_TYPES["oci"]["none"]


def test_corrupt_gzip_layer_names_the_layer_and_tags_nothing(tmp_path: Path) -> None:
    corrupt = gzip.compress(SECOND_TAR)
    corrupt = corrupt[:20] + bytes(b ^ 0x55 for b in corrupt[20:60]) + corrupt[60:]
    src = write_layout(tmp_path / "src", [(gzip.compress(GOOD_TAR), GZ), (corrupt, GZ)],
                       [oci.sha256(GOOD_TAR), oci.sha256(SECOND_TAR)])
    with pytest.raises(LayerConversionError) as err:
        convert(f"oci:{src}:v1", f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path))
    assert isinstance(err.value, PermanentError)
    assert err.value.layer.startswith("2 (sha256:") and "layer 2" in str(err.value)
    assert layout_tags(tmp_path / "out") == []
    assert not list(tmp_path.glob("obd-convert-*")), "the temp dir was not cleaned up"


def test_layer_whose_digest_does_not_match(tmp_path: Path) -> None:
    src = write_layout(tmp_path / "src", [(GOOD_TAR, TAR), (SECOND_TAR, TAR)],
                       [oci.sha256(GOOD_TAR), oci.sha256(SECOND_TAR)])
    blob = src / "blobs" / "sha256" / oci.sha256(SECOND_TAR)[7:]
    blob.write_bytes(SECOND_TAR[:-1024] + bytes(1024 - 1) + b"\1")  # same size, different bytes
    with pytest.raises(LayerConversionError, match=r"layer 2 \(sha256:[0-9a-f]{64}\): .*has digest"):
        convert(f"oci:{src}:v1", f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path))
    assert layout_tags(tmp_path / "out") == []


def test_diff_id_that_does_not_match_the_config(tmp_path: Path) -> None:
    src = write_layout(tmp_path / "src", [(GOOD_TAR, TAR), (SECOND_TAR, TAR)],
                       [oci.sha256(GOOD_TAR), oci.sha256(b"something else")])
    with pytest.raises(LayerConversionError, match=r"layer 2 .*rootfs.diff_ids\[1\]"):
        convert(f"oci:{src}:v1", f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path))
    assert layout_tags(tmp_path / "out") == []


@pytest.mark.parametrize(("config_type", "layer_type", "match"), [
    ("application/vnd.cncf.helm.config.v1+json", "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
     "not a container image"),
    (oci.OCI_CONFIG, "application/vnd.dev.cosign.simplesigning.v1+json", "not a container filesystem layer"),
])
def test_artifacts_are_refused(tmp_path: Path, config_type: str, layer_type: str, match: str) -> None:
    src = write_layout(tmp_path / "src", [(b"{}", layer_type)], [oci.sha256(b"{}")], config_type=config_type)
    with pytest.raises(NotAnImageError, match=match):
        convert(f"oci:{src}:v1", f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path))


def test_converted_image_is_refused_as_input(tmp_path: Path) -> None:
    src = write_layout(tmp_path / "src", [(GOOD_TAR, TAR)], [oci.sha256(GOOD_TAR)])
    convert(f"oci:{src}:v1", f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path))
    with pytest.raises(NotAnImageError, match="already in overlaybd format"):
        convert(f"oci:{tmp_path / 'out'}:v1_obd", f"oci:{tmp_path / 'out2'}:again", opts(tmp_path))


def test_schema1_manifest_is_refused(registry, tmp_path: Path) -> None:
    proxy = FaultProxy(int(registry.host.rsplit(":", 1)[1])).start()
    try:
        schema1 = json.dumps({"schemaVersion": 1, "name": "old", "tag": "v1", "fsLayers": []}).encode()
        proxy.add("respond", method="GET", path="/manifests/v1$", status=200, times=10, body=schema1,
                  headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"})
        with pytest.raises(UnsupportedManifestError, match="schema 1"):
            convert(f"{proxy.host}/old:v1", f"{proxy.host}/old:v1_obd",
                    opts(tmp_path, registry={"plain_http": True}))
    finally:
        proxy.stop()


def test_missing_blob_fails_cleanly(registry, oci_image_builder, push_image, tmp_path: Path) -> None:
    built = oci_image_builder(app_image())
    push_image(built, registry, "gone:v1")
    layer = json.loads(built.raw)["layers"][1]["digest"][7:]
    (registry.workdir / "storage" / "docker" / "registry" / "v2" / "blobs" / "sha256" / layer[:2] / layer
     / "data").unlink()
    with pytest.raises(NotFoundError, match=rf"^layer 2 \(sha256:{layer}\): GET .*HTTP 404"):
        convert(f"{registry.host}/gone:v1", f"{registry.host}/gone:v1_obd",
                opts(tmp_path, registry={"plain_http": True}))
    assert client_for(registry).list_tags("gone") == ["v1"]


def test_registry_failing_mid_push(registry, oci_image_builder, push_image, tmp_path: Path) -> None:
    built = oci_image_builder(app_image())
    push_image(built, registry, "flaky:v1")
    proxy = FaultProxy(int(registry.host.rsplit(":", 1)[1])).start()
    try:
        target = f"{proxy.host}/flaky:v1_obd"
        options = opts(tmp_path, registry={"plain_http": True})
        # transient faults on the blob upload are retried and the conversion succeeds
        proxy.add("status", method="POST", path="/blobs/uploads/", status=503, times=1)
        proxy.add("status", method="PUT", path="/blobs/uploads/", status=500, times=1)
        proxy.add("drop_request", method="PUT", path="/blobs/uploads/", times=1)
        first = convert(f"{proxy.host}/flaky:v1", target, options)
        assert first.layers_converted == 2
        assert [e for e in proxy.log if e[0] == "PUT" and "/blobs/uploads/" in e[1]]
        # the tag push is refused for good: the blobs and child data are there, the tag is not
        proxy.add("status", method="PUT", path="/manifests/v2_obd$", status=403, times=5)
        with pytest.raises(AuthError):
            convert(f"{proxy.host}/flaky:v1", f"{proxy.host}/flaky:v2_obd", {**options, "force": True})
        assert sorted(client_for(registry).list_tags("flaky")) == ["v1", "v1_obd"]
    finally:
        proxy.stop()


def test_cancel_aborts_between_layers_without_tagging(tmp_path: Path) -> None:
    src = write_layout(tmp_path / "src", [(GOOD_TAR, TAR), (SECOND_TAR, TAR)],
                       [oci.sha256(GOOD_TAR), oci.sha256(SECOND_TAR)])
    cancel = threading.Event()

    def progress(event: str, data: dict) -> None:
        if event == "layer_done" and data["index"] == 0:
            cancel.set()  # what the CLI's SIGINT/SIGTERM handler does

    with pytest.raises(ConversionAborted) as err:
        convert(f"oci:{src}:v1", f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path, cancel=cancel, progress=progress))
    assert isinstance(err.value, TransientError)
    assert layout_tags(tmp_path / "out") == []


def test_failing_platform_fails_the_index_with_its_own_error(tmp_path: Path) -> None:
    images = [oci.Image([oci.Layer([L.file("x", b"amd64" * 1000)])] * 2, architecture="amd64"),
              oci.Image([oci.Layer([L.file("y", b"arm64" * 1000)], compression="none")], architecture="arm64")]
    built = oci.build_layout(tmp_path / "src", images, name="multi")
    arm_layer = json.loads(built.manifests[1])["layers"][0]["digest"]
    blob = built.layout / "blobs" / "sha256" / arm_layer[7:]
    blob.write_bytes(blob.read_bytes()[:-1] + b"\1")
    with pytest.raises(LayerConversionError, match=rf"layer 1 \({arm_layer}\)"):
        convert(f"oci:{built.layout}:multi", f"oci:{tmp_path / 'out'}:multi_obd",
                opts(tmp_path, concurrency_limit=2))
    assert layout_tags(tmp_path / "out") == []
