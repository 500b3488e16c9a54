"""Progress display for `obd-convert`: a rich progress bar per layer on a terminal, log lines otherwise.

The pipeline reports events through `ConvertOptions.progress(event, data)`; it logs every finished layer
itself, so plain (non-TTY) runs need no callback at all.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)


class RichProgress:
    """One bar per layer (source bytes read), finished bars keep the layer's summary."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeElapsedColumn(),
                                 console=console or Console(stderr=True), transient=False)
        self._tasks: dict[tuple[str, int], TaskID] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @staticmethod
    def _name(data: Mapping[str, Any]) -> str:
        platform = data.get("platform") or ""
        prefix = f"[{platform}] " if platform else ""
        return f"{prefix}layer {data.get('index', 0) + 1}/{data.get('count', '?')}"

    def __call__(self, event: str, data: Mapping[str, Any]) -> None:
        key = (str(data.get("platform") or ""), int(data.get("index", -1)))
        with self._lock:
            if event == "layer_start":
                self._tasks[key] = self.progress.add_task(self._name(data), total=data.get("size"))
                self._sizes[key] = int(data.get("size") or 0)
            elif event == "layer_bytes" and key in self._tasks:
                self.progress.advance(self._tasks[key], data["bytes"])
            elif event == "layer_done" and key in self._tasks:
                files, mb = data.get("files", 0), data.get("tar_bytes", 0) / 1e6
                rate = mb / data["seconds"] if data.get("seconds") else 0.0
                self.progress.update(self._tasks[key], completed=self._sizes[key],
                                     description=f"{self._name(data)}: {files} files, {mb:.1f} MB, {rate:.0f} MB/s")
            elif event == "layer_reused":
                task = self.progress.add_task(f"{self._name(data)}: reused {data['digest'][:19]}", total=1)
                self.progress.update(task, completed=1)
            elif event == "up_to_date":
                self.progress.console.print(f"{data['target']} is up to date ({data['digest']})")
