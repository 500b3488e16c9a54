"""The production install, as an operator makes it: a wheel of the project installed into a fresh
virtualenv without extras (`pip install obd-autoconvert`, what the Dockerfile does).

Resolving and installing the runtime dependencies is the slow part (tens of seconds), so a virtualenv
holding them is cached (tests/harness/cache.py) under a key over the wheel's declared requirements and the
Python that runs it: a change of `[project.dependencies]` makes a new one from scratch, so a removed
dependency is really missing. Each test session copies it and reinstalls the freshly built wheel into the
copy (`--no-deps`), then `pip check` confirms the copy satisfies the new wheel's requirements.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from tests.harness.cache import cached_path, key_of

ROOT = Path(__file__).resolve().parents[2]
# What a source distribution of the project contains (pyproject.toml names the packages and the readme).
SOURCES = ("pyproject.toml", "README.md", "converter", "webhook")


def _run(argv: list[str], what: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def build_wheel(out_dir: Path, root: Path = ROOT) -> Path:
    """`pip wheel --no-deps` of a clean copy of the sources (building in the checkout would leave build/)."""
    source = out_dir / "src"
    for name in SOURCES:
        path = root / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out_dir), str(source)],
         "pip wheel")
    (wheel,) = out_dir.glob("obd_autoconvert-*.whl")
    return wheel


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA (runtime ones and the extras', with their markers)."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def production_venv(wheel: Path, dest: Path) -> Path:
    """A virtualenv at `dest` with `wheel` installed without extras; returns dest."""
    key = key_of(sys.version, sys.base_prefix, *sorted(wheel_requirements(wheel)))

    def create(partial: Path) -> None:
        _run([sys.executable, "-m", "venv", str(partial)], "python -m venv")
        _run([str(partial / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
             "pip install of the wheel into a fresh venv")

    cached = cached_path(f"production-venv-{key}", create)
    os.utime(cached)  # in use: see prune_unused
    shutil.copytree(cached, dest, symlinks=True)
    prune_unused("production-venv-", keep=cached)
    python = str(dest / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
         "pip install --no-deps of the wheel")
    _run([python, "-m", "pip", "check"], "pip check")
    return dest


def prune_unused(prefix: str, keep: Path, days: float = 7) -> None:
    """Remove cache entries of an earlier dependency declaration that no test has used for `days`."""
    for entry in keep.parent.glob(f"{prefix}*"):
        if entry != keep and entry.is_dir() and time.time() - entry.stat().st_mtime > days * 86400:
            shutil.rmtree(entry, ignore_errors=True)
