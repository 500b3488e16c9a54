"""Throughput and memory of the layer pipeline: LSMT -> ZFile (LZ4, 4 KiB, verify) -> tar -> sha256, and the
read back through the stacked reader.

    .venv/bin/python bench/bench_formats.py [--size-mib 1024] [--workers 2] [--algorithm lz4]
    .venv/bin/python bench/bench_formats.py gzindex [--layer PATH] [--out bench/out] [--reads 2000]

`gzindex` measures the turbo path's decompression (gzip.meta built in the same pass, formats/gzstream.py)
on the /usr layer of bench_ext4.py (built under --out if missing): alone, next to a thread that runs
Python all the time (as the ext4 builder does), the in-thread GzipIndexer for comparison (zlib-ng and
system-zlib backends), the plain inflate of ISA-L, zlib and zlib-ng as floors, and random 64 KiB reads
through the finished index.

Input: --size-mib of mixed data written in 1 MiB chunks at consecutive offsets (as the ext4 builder
writes file data), alternating a text-like chunk (log lines, compresses ~2.4x) and a random chunk
(incompressible). Targets (issue 3): write >= 600 MB/s wall with 2 workers, read >= 800 MB/s, peak RSS
< 200 MB. The load average is printed too: other work on the machine skews the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from _gauge import machine_gauge
from _proctree import tree_cpu_seconds, tree_peak_rss_mb

from converter.formats.layer import LayerBlobWriter
from converter.formats.stack import StackedReader

CHUNK = 1 << 20
POOL_CHUNKS = 16  # distinct chunks of each kind, reused round-robin (blocks are compressed independently)


def text_chunk(rng: random.Random) -> bytes:
    lines = []
    size = 0
    while size < CHUNK:
        line = (b"2026-11-28T10:%02d:%02d.%06d INFO [worker-%d] request id=%08x path=/api/v1/items/%d "
                b"status=%d bytes=%d\n" % (rng.randrange(60), rng.randrange(60), rng.randrange(10**6),
                                           rng.randrange(16), rng.getrandbits(32), rng.randrange(100000),
                                           rng.choice([200, 200, 200, 404, 500]), rng.randrange(100000)))
        lines.append(line)
        size += len(line)
    return b"".join(lines)[:CHUNK]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _cpu_with_exited_children() -> float:
    """CPU seconds of this process and of its children that have exited (the gzip index child is
    waited for before _timed's fn returns)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn: Callable[[], object], *, busy: bool = False) -> dict[str, float]:
    """Wall and process-tree CPU seconds of fn(), optionally next to a thread that never stops running
    Python (its CPU is included)."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=spin) if busy else None
    if spinner:
        spinner.start()
    t0, c0 = time.perf_counter(), _cpu_with_exited_children()
    try:
        fn()
    finally:
        wall, cpu = time.perf_counter() - t0, _cpu_with_exited_children() - c0
        stop.set()
        if spinner:
            spinner.join()
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


def gzindex_main(argv: list[str]) -> None:
    from bench_ext4 import DEFAULT_DIRS, build_usr_tar

    from converter.formats.common import FileView
    from converter.formats.gzindex import GzipIndex, GzipIndexer
    from converter.formats.gzstream import GzipIndexStream

    ap = argparse.ArgumentParser(prog="bench_formats.py gzindex")
    ap.add_argument("--layer", type=Path, default=None, help="a gzip layer (default: the usr layer of bench_ext4)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    ap.add_argument("--reads", type=int, default=2000)
    args = ap.parse_args(argv)
    layer = args.layer or build_usr_tar(args.out, DEFAULT_DIRS)
    compressed = layer.stat().st_size
    result: dict[str, object] = {"layer": str(layer), "compressed_bytes": compressed,
                                 "loadavg_1min_before": os.getloadavg()[0]}
    state: dict[str, object] = {}

    def indexing_process() -> None:
        with open(layer, "rb") as f, GzipIndexStream(f) as stream:
            n = 0
            while chunk := stream.read():
                n += len(chunk)
            state["size"], state["index"] = n, stream.index_file()

    def indexing_thread(backend: str | None = None) -> None:
        with open(layer, "rb") as f:
            indexer = GzipIndexer(f.read, backend=backend)
            while indexer.read():
                pass
            indexer.index_file()
            indexer.close()

    def isal_floor() -> None:
        from isal import igzip

        with open(layer, "rb") as f:
            gz = igzip._IGzipReader(f, buffersize=8 << 20)
            while gz.read(8 << 20):
                pass

    def zlib_floor(module: object = zlib) -> None:
        d = module.decompressobj(47)  # type: ignore[attr-defined]
        with open(layer, "rb") as f:
            while piece := f.read(8 << 20):
                d.decompress(piece)

    from zlib_ng import zlib_ng

    runs = (("process", indexing_process, False), ("process_next_to_busy_python", indexing_process, True),
            ("thread", indexing_thread, False), ("thread_next_to_busy_python", indexing_thread, True),
            ("thread_system_zlib_backend", lambda: indexing_thread("zlib"), False),
            ("isal_inflate_floor", isal_floor, False), ("zlib_inflate_floor", zlib_floor, False),
            ("zlib_ng_inflate_floor", lambda: zlib_floor(zlib_ng), False))
    for name, fn, busy in runs:
        timing = _timed(fn, busy=busy)
        timing["MBps"] = round(int(state.get("size", 0)) / timing["wall_s"] / 1e6, 1) if state else 0.0
        result[name] = timing
    index = GzipIndex(state["index"], name="gzip.meta")  # type: ignore[arg-type]
    result.update(uncompressed_bytes=state["size"], index_entries=index.header.index_num,
                  index_bytes=len(state["index"]))  # type: ignore[arg-type]
    view = FileView(layer)
    index.attach(view)
    rng = random.Random(1)
    t0 = time.perf_counter()
    for _ in range(args.reads):
        index.pread(rng.randrange(index.uncompressed_size - 65536), 65536)
    view.close()
    result["random_64k_reads_per_s"] = round(args.reads / (time.perf_counter() - t0), 1)
    result["peak_rss_mb_tree"] = round(tree_peak_rss_mb(os.getpid()), 1)
    result["loadavg_1min_after"] = os.getloadavg()[0]
    result.update(machine_gauge())
    print(json.dumps(result, indent=2))


def main() -> None:
    if sys.argv[1:2] == ["gzindex"]:
        gzindex_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--algorithm", default="lz4", choices=["lz4", "zstd"])
    ap.add_argument("--read-chunk-mib", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to put the blob (default: a temp dir)")
    args = ap.parse_args()

    rng = random.Random(42)
    texts = [text_chunk(rng) for _ in range(POOL_CHUNKS)]
    randoms = [rng.randbytes(CHUNK) for _ in range(POOL_CHUNKS)]
    total = args.size_mib * CHUNK
    rss_before = peak_rss_mb()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "layer.obd"
        t0, c0 = time.perf_counter(), tree_cpu_seconds(os.getpid())
        with LayerBlobWriter(path, virtual_size=64 << 30, workers=args.workers,
                             algorithm=args.algorithm) as writer:
            for i in range(args.size_mib):
                pool = texts if i % 2 == 0 else randoms
                writer.write(i * CHUNK, pool[(i // 2) % POOL_CHUNKS])
            info = writer.close()
        t_write, cpu_write = time.perf_counter() - t0, tree_cpu_seconds(os.getpid()) - c0
        rss_write = peak_rss_mb()

        t0, c0 = time.perf_counter(), time.process_time()
        step = args.read_chunk_mib * CHUNK
        with StackedReader([path]) as stack:
            for off in range(0, total, step):
                data = stack.pread(off, min(step, total - off))
                for k in range(0, len(data), CHUNK):  # the read back must equal what was written
                    i = (off + k) // CHUNK
                    if data[k:k + CHUNK] != (texts if i % 2 == 0 else randoms)[(i // 2) % POOL_CHUNKS]:
                        raise SystemExit(f"read back mismatch in MiB {i}")
        t_read, cpu_read = time.perf_counter() - t0, time.process_time() - c0

    result = {
        "input_mib": args.size_mib,
        "workers": args.workers,
        "algorithm": args.algorithm,
        "blob_bytes": info.size,
        "ratio": round(info.size / total, 3),
        "write_s": round(t_write, 3),
        "write_MBps": round(total / t_write / 1e6, 1),
        "write_cpu_s": round(cpu_write, 3),
        "read_s": round(t_read, 3),
        "read_cpu_s": round(cpu_read, 3),
        "read_MBps": round(total / t_read / 1e6, 1),
        "peak_rss_mb_after_input_pool": round(rss_before, 1),
        "peak_rss_mb_after_write": round(rss_write, 1),
        "peak_rss_mb_total": round(peak_rss_mb(), 1),
        "peak_rss_mb_with_compression_workers": round(tree_peak_rss_mb(os.getpid()), 1),
        "loadavg_1min": os.getloadavg()[0],
        **machine_gauge(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
