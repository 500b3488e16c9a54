"""`obd-convert --turboOCI`: TurboOCIv1 images end to end (offline layouts, registries, both outputs in one run,
reuse, --mkfs=false), each read back through our stacked reader with tag-1 data served from the original
blobs, `e2fsck -fn` clean and equal to the independent OCI model through debugfs and the kernel."""

from __future__ import annotations

import gzip
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from converter.cli import main
from converter.formats.stack import StackedReader
from converter.formats.turbo import TurboLayerSpec
from converter.image import (
    ANN_SOURCE_DIGEST,
    DOCKER_MANIFEST,
    OBD_BLOB_DIGEST,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    TURBO_ARTIFACT_TYPE,
    TURBO_TARGET_DIGEST,
)
from converter.registry import RegistryClient
from tests import ext4_judge as judge
from tests.harness import layers as L
from tests.harness import oci
from tests.registry_helpers import client_for
from tests.test_ext4_build import DEBUGFS_FIELDS, VECTORS, torture_layers
from tests.test_pipeline_registry import VSIZE_GIB, _plain_tar, app_image, plain_args

TARGET_TYPE = "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type"
TURBO_VECTORS = VECTORS / "turbooci"


def common(tmp_path: Path) -> list[str]:
    return ["--cache-dir", str(tmp_path / "cache"), "-d", str(tmp_path), "--vsize", str(VSIZE_GIB)]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = main([*args, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def torture_image() -> oci.Image:
    """The ext4 torture layers (gzip, zstd, plain, gzip, plain) as an OCI image."""
    layers = torture_layers()
    kinds = ["gzip", "zstd", "none", "gzip", "none"]
    return oci.Image([oci.Layer(tar=_plain_tar(blob), compression=kind) for blob, kind in zip(layers, kinds,
                                                                                             strict=True)])


# ----------------------------------------------------------------------------------------- judging


class Blobs:
    """Where to read blobs of the converted image: a layout directory or a registry repository."""

    def __init__(self, tmp_path: Path, layout: Path | None = None, client: RegistryClient | None = None,
                 repo: str = "") -> None:
        self.tmp, self.layout, self.client, self.repo = tmp_path, layout, client, repo

    def path(self, digest: str, size: int | None = None) -> Path:
        if self.layout is not None:
            return self.layout / "blobs" / "sha256" / digest[7:]
        assert self.client is not None
        path = self.tmp / f"pulled-{digest[7:19]}"
        if not path.exists():
            with self.client.open_blob(self.repo, digest, size) as blob, open(path, "wb") as out:
                for chunk in blob:  # verified against the digest at the end
                    out.write(chunk)
        return path

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def manifest(self, digest: str) -> dict:
        if self.layout is not None:
            return json.loads(self.read(digest))
        assert self.client is not None
        return self.client.get_manifest(self.repo, digest).json()


def judge_turbo(blobs: Blobs, manifest: dict, source_layers: list[bytes], *, oci_types: bool, base: bool = False,
                mount: bool = True) -> list[str]:
    """Check a turbo image field by field, then stack it (meta layers over their originals, native layers as
    they are) and judge the filesystem. Returns each layer's format ("turbo" / "native")."""
    assert manifest["mediaType"] == (OCI_MANIFEST if oci_types else DOCKER_MANIFEST)
    config = json.loads(blobs.read(manifest["config"]["digest"]))
    layers = manifest["layers"]
    assert len(layers) == len(source_layers) + int(base)
    stack: list[str | TurboLayerSpec] = []
    formats = []
    for k, desc in enumerate(layers):
        path = blobs.path(desc["digest"], desc["size"])
        assert oci.sha256(path.read_bytes()) == desc["digest"]
        annotations = desc["annotations"]
        if TURBO_TARGET_DIGEST not in annotations:  # native: the base layer, or a zstd source layer
            assert annotations[OBD_BLOB_DIGEST] == desc["digest"]
            assert config["rootfs"]["diff_ids"][k] == desc["digest"]
            stack.append(str(path))
            formats.append("native")
            continue
        formats.append("turbo")
        source = source_layers[k - int(base)]
        assert desc["mediaType"] == (OCI_LAYER_TAR + "+gzip" if oci_types
                                     else "application/vnd.docker.image.rootfs.diff.tar.gzip")
        assert sorted(annotations) == sorted([
            "containerd.io/snapshot/overlaybd/blob-digest", "containerd.io/snapshot/overlaybd/blob-size",
            TURBO_TARGET_DIGEST, TARGET_TYPE, "containerd.io/snapshot/overlaybd/version"])
        assert annotations["containerd.io/snapshot/overlaybd/version"] == "0.1.0-turbo.ociv1"
        target = annotations[TURBO_TARGET_DIGEST]
        assert target == oci.sha256(source)
        assert annotations[TARGET_TYPE].endswith("gzip") == source.startswith(b"\x1f\x8b")
        inner = gzip.decompress(path.read_bytes())
        assert config["rootfs"]["diff_ids"][k] == oci.sha256(inner)  # §1.5: the inner tar's digest
        with tarfile.open(path) as archive:
            names = archive.getnames()
        assert names == ["ext4.fs.meta", ".turbo.ociv1"] + (["gzip.meta"] if source.startswith(b"\x1f\x8b") else [])
        original = blobs.path(target)  # the original must be in the same repository / layout
        stack.append(TurboLayerSpec(meta=str(path), target=str(original), target_digest=target))
    disk = blobs.tmp / "turbo.raw"
    with StackedReader(stack) as reader:
        reader.materialize(disk)
    judge.e2fsck(disk)
    expected = judge.expected_tree(source_layers)
    judge.assert_same_tree(judge.debugfs_tree(disk), expected, fields=DEBUGFS_FIELDS)
    if mount and judge.can_mount():
        with judge.mounted(disk) as root:
            seen = judge.kernel_tree(root)
        if base:  # the root directory is the official base layer's (its mke2fs time)
            seen["/"] = replace(seen["/"], mtime_ns=0)
        judge.assert_same_tree(seen, expected)
    disk.unlink()
    return formats


def layout_manifest(layout: Path, tag: str) -> tuple[str, dict]:
    index = json.loads((layout / "index.json").read_bytes())
    [entry] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
    return entry["digest"], json.loads((layout / "blobs" / "sha256" / entry["digest"][7:]).read_bytes())


# ----------------------------------------------------------------------------------------- offline


def test_layout_to_layout_turbo_image_with_originals_and_a_native_zstd_layer(oci_image_builder, tmp_path: Path,
                                                                            capsys) -> None:
    built = oci_image_builder(torture_image(), name="v1")
    out_dir = tmp_path / "out"
    result = run(capsys, "--input", f"oci:{built.layout}:v1", "--output", f"oci:{out_dir}", "--turboOCI",
                 "v1_turbo", "--oci", *common(tmp_path))
    assert result["kind"] == "turbo" and result["target"].endswith(":v1_turbo")
    digest, manifest = layout_manifest(out_dir, "v1_turbo")
    assert digest == result["target_digest"]
    assert manifest["annotations"][ANN_SOURCE_DIGEST] == built.digest
    sources = [built.blobs[d["digest"]] for d in json.loads(built.manifests[0])["layers"]]
    formats = judge_turbo(Blobs(tmp_path, layout=out_dir), manifest, sources, oci_types=True)
    assert formats == ["turbo", "native", "turbo", "turbo", "turbo"]
    layers = result["manifests"][0]["layers"]
    assert [x["format"] for x in layers] == formats
    assert "zstd" in layers[1]["note"] and not layers[0]["note"]
    assert result["originals_copied"] == 4  # the four gzip/plain originals were copied into the layout


def test_both_outputs_from_one_pass_equal_separate_runs(oci_image_builder, tmp_path: Path, capsys) -> None:
    built = oci_image_builder(torture_image(), name="v1")
    both, turbo_only, native_only = tmp_path / "both", tmp_path / "turbo", tmp_path / "native"
    result = run(capsys, "--input", f"oci:{built.layout}:v1", "--output", f"oci:{both}", "--overlaybd", "v1_obd",
                 "--turboOCI", "v1_turbo", *common(tmp_path), "--no-cache")
    assert result["kind"] == "overlaybd" and result["turbo"]["kind"] == "turbo"
    run(capsys, "--input", f"oci:{built.layout}:v1", "--output", f"oci:{turbo_only}", "--turboOCI", "v1_turbo",
        *common(tmp_path), "--no-cache")
    run(capsys, "--input", f"oci:{built.layout}:v1", "--output", f"oci:{native_only}:v1_obd", *common(tmp_path),
        "--no-cache")
    assert layout_manifest(both, "v1_turbo")[0] == layout_manifest(turbo_only, "v1_turbo")[0]
    assert layout_manifest(both, "v1_obd")[0] == layout_manifest(native_only, "v1_obd")[0]
    assert result["turbo"]["target_digest"] == layout_manifest(both, "v1_turbo")[0]
    # the zstd layer is the same native blob in both images of the run
    native_layers = [x["digest"] for x in result["manifests"][0]["layers"]]
    turbo_layers = [x["digest"] for x in result["turbo"]["manifests"][0]["layers"]]
    assert [a == b for a, b in zip(native_layers, turbo_layers, strict=True)] == [False, True, False, False, False]
    sources = [built.blobs[d["digest"]] for d in json.loads(built.manifests[0])["layers"]]
    judge_turbo(Blobs(tmp_path, layout=both), layout_manifest(both, "v1_turbo")[1], sources, oci_types=False,
                mount=False)


# ----------------------------------------------------------------------------------------- vectors


@pytest.mark.skipif(not TURBO_VECTORS.is_dir(), reason="turbooci vectors are not next to the checkout")
def test_vector_image_gzip_indexes_and_descriptors_match_the_reference(tmp_path: Path, capsys) -> None:
    """The vectors' source image (real-tools layers, gzip + tar + gzip): our gzip.meta members are the
    reference's byte for byte, and the descriptors carry the same target digests and media types."""
    source_manifest = (TURBO_VECTORS / "source-manifest.json").read_bytes()
    source_config = (TURBO_VECTORS / "source-config.json").read_bytes()
    layout = tmp_path / "src"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    blobs = {oci.sha256(source_manifest): source_manifest, oci.sha256(source_config): source_config}
    for name in ("layer1.tar.gz", "layer2.tar", "layer3.tar.gz"):
        data = (VECTORS / "real-tools" / name).read_bytes()
        blobs[oci.sha256(data)] = data
    for digest, data in blobs.items():
        (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_bytes(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": oci.sha256(source_manifest), "size": len(source_manifest),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}).encode())
    out_dir = tmp_path / "out"
    run(capsys, "--input", f"oci:{layout}:v1", "--output", f"oci:{out_dir}", "--turboOCI", "v1_turbo", "--oci",
        "--cache-dir", str(tmp_path / "cache"), "-d", str(tmp_path))
    _, ours = layout_manifest(out_dir, "v1_turbo")
    reference = json.loads((TURBO_VECTORS / "image-oci" / "manifest.json").read_bytes())
    for k, (mine, theirs) in enumerate(zip(ours["layers"], reference["layers"], strict=True)):
        assert mine["mediaType"] == theirs["mediaType"]
        for key in (TURBO_TARGET_DIGEST, TARGET_TYPE, "containerd.io/snapshot/overlaybd/version"):
            assert mine["annotations"][key] == theirs["annotations"][key]
        with tarfile.open(out_dir / "blobs" / "sha256" / mine["digest"][7:]) as archive:
            names = archive.getnames()
            gz = TURBO_VECTORS / f"layer{k + 1}" / "gzip.meta"
            if gz.exists():
                member = archive.extractfile("gzip.meta")
                assert member is not None and member.read() == gz.read_bytes()
            else:
                assert "gzip.meta" not in names
    sources = [blobs[d["digest"]] for d in json.loads(source_manifest)["layers"]]
    judge_turbo(Blobs(tmp_path, layout=out_dir), ours, sources, oci_types=True, mount=False)


# ----------------------------------------------------------------------------------------- registry


def test_registry_turbo_into_another_repository_with_originals_then_up_to_date(
        registry, oci_image_builder, push_image, tmp_path: Path, capsys) -> None:
    built = oci_image_builder(torture_image())
    push_image(built, registry, "src/app:v1")
    result = run(capsys, "-r", f"{registry.host}/src/app", "-i", "v1", "--turboOCI", "v1_turbo",
                 "--output-repository", "turbo/app", *plain_args(registry, tmp_path))
    assert result["kind"] == "turbo" and result["target"].endswith("turbo/app:v1_turbo")
    client = client_for(registry)
    sources = [built.blobs[d["digest"]] for d in json.loads(built.manifests[0])["layers"]]
    for blob in sources:  # the originals are served by the turbo image's own repository (§6.3)
        assert client.blob_exists("turbo/app", oci.sha256(blob)) == len(blob)
    manifest = client.get_manifest("turbo/app", "v1_turbo").json()
    blobs = Blobs(tmp_path, client=client, repo="turbo/app")
    assert judge_turbo(blobs, manifest, sources, oci_types=False) == ["turbo", "native", "turbo", "turbo", "turbo"]
    again = run(capsys, "-r", f"{registry.host}/src/app", "-i", "v1", "--turboOCI", "v1_turbo",
                "--output-repository", "turbo/app", *plain_args(registry, tmp_path))
    assert again["up_to_date"] and again["blobs_uploaded"] == 0 and again["target_digest"] == result["target_digest"]
    # the native image of the same source is a different output: its own key, not "up to date"
    native = run(capsys, "-r", f"{registry.host}/src/app", "-i", "v1", "-o", "v1_obd", "--output-repository",
                 "turbo/app", *plain_args(registry, tmp_path))
    assert not native["up_to_date"] and native["kind"] == "overlaybd" and native["layers_reused"] == 0


def test_registry_both_outputs_referrer_and_reuse_of_turbo_layers(registry, oci_image_builder, push_image,
                                                                 tmp_path: Path, capsys) -> None:
    first = oci_image_builder(app_image(), name="v1")
    push_image(first, registry, "both/app:v1")
    result = run(capsys, "-r", f"{registry.host}/both/app", "-i", "v1", "--overlaybd", "v1_obd", "--turboOCI",
                 "v1_turbo", "--referrer", *plain_args(registry, tmp_path))
    client = client_for(registry)
    turbo = client.get_manifest("both/app", "v1_turbo").json()
    native = client.get_manifest("both/app", "v1_obd").json()
    assert turbo["artifactType"] == TURBO_ARTIFACT_TYPE and turbo["subject"]["digest"] == first.digest
    assert native["artifactType"].endswith("native.v1+json")
    assert result["turbo"]["blobs_uploaded"] >= 2 and result["turbo"]["originals_copied"] == 0  # same repository
    referrers = {d["artifactType"] for d in client.referrers("both/app", first.digest)}
    assert TURBO_ARTIFACT_TYPE in referrers
    # a second image sharing the first layer: the turbo layer is reused (meta blob read back), not converted
    second = oci_image_builder(oci.Image([*app_image().layers[:1],
                                          oci.Layer([L.file("app/new.txt", b"new")], compression="gzip")]),
                               name="v2")
    push_image(second, registry, "both/app:v2")
    again = run(capsys, "-r", f"{registry.host}/both/app", "-i", "v2", "--turboOCI", "v2_turbo", "--oci",
                *plain_args(registry, tmp_path))
    assert again["layers_reused"] == 1 and again["layers_converted"] == 1
    sources = [second.blobs[d["digest"]] for d in json.loads(second.manifests[0])["layers"]]
    manifest = client.get_manifest("both/app", "v2_turbo").json()
    judge_turbo(Blobs(tmp_path, client=client, repo="both/app"), manifest, sources, oci_types=True)


def test_mkfs_false_turbo_on_the_official_base_layer(registry, oci_image_builder, push_image, tmp_path: Path,
                                                    capsys) -> None:
    base = VECTORS / "ext4_64.zfile"
    if not base.exists():
        pytest.skip("the official base layer vector is not next to the checkout")
    built = oci_image_builder(app_image())
    push_image(built, registry, "base/app:v1")
    run(capsys, "-r", f"{registry.host}/base/app", "-i", "v1", "--turboOCI", "v1_turbo", "--mkfs=false",
        "--base-layer", str(base), *plain_args(registry, tmp_path))
    client = client_for(registry)
    manifest = client.get_manifest("base/app", "v1_turbo").json()
    sources = [built.blobs[d["digest"]] for d in json.loads(built.manifests[0])["layers"]]
    formats = judge_turbo(Blobs(tmp_path, client=client, repo="base/app"), manifest, sources, oci_types=False,
                          base=True)
    assert formats == ["native", "turbo", "turbo"]


def test_changed_original_blob_is_a_clear_error(oci_image_builder, tmp_path: Path, capsys) -> None:
    built = oci_image_builder(app_image(), name="v1")
    layer = json.loads(built.manifests[0])["layers"][0]
    path = built.layout / "blobs" / "sha256" / layer["digest"][7:]
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the gzip trailer region: still decompresses up to the CRC check
    path.write_bytes(bytes(data))
    code = main(["--input", f"oci:{built.layout}:v1", "--output", f"oci:{tmp_path / 'out'}", "--turboOCI", "t",
                 *common(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and f"layer 1 ({layer['digest']})" in err
    index = tmp_path / "out" / "index.json"
    assert not index.exists() or json.loads(index.read_bytes())["manifests"] == []  # nothing tagged
    assert "digest" in err  # the blob's digest check names the mismatch


def test_registry_multi_arch_index_turbo(registry, oci_image_builder, push_image, tmp_path: Path, capsys) -> None:
    images = [app_image("amd64", b"x86"), app_image("arm64", b"arm")]
    built = oci_image_builder(images, attestation=True)
    source_digest = push_image(built, registry, "multi/app:v1")
    out = run(capsys, "-r", f"{registry.host}/multi/app", "-i", "v1", "--turboOCI", "v1_turbo", "--oci",
              *plain_args(registry, tmp_path))
    client = client_for(registry)
    index = client.get_manifest("multi/app", "v1_turbo")
    assert index.media_type == "application/vnd.oci.image.index.v1+json" and index.digest == out["target_digest"]
    body = index.json()
    assert body["annotations"][ANN_SOURCE_DIGEST] == source_digest
    assert [c["platform"]["architecture"] for c in body["manifests"]] == ["amd64", "arm64"]  # attestations dropped
    blobs = Blobs(tmp_path, client=client, repo="multi/app")
    for child, source_raw in zip(body["manifests"], built.manifests, strict=True):
        sources = [built.blobs[d["digest"]] for d in json.loads(source_raw)["layers"]]
        assert judge_turbo(blobs, blobs.manifest(child["digest"]), sources, oci_types=True, mount=False) == \
            ["turbo", "turbo"]


def test_a_meta_layer_mapping_past_the_tar_is_refused_with_the_layer_named(tmp_path: Path) -> None:
    """The turbo output's own check before a meta layer is published (the reader refuses it too)."""
    from converter.image import SourceLayer
    from converter.options import ConvertOptions
    from converter.outputs import LayerContext
    from converter.outputs.turbo import TurboJob, TurboLayerError

    layer = SourceLayer(0, "sha256:" + "a" * 64, 100, OCI_LAYER_TAR, "sha256:" + "b" * 64, "sha256:" + "b" * 64)
    job = TurboJob(LayerContext(layer, None, 64 << 30, "none", tmp_path / "l0"), ConvertOptions())
    job.meta.write(0, bytes(4096))
    job.meta.map_remote(1 << 20, 4096, 10240)  # tar bytes 10240..14336

    class ShortTar:
        count = 12288  # the tar is shorter than the mapping

        def gzip_index(self) -> None:
            return None

    with pytest.raises(TurboLayerError, match=r"layer 1 \(sha256:a+\): the meta layer maps tar bytes up to 14336"):
        job.finish(ShortTar())  # type: ignore[arg-type]
    assert not list(tmp_path.glob("l0*"))  # nothing half-written is left


def test_multi_member_gzip_layer_becomes_a_native_layer_of_the_turbo_image(oci_image_builder, tmp_path: Path,
                                                                          capsys) -> None:
    """eStargz-style layers are several gzip members; a gzip index covers only the first (§3.6). Found
    while reading, the layer is converted natively and the image redone; the result says so."""
    import gzip as gz

    second = L.make_tar([L.file("b/one", b"1" * 5000), L.file("b/two", b"2" * 70000)])
    cut = 512 * 3  # inside the tar, on a block boundary
    members = gz.compress(second[:cut], mtime=0) + gz.compress(second[cut:], mtime=0)
    image = oci.Image([oci.Layer([L.file("a/first", b"first layer")], compression="gzip"),
                       oci.Layer(tar=second, compression="gzip")])
    built = oci_image_builder(image, name="v1")
    manifest = json.loads(built.manifests[0])
    # replace layer 2's blob by the two-member form of the same tar (same diff_id)
    old = manifest["layers"][1]
    manifest["layers"][1] = {**old, "digest": oci.sha256(members), "size": len(members)}
    (built.layout / "blobs" / "sha256" / oci.sha256(members)[7:]).write_bytes(members)
    raw = json.dumps(manifest).encode()
    (built.layout / "blobs" / "sha256" / oci.sha256(raw)[7:]).write_bytes(raw)
    (built.layout / "index.json").write_bytes(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": oci.sha256(raw), "size": len(raw),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}).encode())
    out_dir = tmp_path / "out"
    result = run(capsys, "--input", f"oci:{built.layout}:v1", "--output", f"oci:{out_dir}", "--turboOCI", "t",
                 "--oci", *common(tmp_path))
    layers = result["manifests"][0]["layers"]
    assert [x["format"] for x in layers] == ["turbo", "native"]
    assert "multi-member" in layers[1]["note"]
    # found while reading layer 2 in turbo mode: the image was redone, layer 1 from the reuse cache
    assert [x["status"] for x in layers] == ["reused", "converted"]
    sources = [built.blobs[manifest["layers"][0]["digest"]], members]
    assert judge_turbo(Blobs(tmp_path, layout=out_dir), layout_manifest(out_dir, "t")[1], sources,
                       oci_types=True) == ["turbo", "native"]


def test_a_turbo_image_is_refused_as_input(oci_image_builder, tmp_path: Path, capsys) -> None:
    built = oci_image_builder(app_image(), name="v1")
    out_dir = tmp_path / "out"
    run(capsys, "--input", f"oci:{built.layout}:v1", "--output", f"oci:{out_dir}", "--turboOCI", "t",
        *common(tmp_path))
    for flags in (["--turboOCI", "again"], ["-o", "native"]):
        code = main(["--input", f"oci:{out_dir}:t", "--output", f"oci:{tmp_path / 'again'}", *flags,
                     *common(tmp_path)])
        assert code == 1 and "already in overlaybd format" in capsys.readouterr().err


def test_registry_to_another_registry_copies_the_originals_while_reading(registry_factory, oci_image_builder,
                                                                        push_image, tmp_path: Path,
                                                                        capsys) -> None:
    source, target = registry_factory(), registry_factory()
    built = oci_image_builder(torture_image())
    push_image(built, source, "app:v1")
    result = run(capsys, "-r", f"{source.host}/app", "-i", "v1", "--turboOCI", "v1_turbo", "--output-repository",
                 f"{target.host}/copied/app", *plain_args(source, tmp_path))
    sources = [built.blobs[d["digest"]] for d in json.loads(built.manifests[0])["layers"]]
    client = client_for(target)
    # the four gzip/plain originals were uploaded (no mount across registries); the zstd one is not needed
    assert result["originals_copied"] == 4
    for blob, needed in zip(sources, [True, False, True, True, True], strict=True):
        assert (client.blob_exists("copied/app", oci.sha256(blob)) == len(blob)) == needed
    manifest = client.get_manifest("copied/app", "v1_turbo").json()
    judge_turbo(Blobs(tmp_path, client=client, repo="copied/app"), manifest, sources, oci_types=False, mount=False)
    assert not list(tmp_path.glob("obd-convert-*"))  # temp files (copies included) are gone


def test_no_upload_keeps_both_images_in_the_work_dir(oci_image_builder, tmp_path: Path, capsys) -> None:
    built = oci_image_builder(app_image(), name="v1")
    result = run(capsys, "--input", f"oci:{built.layout}:v1", "-o", "v1_obd", "--turboOCI", "v1_turbo",
                 "--no-upload", *common(tmp_path))
    assert not result["pushed"] and not result["turbo"]["pushed"]
    out = Path(result["output_dir"])
    native = json.loads((out / "output" / "manifest.json").read_bytes())
    turbo = json.loads((out / "output-turbo" / "manifest.json").read_bytes())
    assert TURBO_TARGET_DIGEST not in native["layers"][0]["annotations"]
    for desc in turbo["layers"]:  # the meta blobs and the originals they point to are all there
        assert (out / "output-turbo" / desc["digest"][7:]).is_file()
        assert (out / "output-turbo" / desc["annotations"][TURBO_TARGET_DIGEST][7:]).is_file()
