"""`obd-convert` as operators run it: offline layouts, --no-upload --dump-manifest, exit codes, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converter.cli import main
from converter.image import ANN_SOURCE_DIGEST, DOCKER_MANIFEST, OBD_BLOB_DIGEST, OCI_MANIFEST
from converter.registry import NotFoundError
from tests.harness import layers as L
from tests.harness import oci
from tests.registry_helpers import client_for
from tests.test_pipeline_errors import write_layout
from tests.test_pipeline_registry import VSIZE_GIB, app_image

ROOT = Path(__file__).resolve().parents[1]


def common(tmp_path: Path) -> list[str]:
    return ["--cache-dir", str(tmp_path / "cache"), "-d", str(tmp_path), "--vsize", str(VSIZE_GIB)]


def test_layout_in_layout_out(oci_image_builder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built = oci_image_builder(app_image(), name="v1")
    out_dir = tmp_path / "out"
    code = main(["--input", f"oci:{built.layout}:v1", "--output", f"oci:{out_dir}:v1_obd", "--oci", "--json",
                 *common(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    index = json.loads((out_dir / "index.json").read_bytes())
    [entry] = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "v1_obd"
    assert entry["digest"] == result["target_digest"] and entry["mediaType"] == OCI_MANIFEST
    manifest = json.loads((out_dir / "blobs" / "sha256" / entry["digest"][7:]).read_bytes())
    assert manifest["annotations"][ANN_SOURCE_DIGEST] == built.digest
    for layer in manifest["layers"]:  # every blob is in the layout under its digest
        blob = (out_dir / "blobs" / "sha256" / layer["digest"][7:]).read_bytes()
        assert oci.sha256(blob) == layer["digest"] == layer["annotations"][OBD_BLOB_DIGEST]
    assert (out_dir / "oci-layout").is_file()


def test_no_upload_dump_manifest(registry, oci_image_builder, push_image, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    built = oci_image_builder(app_image())
    source_digest = push_image(built, registry, "dry:v1")
    code = main(["-r", f"{registry.host}/dry", "-g", source_digest, "--plain", "--no-upload", "--dump-manifest",
                 *common(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads(captured.out)
    assert manifest["mediaType"] == DOCKER_MANIFEST and len(manifest["layers"]) == 2
    assert "not uploaded" in captured.err
    assert client_for(registry).list_tags("dry") == ["v1"]
    [run_dir] = tmp_path.glob("obd-convert-*")
    kept = {p.name for p in (run_dir / "output").iterdir()}
    assert {d["digest"][7:] for d in manifest["layers"]} | {manifest["config"]["digest"][7:]} <= kept
    assert json.loads((run_dir / "output" / "manifest.json").read_bytes()) == manifest


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--fstype", "xfs"], 1, "fstype 'xfs' is not supported yet"),
    (["--vsize", "0"], 1, "vsize 0"),
    (["-g", "sha256:" + "0" * 64, "-i", "x"], 2, "exactly one of"),
    (["--mkfs=false", "--base-layer", "/nonexistent/base"], 1, "does not exist"),
])
def test_option_errors_exit_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                          code: int, message: str) -> None:
    base = ["-r", "127.0.0.1:1/app"] + ([] if "-g" in args else ["-i", "v1"])
    assert main([*common(tmp_path), *base, *args]) == code  # later flags win
    err = capsys.readouterr().err
    assert message in err
    if code == 1:
        assert err.count("\n") == 1 and err.startswith("obd-convert: error: ")


def test_bad_image_exit_code_and_json_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tar = L.make_tar([L.file("a", b"a")])
    src = write_layout(tmp_path / "src", [(tar, oci.LAYER_TYPES["oci"]["none"])], [oci.sha256(b"wrong")])
    assert main(["--input", f"oci:{src}:v1", "--output", f"oci:{tmp_path / 'out'}:x", "--json",
                 *common(tmp_path)]) == 1
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["ok"] is False and not error["transient"] and "layer 1" in error["error"]


def test_sigterm_aborts_cleanly_without_a_tag(registry, tmp_path: Path) -> None:
    # Five incompressible 24 MB layers: slow enough to be interrupted after the first one.
    layers = [oci.Layer([L.file(f"blob{k}", os.urandom(24 << 20))], compression="none") for k in range(5)]
    built = oci.build_layout(tmp_path / "layout", oci.Image(layers), name="big")
    cmd = [sys.executable, "-m", "converter.cli", "--input", f"oci:{built.layout}:big",
           "--output", f"{registry.host}/big:v1_obd", "--plain", "--verbose", *common(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # the pipeline logs each finished layer
        lines.append(line)
        if " layer 1 (" in line:
            proc.send_signal(signal.SIGTERM)
            break
    started = time.monotonic()
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(lines) + rest
    assert time.monotonic() - started < 30
    assert "SIGTERM received" in rest and "interrupted, nothing tagged" in rest
    try:
        tags = client_for(registry).list_tags("big")
    except NotFoundError:  # no blob made it either: the repository does not exist
        tags = []
    assert tags == []
    assert not list(tmp_path.glob("obd-convert-*")), "temp blobs left behind"


def test_error_line_stays_short_for_a_huge_entry_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14 item 6: a 600 KB tar name whose last component is too long gives a one-line error of a few KB."""
    from tests.test_ext4_bounds import finish, member, special

    name = "a/" * 300_000 + "n" * 300
    tar = finish(special(b"L", name.encode() + b"\0"), member("placeholder"))
    src = write_layout(tmp_path / "src", [(tar, oci.LAYER_TYPES["oci"]["none"])], [oci.sha256(tar)])
    assert main(["--input", f"oci:{src}:v1", "--output", f"oci:{tmp_path / 'out'}:x", *common(tmp_path)]) == 1
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("obd-convert: error: ")]
    assert "name component longer than 255 bytes" in line and "chars cut" in line
    assert len(err) < 5000
    assert not (tmp_path / "out").exists()
