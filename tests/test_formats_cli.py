"""`obd-convert inspect` / `dump` and the hand-off to convert_main() for everything else."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from converter.cli import main
from converter.formats.layer import LayerBlobWriter
from tests.formats_helpers import REAL_LAYERS, e2fsck, needs_e2fsprogs, needs_vectors


def make_blob(path: Path) -> None:
    with LayerBlobWriter(path, virtual_size=1 << 30, uuid="34c46a89-bf1e-ba26-f415-914ebd832669") as w:
        w.write(0, os.urandom(1 << 20))
        w.zero(4 << 20, 1 << 20)


def test_inspect_our_blob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "a.obd"
    make_blob(blob)
    assert main(["inspect", str(blob)]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["size"] == blob.stat().st_size
    assert report["tar"]["form"] == "pax" and report["tar"]["data_offset"] == 1536
    assert report["zfile"]["header"]["flags"] == "0x1b" and report["zfile"]["info_source"] == "header"
    lsmt = report["lsmt"]
    assert lsmt["header"]["flags"] == "0x7" and lsmt["trailer"]["flags"] == "0x6"
    assert lsmt["header"]["uuid"] == "34C46A89-BF1E-BA26-F415-914EBD832669"
    assert lsmt["index"] == {"entries": 2, "padding_entries": 254, "data_entries": 1, "zeroed_entries": 1,
                             "data_bytes": 1 << 20, "zeroed_bytes": 1 << 20, "max_entry_sectors": 2048,
                             "first_lba": 0, "end_lba": 10240}
    assert any("block CRCs" in c for c in report["checks_passed"])


@needs_vectors
def test_inspect_real_blob_via_console_script_module(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "converter.cli", "inspect", str(REAL_LAYERS[1])],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    (report,) = json.loads(out)
    assert report["digest"].startswith("sha256:4a7a576c3d049a1f")
    assert report["lsmt"]["trailer"]["uuid"] == "5CC26DB7-D982-C35F-78B8-965E94452903"


def test_inspect_reports_corruption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.obd", tmp_path / "bad.obd"
    make_blob(good)
    raw = bytearray(good.read_bytes())
    raw[1536 + 512 + 200] ^= 0xFF  # inside the first compressed block
    bad.write_bytes(bytes(raw))
    assert main(["inspect", str(good), str(bad)]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert reports[0]["ok"] is True and reports[1]["ok"] is False
    assert re.search(r"bad.obd: ZFile block \d+ \(bytes \d+..\d+\): CRC32C mismatch", reports[1]["error"])
    assert main(["inspect", "--no-verify", str(tmp_path / "missing.obd")]) == 1
    assert "No such file" in json.loads(capsys.readouterr().out)[0]["error"]


@needs_vectors
@needs_e2fsprogs
def test_dump_real_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "disk.raw"
    assert main(["dump", "--output", str(raw), *map(str, REAL_LAYERS)]) == 0
    try:
        assert json.loads(capsys.readouterr().out)["layers"] == 3
        assert raw.stat().st_size == 64 << 30
        assert e2fsck(raw).returncode == 0
    finally:
        raw.unlink()


def test_dump_error_is_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.obd"
    junk.write_bytes(b"not a layer" * 1000)
    assert main(["dump", "-o", str(tmp_path / "x.raw"), str(junk)]) == 1
    assert "LSMT header: bad magic" in capsys.readouterr().err


def test_unknown_first_argument_goes_to_convert_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--input", "registry/img:tag"]) == 2
    assert "give the output tag" in capsys.readouterr().err
    assert main([]) == 2
