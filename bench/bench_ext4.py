#!/usr/bin/env python3
"""Benchmark of the native ext4 layer builder, end to end for one layer:

    gzip'd layer tar -> decompress -> ext4 apply -> LSMT -> ZFile (LZ4, 4 KiB, CRCs) -> tar -> sha256

Two workloads (issue "ext4 builder", Performance):
  usr    a tar of a large part of /usr (default: share, lib/x86_64-linux-gnu, bin, include; ~1.9 GB,
         ~70k entries), gzip'd with ISA-L. The reference overlaybd tools take about 34 s for this on the
         project's 2-core VM; the target is <= 1/5 of that, i.e. >= 250 MB/s of uncompressed tar content.
  small  60,000 small files (1-4 KiB) in 60 directories: target >= 20,000 files/s.

  entries  N empty files (default 10^6, --entries) in directories of 1000: the in-memory model's cost per
         tar entry. Reports the peak RSS of the builder process and bytes per entry above the RSS before the
         build (issue 14 item 13: 10^6 entries must stay within 512 MiB).
  convert  the same layer as a one-layer OCI layout, converted end to end by `obd-convert` (layout in,
         layout out) in a child process: its peak RSS (ru_maxrss of the child; the compression workers
         are separate processes).

  floor  what the libraries alone cost for the usr workload, single-threaded: ISA-L inflate, LZ4 + CRC32C
         of every 4 KiB block, sha256 of the compressed output. (inflate + compress) / cores + sha256 (the
         blob's hash is one serial pass after its header is patched) is the wall time no builder can beat
         on this machine, before the builder's own Python is counted.

Usage:  python bench/bench_ext4.py [usr|small|entries|convert|floor|all] [--out bench/out]
                                   [--dirs usr/share usr/bin ...]
        python bench/bench_ext4.py entries --entries 1000000
Inputs are built once under --out and reused. Reports wall time, MB/s, files/s, CPU seconds of the
main thread and of the whole process, and peak RSS (ru_maxrss), after a gauge of the machine's speed
(bench/_gauge.py: the VM's cores change speed from hour to hour).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _gauge import machine_gauge
from _proctree import tree_cpu_seconds, tree_peak_rss_mb

from converter.ext4 import ImageBuilder
from converter.formats.layer import LayerBlobWriter

DEFAULT_DIRS = ["usr/share", "usr/lib/x86_64-linux-gnu", "usr/bin", "usr/include"]


def build_usr_tar(out: Path, dirs: list[str]) -> Path:
    target = out / "usr.tar.gz"
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        tar = subprocess.Popen(["tar", "--sort=name", "-C", "/", "-cf", "-", *dirs], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        gz = subprocess.run([sys.executable, "-m", "isal.igzip", "-c"], stdin=tar.stdout, stdout=f, check=True)
        tar.wait()
        assert gz.returncode == 0
    tmp.rename(target)
    return target


def build_small_tar(out: Path, count: int = 60000) -> Path:
    target = out / f"small-{count}.tar.gz"
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(count // 1000):
            info = tarfile.TarInfo(f"app/pkg{d:02d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
        for i in range(count):
            data = (f"module {i}\n" * (100 + i % 300)).encode()[: 1024 + (i * 37) % 3072]
            info = tarfile.TarInfo(f"app/pkg{i // 1000:02d}/mod_{i:05d}.py")
            info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
            tf.addfile(info, io.BytesIO(data))
    import gzip

    target.write_bytes(gzip.compress(raw.getvalue(), compresslevel=6, mtime=0))
    return target


def build_entries_tar(out: Path, count: int) -> Path:
    """`count` empty regular files, 1000 per directory, as a gzip'd ustar stream written header by header
    (tarfile.TarFile would keep a TarInfo per member and inflate this process's peak RSS)."""
    target = out / f"entries-{count}.tar.gz"
    if target.exists():
        return target
    import zlib

    out.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(tmp, "wb") as f:
        batch = []
        for d in range(-(-count // 1000)):
            info = tarfile.TarInfo(f"d{d:04d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            batch.append(info.tobuf(tarfile.USTAR_FORMAT))
            for i in range(d * 1000, min(count, (d + 1) * 1000)):
                info = tarfile.TarInfo(f"d{d:04d}/f{i:07d}")
                info.mode, info.mtime = 0o644, 1700000000
                batch.append(info.tobuf(tarfile.USTAR_FORMAT))
            f.write(gz.compress(b"".join(batch)))
            batch.clear()
        f.write(gz.compress(bytes(1024)) + gz.flush())
    tmp.rename(target)
    return target


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def entries(layer: Path, out: Path) -> dict:
    """Peak RSS of one build of the entries layer, and its cost per entry above the RSS before the build."""
    before = _rss_now_mb()
    wall0 = time.perf_counter()
    builder = ImageBuilder()
    with open(layer, "rb") as src, LayerBlobWriter(out / "entries.obd", virtual_size=64 << 30, workers=2) as writer:
        stats = builder.apply_layer(src, writer, label="entries")
    wall = time.perf_counter() - wall0
    os.unlink(writer.info.path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = _rss_now_mb()
    return {
        "workload": "entries",
        "entries": stats.entries,
        "blob_digest": writer.info.digest,  # equal across builder versions: the output is byte-identical
        "wall_s": round(wall, 2),
        "rss_before_MB": round(before),
        "peak_rss_MB": round(peak),
        "rss_after_MB": round(held),
        "peak_bytes_per_entry": round((peak - before) * (1 << 20) / stats.entries),
        "held_bytes_per_entry": round((held - before) * (1 << 20) / stats.entries),
    }


def entries_layout(out: Path, layer: Path) -> Path:
    """A one-layer OCI layout (tagged v1) around the entries layer, built once."""
    import gzip
    import hashlib

    layout = out / f"{layer.name.removesuffix('.tar.gz')}-layout"
    if (layout / "index.json").exists():
        return layout
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    diff = hashlib.sha256()
    with gzip.open(layer, "rb") as f:
        while chunk := f.read(1 << 20):
            diff.update(chunk)
    compressed = hashlib.sha256(layer.read_bytes()).hexdigest()
    if not (blobs / compressed).exists():
        os.link(layer, blobs / compressed)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff.hexdigest()]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": "sha256:" + compressed, "size": layer.stat().st_size}]}).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return layout


def convert_entries(layout: Path, out: Path) -> dict:
    """`obd-convert` of the entries layout in a child process: wall time and the child's peak RSS."""
    import shutil

    target = out / "entries-converted"
    shutil.rmtree(target, ignore_errors=True)
    cmd = [sys.executable, "-m", "converter.cli", "--input", f"oci:{layout}:v1", "--output", f"oci:{target}:v1_obd",
           "--no-cache", "-d", str(out), "--json"]
    wall0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE)
    stdout = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - wall0
    result = json.loads(stdout)
    shutil.rmtree(target, ignore_errors=True)
    return {"workload": "convert", "ok": result.get("ok"), "exit_status": status, "wall_s": round(wall, 2),
            "files": sum(layer["files"] for m in result.get("manifests", []) for layer in m["layers"]),
            "peak_rss_MB": round(usage.ru_maxrss / 1024)}


def uncompressed_size(path: Path) -> int:
    from isal import igzip

    with igzip.open(path, "rb") as f:
        total = 0
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total


def run(name: str, layer: Path, out: Path) -> dict:
    content = uncompressed_size(layer)
    wall0, main0, tree0 = time.perf_counter(), time.thread_time(), tree_cpu_seconds(os.getpid())
    builder = ImageBuilder()
    with open(layer, "rb") as src, LayerBlobWriter(out / f"{name}.obd", virtual_size=64 << 30, workers=2) as writer:
        stats = builder.apply_layer(src, writer, label=name)
    wall = time.perf_counter() - wall0
    info = writer.info
    os.unlink(info.path)
    return {
        "workload": name,
        "entries": stats.entries,
        "files": stats.files,
        "tar_bytes": content,
        "blob_bytes": info.size,
        "wall_s": round(wall, 2),
        "MB_per_s": round(content / wall / 1e6, 1),
        "files_per_s": round(stats.files / wall),
        "main_thread_cpu_s": round(time.thread_time() - main0, 2),
        "cpu_s_with_compression_workers": round(tree_cpu_seconds(os.getpid()) - tree0, 2),
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "peak_rss_MB_with_compression_workers": round(tree_peak_rss_mb(os.getpid())),
    }


def floor(layer: Path, cores: int) -> dict:
    """Single-thread CPU seconds of the library work the usr workload cannot avoid."""
    import hashlib

    from isal import igzip

    from converter.formats.zfile import ALGO_LZ4, compress_batch

    inflate = compress = hashing = 0.0
    content = compressed = 0
    sha = hashlib.sha256()
    with igzip.open(layer, "rb") as f:
        while True:
            t = time.thread_time()
            chunk = f.read(1 << 20)
            inflate += time.thread_time() - t
            if not chunk:
                break
            content += len(chunk)
            t = time.thread_time()
            parts, _ = compress_batch(chunk, 4096, ALGO_LZ4, True)
            compress += time.thread_time() - t
            out = b"".join(parts)
            compressed += len(out)
            t = time.thread_time()
            sha.update(out)
            hashing += time.thread_time() - t
    wall_floor = (inflate + compress) / cores + hashing
    return {
        "workload": "floor",
        "tar_bytes": content,
        "compressed_bytes": compressed,
        "inflate_cpu_s": round(inflate, 2),
        "lz4_crc_cpu_s": round(compress, 2),
        "sha256_cpu_s": round(hashing, 2),
        "cores": cores,
        "floor_wall_s": round(wall_floor, 2),
        "floor_MB_per_s": round(content / wall_floor / 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", nargs="?", default="all",
                        choices=["usr", "small", "entries", "convert", "floor", "all"])
    parser.add_argument("--entries", type=int, default=1_000_000, help="files for the 'entries' workload")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--dirs", nargs="+", default=DEFAULT_DIRS, help="paths under / to tar for 'usr'")
    args = parser.parse_args()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load_avg": os.getloadavg(), **machine_gauge()}))  # fmt: skip
    if args.workload in ("usr", "all"):
        print(json.dumps(run("usr", build_usr_tar(args.out, args.dirs), args.out)))
    if args.workload in ("small", "all"):
        print(json.dumps(run("small", build_small_tar(args.out), args.out)))
    if args.workload in ("entries", "all"):
        layer = build_entries_tar(args.out, args.entries)
        print(json.dumps(entries(layer, args.out)))
    if args.workload in ("convert", "all"):
        layer = build_entries_tar(args.out, args.entries)
        print(json.dumps(convert_entries(entries_layout(args.out, layer), args.out)))
    if args.workload in ("floor", "all"):
        print(json.dumps(floor(build_usr_tar(args.out, args.dirs), os.cpu_count() or 1)))


if __name__ == "__main__":
    main()
