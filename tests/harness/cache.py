"""The tests' cache of expensive, reproducible things (a Debian base image, a virtualenv of the runtime
dependencies), kept outside the repository so that later runs on the same machine reuse it.

Entries are named by a key over everything they are built from, built under a temporary name and renamed
into place when complete, and built by one process at a time (a lock file), so a crashed or concurrent
run never leaves a half-built entry that a later run would take for a good one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_dir() -> Path:
    """$OBD_TEST_CACHE_DIR, else $XDG_CACHE_HOME/obd-autoconvert-tests (~/.cache/obd-autoconvert-tests)."""
    explicit = os.environ.get("OBD_TEST_CACHE_DIR")
    if explicit:
        path = Path(explicit)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "obd-autoconvert-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def key_of(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """An exclusive lock shared by every test process on this machine (released when the holder dies)."""
    with open(cache_dir() / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_path(name: str, build: Callable[[Path], None]) -> Path:
    """The cache entry `name`, built by `build(partial_path)` first if it is not there yet."""
    final = cache_dir() / name
    if final.exists():
        return final
    with locked(name):
        if final.exists():  # built by another process while we waited
            return final
        partial = cache_dir() / f"{name}.partial"
        if partial.is_dir():
            shutil.rmtree(partial)
        elif partial.exists():
            partial.unlink()
        build(partial)
        partial.rename(final)
    return final
