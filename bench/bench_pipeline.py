#!/usr/bin/env python3
"""End-to-end conversion benchmark: a 3-layer image of about 2 GB uncompressed, local registry in and out.

    .venv/bin/python bench/bench_pipeline.py              # build layers (cached in bench/out), run, print a table
    .venv/bin/python bench/bench_pipeline.py --json       # machine-readable
    .venv/bin/python bench/bench_pipeline.py --small      # ~300 MB variant for a quick check

Layers are real files from this machine (GNU tar, gzip via ISA-L): a Debian-like base (/etc, /usr/bin,
/usr/sbin, /usr/lib/x86_64-linux-gnu, the Python stdlib), a /usr-like layer (/usr/share, LLVM) and a small app
layer (this checkout's sources). They are pushed once to a throwaway `docker-registry`, then converted by
`converter.pipeline.convert` in a child process, which reports its own peak RSS (VmHWM) and CPU seconds; the
parent samples the temp directory's allocated size every 50 ms and the registry's CPU seconds.

Runs: (1) cold conversion, empty cache; (2) re-conversion of the up-to-date tag; (3) --force with the cache
present (rebuilds everything: the worst case after an options change).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out" / "pipeline"
LAYERS = {
    "full": [
        ("base", ["/etc", "/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/lib/python3.11"]),
        ("usr", ["/usr/share", "/usr/lib/llvm-14"]),
        ("app", [str(ROOT / "converter"), str(ROOT / "webhook"), str(ROOT / "tests")]),
    ],
    "small": [
        ("base", ["/etc", "/usr/bin"]),
        ("usr", ["/usr/lib/python3.11"]),
        ("app", [str(ROOT / "converter")]),
    ],
}


def build_layer(name: str, paths: list[str], dest: Path) -> dict:
    """tar (GNU, no atime games) -> sha256 (diff_id) -> ISA-L gzip level 3; cached by name."""
    meta = dest.with_suffix(".json")
    if meta.exists() and dest.exists():
        return json.loads(meta.read_text())
    from isal import igzip

    present = [p for p in paths if os.path.exists(p)]
    tar = subprocess.Popen(["tar", "-cf", "-", "--ignore-failed-read", "--warning=no-file-changed",
                            "--exclude=__pycache__", "--sort=name", *present], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    assert tar.stdout is not None
    diff = hashlib.sha256()
    size = 0
    with igzip.open(dest, "wb", compresslevel=3) as gz:
        for chunk in iter(lambda: tar.stdout.read(4 << 20), b""):
            diff.update(chunk)
            gz.write(chunk)
            size += len(chunk)
    tar.wait()
    digest = "sha256:" + hashlib.sha256(dest.read_bytes()).hexdigest()
    info = {"name": name, "diff_id": "sha256:" + diff.hexdigest(), "tar_bytes": size, "digest": digest,
            "size": dest.stat().st_size}
    meta.write_text(json.dumps(info))
    return info


def push_image(client, repo: str, tag: str, layers: list[tuple[Path, dict]]) -> str:
    from tests.harness import oci

    descs = []
    for path, info in layers:
        with open(path, "rb") as f:
            client.upload_blob(repo, f, digest=info["digest"], size=info["size"])
        descs.append({"mediaType": oci.LAYER_TYPES["docker"]["gzip"], "digest": info["digest"], "size": info["size"]})
    config = oci.canonical_json({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                                 "rootfs": {"type": "layers", "diff_ids": [i["diff_id"] for _, i in layers]},
                                 "history": [{"created_by": name} for name in ("base", "usr", "app")]})
    client.upload_blob(repo, config)
    manifest = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST,
                                   "config": {"mediaType": oci.DOCKER_CONFIG, "digest": oci.sha256(config),
                                              "size": len(config)}, "layers": descs})
    return client.put_manifest(repo, tag, manifest, oci.DOCKER_MANIFEST)


def allocated(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # the pipeline deletes blobs after upload
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(args: argparse.Namespace) -> None:
    """Run one conversion in this process; print the result plus VmHWM and CPU seconds."""

    from converter.pipeline import convert

    start = time.monotonic()
    result = convert(args.source, args.target, {"registry": {"plain_http": True}, "cache_dir": args.cache_dir,
                                                 "work_dir": args.work_dir, "force": args.force})
    wall = time.monotonic() - start
    # the ZFile compression worker processes are still alive: count them through /proc
    from _proctree import tree_cpu_seconds, tree_peak_rss_mb

    print(json.dumps({"wall": wall, "cpu": tree_cpu_seconds(os.getpid()),
                      "peak_rss": int(tree_peak_rss_mb(os.getpid()) * 1024 * 1024),
                      "result": result.to_json()}))


def measure(source: str, target: str, cache_dir: Path, work_dir: Path, registry_pid: int, *, force: bool) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], allocated(work_dir))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    reg_cpu = proc_cpu(registry_pid)
    cmd = [sys.executable, __file__, "--child", "--source", source, "--target", target, "--cache-dir",
           str(cache_dir), "--work-dir", str(work_dir)] + (["--force"] if force else [])
    started = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    total_wall = time.monotonic() - started
    done.set()
    sampler.join()
    if run.returncode != 0:
        raise SystemExit(f"conversion failed:\n{run.stderr}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out.update(process_wall=total_wall, temp_peak=peak[0], registry_cpu=proc_cpu(registry_pid) - reg_cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="about 300 MB instead of 2 GB")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from _gauge import machine_gauge

    from converter.registry import RegistryClient
    from tests.harness.registry import start_registry

    variant = "small" if args.small else "full"
    out = OUT / variant
    out.mkdir(parents=True, exist_ok=True)
    layers = [(out / f"{name}.tar.gz", build_layer(name, paths, out / f"{name}.tar.gz"))
              for name, paths in LAYERS[variant]]
    tar_bytes = sum(info["tar_bytes"] for _, info in layers)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-", dir=out) as tmp:
        tmp_path = Path(tmp)
        registry = start_registry(tmp_path / "registry")
        try:
            with RegistryClient(registry.host, plain_http=True) as client:
                push_image(client, "bench/app", "v1", layers)
            source, target = f"{registry.host}/bench/app:v1", f"{registry.host}/bench/app:v1_obd"
            cache = tmp_path / "cache"
            runs = {
                "cold": measure(source, target, cache, tmp_path / "work", registry.process.pid, force=False),
                "up_to_date": measure(source, target, cache, tmp_path / "work", registry.process.pid, force=False),
                "forced": measure(source, target, cache, tmp_path / "work", registry.process.pid, force=True),
            }
        finally:
            registry.stop()
    report = {"variant": variant, "tar_bytes": tar_bytes, "layers": [info for _, info in layers],
              "machine": subprocess.run(["sh", "-c", "lscpu | grep 'Model name'; nproc; cat /proc/loadavg"],
                                        capture_output=True, text=True).stdout.split("\n"),
              "gauge": machine_gauge(), "runs": runs}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"image: {len(layers)} layers, {tar_bytes / 1e6:.0f} MB uncompressed, "
          f"{sum(i['size'] for _, i in layers) / 1e6:.0f} MB gzip; load {report['machine'][-2]}")
    print("machine gauge (bench/_gauge.py): " + ", ".join(f"{k} {v}" for k, v in report["gauge"].items()))
    print(f"{'run':<12}{'wall s':>8}{'MB/s':>8}{'CPU s':>8}{'reg CPU s':>10}{'peak RSS MB':>12}{'temp MB':>9}"
          f"{'largest blob MB':>16}")
    for name, r in runs.items():
        blobs = [x["size"] for m in r["result"]["manifests"] for x in m["layers"]]
        print(f"{name:<12}{r['wall']:>8.2f}{tar_bytes / 1e6 / r['wall']:>8.0f}{r['cpu']:>8.1f}"
              f"{r['registry_cpu']:>10.1f}{r['peak_rss'] / 2**20:>12.0f}{r['temp_peak'] / 1e6:>9.0f}"
              f"{max(blobs, default=0) / 1e6:>16.0f}")
    shutil.rmtree(OUT / variant / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
