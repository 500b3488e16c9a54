"""A 1 GiB blob up and down through the client in a separate process, whose peak RSS is measured."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_registry.py"
RSS_LIMIT_MB = 150


@pytest.fixture
def registry_dropping_storage(registry):
    yield registry
    shutil.rmtree(registry.workdir / "storage", ignore_errors=True)  # do not keep 1 GiB per test run


def test_one_gib_blob_streams_in_bounded_memory(registry_dropping_storage) -> None:
    registry = registry_dropping_storage
    run = subprocess.run([sys.executable, str(BENCH), "--host", registry.host, "--plain-http", "--size", "1G",
                          "--repo", "big/blob", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["size"] == 1 << 30
    # The bench verified the upload's digest against its own hash and the download's digest and size.
    stored = registry.workdir / "storage/docker/registry/v2/blobs/sha256" / result["digest"][7:9] / \
        result["digest"][7:] / "data"
    assert stored.stat().st_size == 1 << 30
    assert result["peak_rss_MB"] < RSS_LIMIT_MB, result
