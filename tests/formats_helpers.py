"""Shared helpers of the tests/test_formats_*.py files: vector locations, e2fsck/debugfs runners."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[1] / ".." / "shared" / "vectors"
BASE_ZFILE = VECTORS / "ext4_64.zfile"
REAL_TOOLS = VECTORS / "real-tools"
REAL_LAYERS = [REAL_TOOLS / f"layer{i}.obd.commit" for i in (1, 2, 3)]

needs_vectors = pytest.mark.skipif(not (BASE_ZFILE.exists() and REAL_TOOLS.is_dir()),
                                   reason=f"reference vectors not found at {VECTORS} (checkout outside the "
                                          f"workspace)")
needs_e2fsprogs = pytest.mark.skipif(shutil.which("e2fsck") is None or shutil.which("debugfs") is None,
                                     reason="e2fsprogs (e2fsck, debugfs) not installed")


def e2fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=300)


def debugfs_tree(image: Path) -> dict[str, dict[str, str]]:
    """path -> {ino, mode, uid, gid, size} for every entry below /, from `debugfs -R 'ls -p DIR'` recursively.

    Sizes of directories are '-' as in tree.tsv."""
    tree: dict[str, dict[str, str]] = {}
    pending = ["/"]
    while pending:
        directory = pending.pop()
        out = subprocess.run(["debugfs", "-R", f"ls -p {directory}", str(image)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        for line in out.splitlines():
            if not line.startswith("/"):
                continue
            _, ino, mode, uid, gid, name, size, _ = line.split("/")
            if name in (".", "..") or ino == "0":  # ino 0: an unused slot in a directory block
                continue
            path = directory.rstrip("/") + "/" + name
            is_dir = mode.startswith("04")
            tree[path] = {"ino": ino, "mode": mode, "uid": uid, "gid": gid, "size": "-" if is_dir else size}
            if is_dir:
                pending.append(path)
    return tree


def read_tree_tsv(path: Path) -> dict[str, dict[str, str]]:
    tree = {}
    for line in path.read_text().splitlines():
        name, *fields = line.split("\t")
        tree[name] = dict(f.split("=", 1) for f in fields)
    return tree


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512
