#!/usr/bin/env python3
"""Registry client throughput and peak memory: upload a generated blob, then download and verify it.

    .venv/bin/python bench/bench_registry.py                    # 1 GiB against a throwaway local registry
    .venv/bin/python bench/bench_registry.py --size 300M --variant tls-basic
    .venv/bin/python bench/bench_registry.py --host 127.0.0.1:5000 --plain-http --size 1G --json

The upload is a stream whose digest is only known at its end (POST + PATCH chunks + PUT ?digest=);
the download is digest- and size-verified. Peak RSS is the process's ru_maxrss: it includes the
interpreter and imports, and must not grow with the blob size (VmHWM on Linux, else ru_maxrss).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter.registry import RegistryClient
from converter.registry.client import CHUNK_SIZE

BLOCK = 1024 * 1024


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def generated(size: int, seed: bytes):
    """``size`` pseudo-random bytes in 1 MiB pieces, cheap to make: one random block, a counter per piece."""
    block = bytearray(hashlib.shake_256(seed).digest(BLOCK))
    for index in range(0, size, BLOCK):
        block[:8] = index.to_bytes(8, "little")
        yield bytes(block[: min(BLOCK, size - index)])


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux carries ru_maxrss over from the parent across fork+exec (a
    child of a big pytest process would report the parent's size), so VmHWM is read when present."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(client: RegistryClient, size: int, repo: str) -> dict:
    seed = os.urandom(16)
    started = time.monotonic()
    digest = client.upload_blob(repo, generated(size, seed))
    upload_s = time.monotonic() - started
    rss_after_upload = peak_rss_mb()
    expected = hashlib.sha256()
    for piece in generated(size, seed):
        expected.update(piece)
    if digest != f"sha256:{expected.hexdigest()}":
        raise SystemExit(f"upload returned {digest}, expected sha256:{expected.hexdigest()}")
    started = time.monotonic()
    received = 0
    with client.open_blob(repo, digest, size) as stream:  # raises on a digest or size mismatch
        for chunk in stream:
            received += len(chunk)
    download_s = time.monotonic() - started
    return {"size": size, "digest": digest, "chunk_size": client.chunk_size,
            "upload_s": round(upload_s, 2), "upload_MBps": round(size / upload_s / 1e6, 1),
            "download_s": round(download_s, 2), "download_MBps": round(received / download_s / 1e6, 1),
            "peak_rss_after_upload_MB": round(rss_after_upload, 1), "peak_rss_MB": round(peak_rss_mb(), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="blob size, e.g. 300M, 1G (default 1G)")
    parser.add_argument("--host", help="registry host:port (default: start a throwaway local registry)")
    parser.add_argument("--plain-http", action="store_true")
    parser.add_argument("--ca-file")
    parser.add_argument("--user", help="USER:PASSWORD")
    parser.add_argument("--variant", choices=["plain", "tls-basic", "token"], default="plain",
                        help="kind of throwaway registry when --host is not given")
    parser.add_argument("--repo", default="bench/blob")
    parser.add_argument("--chunk-size", default=str(CHUNK_SIZE))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    size, chunk_size = parse_size(args.size), parse_size(args.chunk_size)

    registry = None
    if args.host:
        client = RegistryClient(args.host, plain_http=args.plain_http, ca_file=args.ca_file, credentials=args.user,
                                chunk_size=chunk_size)
    else:
        from tests.harness.registry import start_registry

        auth = {"plain": "none", "tls-basic": "htpasswd", "token": "token"}[args.variant]
        registry = start_registry(Path(tempfile.mkdtemp(prefix="bench-registry-")), auth=auth,
                                  tls=args.variant == "tls-basic")
        creds = f"{registry.username}:{registry.password}" if registry.username else None
        client = RegistryClient(registry.host, plain_http=not registry.tls, ca_file=registry.ca_file,
                                credentials=creds, chunk_size=chunk_size)
    try:
        result = run(client, size, args.repo)
    finally:
        client.close()
        if registry:
            registry.stop()
            import shutil

            shutil.rmtree(registry.workdir, ignore_errors=True)
    result["variant"] = "external" if args.host else args.variant
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
