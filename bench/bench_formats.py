"""Throughput and memory of the layer pipeline: LSMT -> ZFile (LZ4, 4 KiB, verify) -> tar -> sha256, and the
read back through the stacked reader.

    .venv/bin/python bench/bench_formats.py [--size-mib 1024] [--workers 2] [--algorithm lz4]

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
import tempfile
import time
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


def main() -> None:
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
