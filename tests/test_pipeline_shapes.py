"""Issue 14 item 11: malformed layouts, manifests, indexes and configs are checked as data before use.

Every shape error is a permanent ImageError with a one-line message naming the document and the field;
the CLI prints that line (no traceback); the service's retry policy sees a permanent error, never an
AttributeError or TypeError it would retry for hours."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from converter.cli import main
from converter.errors import ImageError, PermanentError
from converter.pipeline import convert
from tests.harness import layers as L
from tests.harness import oci
from tests.test_pipeline_errors import GOOD_TAR, TAR, opts, write_layout
from webhook.retry import is_transient

Json = dict[str, Any]


def good_layout(root: Path) -> Path:
    return write_layout(root, [(GOOD_TAR, TAR)], [oci.sha256(GOOD_TAR)])


def put_blob(root: Path, data: bytes) -> dict:
    digest = oci.sha256(data)
    (root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def tag(root: Path, desc: dict, media_type: str = oci.OCI_MANIFEST) -> None:
    index = {"schemaVersion": 2, "manifests": [{"mediaType": media_type, **desc,
                                                "annotations": {oci.REF_NAME: "v1"}}]}
    (root / "index.json").write_bytes(json.dumps(index).encode())


def top_manifest(root: Path) -> Json:
    entry = json.loads((root / "index.json").read_bytes())["manifests"][0]
    return json.loads((root / "blobs" / "sha256" / entry["digest"][7:]).read_bytes())


def with_manifest(change: Callable[[Json], Any]) -> Callable[[Path], None]:
    """A layout whose image manifest was changed by `change` (returning a replacement, or None to keep it)."""
    def make(root: Path) -> None:
        manifest = top_manifest(root)
        manifest = change(manifest) or manifest
        tag(root, put_blob(root, json.dumps(manifest).encode()))
    return make


def with_config(change: Callable[[Json], Any]) -> Callable[[Path], None]:
    def edit(manifest: Json) -> None:
        config = json.loads((Path(edit.root) / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
        config = change(config) or config
        manifest["config"] = {**manifest["config"], **put_blob(Path(edit.root), json.dumps(config).encode())}

    def make(root: Path) -> None:
        edit.root = root  # type: ignore[attr-defined]
        with_manifest(edit)(root)
    return make


def with_index(change: Callable[[Json], Any]) -> Callable[[Path], None]:
    """The image wrapped in an image index, which `change` then spoils."""
    def make(root: Path) -> None:
        entry = json.loads((root / "index.json").read_bytes())["manifests"][0]
        child = {"mediaType": oci.OCI_MANIFEST, "digest": entry["digest"], "size": entry["size"],
                 "platform": {"os": "linux", "architecture": "amd64"}}
        index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [child]}
        index = change(index) or index
        tag(root, put_blob(root, json.dumps(index).encode()), oci.OCI_INDEX)
    return make


def index_json(text: bytes) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        (root / "index.json").write_bytes(text)
    return make


def set_key(key: str, value: Any) -> Callable[[Json], None]:
    return lambda doc: doc.__setitem__(key, value)


def layers_change(change: Callable[[list], Any]) -> Callable[[Json], None]:
    return lambda m: change(m["layers"])


CASES = {
    "index.json not JSON": (index_json(b"{not json"), r"index.json is not valid JSON"),
    "index.json a list": (index_json(b"[]"), r"index.json is a list, not a JSON object"),
    "index.json manifests not a list": (index_json(b'{"schemaVersion":2,"manifests":{"a":1}}'),
                                        r"index.json manifests is an object, expected a list of descriptors"),
    "index.json manifests holding null": (index_json(b'{"schemaVersion":2,"manifests":[null]}'),
                                          r"index.json manifests\[0\] is null, expected a descriptor object"),
    "index.json entry digest a number": (index_json(b'{"schemaVersion":2,"manifests":[{"digest":5,"size":1}]}'),
                                         r"index.json manifests\[0\].digest is a number"),
    "manifest a list": (with_manifest(lambda m: [m]), r"manifest .* is a list, not a JSON object"),
    "layers a dict": (with_manifest(lambda m: m.__setitem__("layers", {"0": m["layers"][0]})),
                      r"manifest layers is an object, expected a list of descriptors"),
    "layers holding null": (with_manifest(layers_change(lambda ls: ls.append(None))),
                            r"manifest layers\[1\] is null, expected a descriptor object"),
    "layer size a string": (with_manifest(layers_change(lambda ls: ls[0].__setitem__("size", "12"))),
                            r"manifest layers\[0\].size is a string, expected a non-negative integer"),
    "layer digest not a digest": (with_manifest(layers_change(lambda ls: ls[0].__setitem__("digest", "../x"))),
                                  r"manifest layers\[0\].digest is '../x', expected a sha256 or sha512 digest"),
    "layer annotations a list": (with_manifest(layers_change(lambda ls: ls[0].__setitem__("annotations", [1]))),
                                 r"manifest layers\[0\].annotations is a list, expected an object of strings"),
    "config a string": (with_manifest(set_key("config", "sha256:abc")),
                        r"manifest config is a string, expected a descriptor object"),
    "manifest annotations a number": (with_manifest(set_key("annotations", 7)),
                                      r"manifest annotations is a number, expected an object of strings"),
    "config not JSON": (with_config(lambda c: "x"), r"config is a string, not a JSON object"),
    "config rootfs a list": (with_config(lambda c: c.__setitem__("rootfs", [])),
                             r"config rootfs is a list, expected an object"),
    "diff_ids holding a number": (with_config(lambda c: c["rootfs"].__setitem__("diff_ids", [3])),
                                  r"config rootfs.diff_ids\[0\] is a number, expected a sha256 or sha512 digest"),
    "index manifests a dict": (with_index(lambda i: i.__setitem__("manifests", {"x": i["manifests"][0]})),
                               r"index manifests is an object, expected a list of descriptors"),
    "index child a string": (with_index(lambda i: i["manifests"].append("sha256:00")),
                             r"index manifests\[1\] is a string, expected a descriptor object"),
    "index child platform a string": (with_index(lambda i: i["manifests"][0].__setitem__("platform", "linux")),
                                      r"index manifests\[0\].platform is a string, expected an object"),
    "index annotations a list": (with_index(set_key("annotations", ["a"])),
                                 r"index annotations is a list, expected an object of strings"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shape_errors_are_one_line_permanent_image_errors(tmp_path: Path, case: str) -> None:
    spoil, message = CASES[case]
    src = good_layout(tmp_path / "src")
    spoil(src)
    with pytest.raises(ImageError, match=message) as err:
        convert(f"oci:{src}:v1" if "index.json" not in case else f"oci:{src}",
                f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path))
    assert isinstance(err.value, PermanentError)
    assert not is_transient(err.value), "the service would retry a malformed image"
    text = str(err.value)
    assert "\n" not in text and len(text) < 400 and str(src) in text


def test_cli_prints_one_line_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = good_layout(tmp_path / "src")
    with_manifest(layers_change(lambda ls: ls.append(None)))(src)
    code = main(["--input", f"oci:{src}:v1", "--output", f"oci:{tmp_path / 'out'}:v1_obd", "--oci",
                 "--cache-dir", str(tmp_path / "cache"), "-d", str(tmp_path), "--vsize", "1"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if "obd-convert" in line or "Traceback" in line]
    assert lines == [f"obd-convert: error: oci:{src}:v1: manifest layers[1] is null, expected a descriptor object"]


def test_a_valid_layout_still_converts(tmp_path: Path) -> None:
    src = write_layout(tmp_path / "src", [(L.make_tar([L.file("x", b"1")]), TAR)],
                       [oci.sha256(L.make_tar([L.file("x", b"1")]))])
    result = convert(f"oci:{src}:v1", f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path))
    assert result.pushed and result.layers_converted == 1


def test_bad_data_past_the_checks_is_still_a_permanent_image_error(tmp_path: Path, monkeypatch) -> None:
    """The last line: should a shape slip past converter/shape.py, convert() reports it as a permanent
    ImageError, never as the AttributeError the webhook would retry."""
    src = good_layout(tmp_path / "src")
    with_manifest(layers_change(lambda ls: ls.append(None)))(src)
    monkeypatch.setattr("converter.image.check_manifest", lambda doc, where: None)  # simulate a gap
    with pytest.raises(ImageError, match=r"malformed image data \(AttributeError: ") as err:
        convert(f"oci:{src}:v1", f"oci:{tmp_path / 'out'}:v1_obd", opts(tmp_path))
    assert not is_transient(err.value) and isinstance(err.value.__cause__, AttributeError)


@pytest.mark.parametrize("error", [AttributeError("'list' object has no attribute 'get'"), TypeError("x"),
                                   KeyError("layers"), IndexError("list index out of range"), ValueError("x")])
def test_the_service_never_retries_errors_from_bad_data(error: Exception) -> None:
    # issue 14 #11: an AttributeError from bad data used to count as transient (retried for hours)
    assert not is_transient(error)
    assert is_transient(ConnectionResetError("peer reset")), "network trouble stays worth retrying"
