"""CPU and memory of a process and all its descendants (Linux /proc), for the benchmarks.

The ZFile writer compresses in worker processes (converter/formats/zworkers.py), so a process's own
getrusage() no longer tells what a conversion costs."""

from __future__ import annotations

import os
from pathlib import Path


def _table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def descendants(root: int) -> list[int]:
    """`root` and every live process below it."""
    table = _table()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(child for child, (parent, _) in table.items() if parent == pid)
    return found


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of `root` and its live descendants."""
    table = _table()
    return sum(table[pid][1] for pid in descendants(root) if pid in table)


def tree_peak_rss_mb(root: int) -> float:
    """Sum of the peak RSS (VmHWM) of `root` and its live descendants, in MB (shared pages are counted
    in every process that maps them, so this overstates a little)."""
    total = 0
    for pid in descendants(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)
    return total / 1024
