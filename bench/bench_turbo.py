#!/usr/bin/env python3
"""Benchmark of the TurboOCI conversion of one layer, next to the native conversion of the same layer:

    turbo   gzip'd layer -> one decompression pass that also builds the gzip index (gzip.meta) and hashes
            the tar (diff_id) -> ext4 apply, file data mapped to the tar, not written -> meta layer
            (LSMT warp file in a ZFile) -> turboOCIv1.tar.gz -> its sha256; the source blob's sha256 too
            (the pipeline verifies every downloaded blob)
    native  the same layer through bench_ext4's path (LZ4 of every block, LayerBlobWriter, sha256)

Workloads: `usr` (bench_ext4's 1.86 GB /usr layer, built once under --out) and `small` (60,000 small files).
Each mode runs in its own child process, so peak RSS (the process tree's, helper processes included) is
that mode's alone. Reports wall time, MB/s, CPU, peak RSS, the meta blob's size as % of the source's
compressed size, and turbo's speed-up over native in the same run, after a gauge of the machine.

Targets (issue 16): turbo <= 6.8 s on usr and >= 2x our native mode, peak RSS <= 512 MiB, meta <= 5 %.

Usage:  python bench/bench_turbo.py [usr|small|all] [--out bench/out] [--modes turbo native]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gauge import machine_gauge
from _proctree import tree_cpu_seconds, tree_peak_rss_mb
from bench_ext4 import DEFAULT_DIRS, build_small_tar, build_usr_tar

from converter.ext4 import ImageBuilder
from converter.ext4.layerstream import LayerStream
from converter.formats.layer import LayerBlobWriter
from converter.formats.turbo import write_turbo_blob
from converter.formats.warp import MetaLayerWriter


class _HashingReader(io.RawIOBase):
    """The source blob, hashed as it is read (the pipeline's digest check of a downloaded layer)."""

    def __init__(self, raw: io.RawIOBase) -> None:
        self.raw, self.sha = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer) or 0
        self.sha.update(memoryview(buffer)[:n])
        return n


def run_mode(mode: str, layer: Path, out: Path) -> dict[str, Any]:
    wall0, main0, tree0 = time.perf_counter(), time.thread_time(), tree_cpu_seconds(os.getpid())
    builder = ImageBuilder()
    with open(layer, "rb", buffering=0) as f:
        source = _HashingReader(f)  # type: ignore[arg-type]
        if mode == "turbo":
            with LayerStream(source, hash_content=True, gzip_index=True) as tar, \
                    MetaLayerWriter(out / "bench.meta") as meta:
                stats = builder.apply_layer(tar, None, label=mode, turbo=meta)
                tar.drain()
                info = meta.close()
                index = tar.gzip_index()
                tar_bytes = tar.count
            blob = write_turbo_blob(out / "bench.turbo.tar.gz", info.path, index)
            os.unlink(info.path)
            blob_size, digest = blob.size, blob.digest
            os.unlink(blob.path)
        else:
            with LayerStream(source, hash_content=True) as tar, \
                    LayerBlobWriter(out / "bench.obd", virtual_size=64 << 30, workers=2) as writer:
                stats = builder.apply_layer(tar, writer, label=mode)
                tar.drain()
                tar_bytes = tar.count
            assert writer.info is not None
            blob_size, digest = writer.info.size, writer.info.digest
            os.unlink(writer.info.path)
        while source.readinto(bytearray(1 << 20)):
            pass
    wall = time.perf_counter() - wall0
    compressed = layer.stat().st_size
    return {
        "mode": mode, "entries": stats.entries, "files": stats.files, "tar_bytes": tar_bytes,
        "source_bytes": compressed, "blob_bytes": blob_size, "blob_digest": digest,
        "blob_pct_of_source": round(100 * blob_size / compressed, 2),
        "wall_s": round(wall, 2), "MB_per_s": round(tar_bytes / wall / 1e6, 1),
        "main_thread_cpu_s": round(time.thread_time() - main0, 2),
        "cpu_s_all_processes": round(tree_cpu_seconds(os.getpid()) - tree0, 2),
        "peak_rss_MB_all_processes": round(tree_peak_rss_mb(os.getpid())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", nargs="?", default="usr", choices=["usr", "small", "all"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--dirs", nargs="+", default=DEFAULT_DIRS, help="paths under / to tar for 'usr'")
    parser.add_argument("--modes", nargs="+", default=["turbo", "native"], choices=["turbo", "native"])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LAYER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child[0], Path(args.child[1]), args.out)))
        return
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load_avg": os.getloadavg(), **machine_gauge()}))
    workloads = ["usr", "small"] if args.workload == "all" else [args.workload]
    for workload in workloads:
        layer = build_usr_tar(args.out, args.dirs) if workload == "usr" else build_small_tar(args.out)
        results = {}
        for mode in args.modes:
            child = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--child", mode, str(layer)],
                                   capture_output=True, text=True, check=True)
            results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
            print(json.dumps({"workload": workload, "load_avg": os.getloadavg(), **results[mode]}))
        if "turbo" in results and "native" in results:
            print(json.dumps({"workload": workload, "turbo_speedup_over_native":
                              round(results["native"]["wall_s"] / results["turbo"]["wall_s"], 2)}))


if __name__ == "__main__":
    main()
