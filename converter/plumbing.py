"""Plumbing of one conversion run: the source stream, the background uploader, the temp-disk budget and
the --no-upload directory target (used by converter.pipeline; see docs/pipeline.md)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import TransientError
from .formats.layer import LayerBlobWriter
from .transport import Store


class ConversionAborted(TransientError):
    """Cancelled (SIGINT/SIGTERM or a failed sibling); nothing was tagged."""


class SourceStream(io.RawIOBase):
    """The source blob as read by the decompressor: counts bytes, honours cancel, remembers the source's error,
    and copies the raw bytes to `copy_to` when a target needs the original blob (TurboOCI originals).

    The ext4 builder turns any exception from its input into a LayerApplyError; keeping the original lets
    the pipeline re-raise registry errors with their transient/permanent class intact.
    """

    def __init__(self, raw: BinaryIO, cancelled: Callable[[], bool], on_bytes: Callable[[int], None],
                 copy_to: BinaryIO | None = None) -> None:
        super().__init__()
        self._raw, self._cancelled, self._on_bytes = raw, cancelled, on_bytes
        self._copy = copy_to
        self.count = 0
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._cancelled():
            self.error = self.error or ConversionAborted("conversion cancelled")
            raise self.error
        try:
            n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        except BaseException as exc:
            self.error = self.error or exc
            raise
        self.count += n or 0
        if n:
            if self._copy is not None:
                self._copy.write(memoryview(buffer)[:n])
            self._on_bytes(n)
        return n or 0


class TempBudget:
    """Keeps the temp dir within the largest blob converted so far, while the previous blob uploads.

    Blob i uploads (its space given back behind the read position, transport.ReleasingReader) while blob
    i+1 is written. When the upload is slower than the conversion, the two together outgrow one blob; then
    the builder waits (it checks before its first write and then every CHECK_BYTES of layer data) until
    the upload has given back enough. MARGIN covers what the blob can grow by until the next check: the
    output still in flight in the ZFile writer (at most 7 MiB: its pending batch and the workers' slots)
    plus CHECK_BYTES of new data (LZ4 may grow incompressible data by 0.5 %)."""

    CHECK_BYTES = 8 << 20
    MARGIN = 16 << 20

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self._cond = threading.Condition()
        self._cancelled = cancelled
        self._largest = 0  # the largest blob finished so far
        self._upload_size = 0  # the blob being uploaded
        self._uploading = 0  # ... and how much of it is still on disk
        self.waited = 0.0  # seconds the builder spent waiting

    def upload_started(self, size: int) -> None:
        with self._cond:
            self._largest = max(self._largest, size)
            self._upload_size = self._uploading = size

    def released(self, released: int) -> None:
        """ReleasingReader's report: the first `released` bytes of the uploading blob are given back."""
        with self._cond:
            self._uploading = max(0, self._upload_size - released)
            self._cond.notify_all()

    def upload_finished(self) -> None:
        with self._cond:
            self._uploading = 0
            self._cond.notify_all()

    def wait_for_room(self, written: int) -> None:
        """Return once a blob of `written` bytes (so far) fits next to what is left of the upload."""
        with self._cond:
            if not self._over(written):
                return
            started = time.monotonic()
            while self._over(written) and not self._cancelled():
                self._cond.wait(0.2)
            self.waited += time.monotonic() - started

    def _over(self, written: int) -> bool:
        mine = written + self.MARGIN
        return self._uploading > 0 and mine + self._uploading > max(self._largest, mine)


class BudgetedSink:
    """The layer blob writer, as the builder's sink, pausing when the temp dir would outgrow the budget."""

    def __init__(self, writer: LayerBlobWriter, budget: TempBudget) -> None:
        self._writer = writer
        self._budget = budget
        self._until_check = 0  # the first write checks: a small layer may never reach CHECK_BYTES

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._until_check <= 0:
            self._until_check = self._budget.CHECK_BYTES
            self._budget.wait_for_room(self._writer.disk_bytes)
        self._until_check -= len(data)
        self._writer.write(offset, data)


class Uploader:
    """Uploads one blob in the background while the next layer converts; at most one upload in flight,
    so at most two converted blobs sit in the temp dir at any time (and TempBudget keeps the two within
    the largest one)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="obd-upload", daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class DirStore(Store):
    """The --no-upload target: blobs, configs and manifests kept as files named by digest in a directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repository = str(path)
        self.cache_registry = "dir:" + str(path)
        self.name = f"dir:{path}"
        path.mkdir(parents=True, exist_ok=True)

    def blob_size(self, digest: str) -> int | None:
        p = self.path / digest.split(":", 1)[1]
        return p.stat().st_size if p.exists() else None

    def put_blob_file(self, path: str, digest: str, size: int, *, consume: bool = False,
                      on_release: Callable[[int], None] | None = None) -> None:
        os.replace(path, self.path / digest.split(":", 1)[1])

    def put_blob_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.path / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    def put_manifest(self, ref: str, raw: bytes, media_type: str) -> str:
        digest = self.put_blob_bytes(raw)
        if not ref.startswith("sha256:"):
            (self.path / "manifest.json").write_bytes(raw)
        return digest


class TeeSink:
    """Native blocks for two writers at once (a zstd layer of a `--overlaybd T1 --turboOCI T2` run is a
    native blob in both images)."""

    def __init__(self, *sinks: Any) -> None:
        self._sinks = sinks

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        for sink in self._sinks:
            sink.write(offset, data)
