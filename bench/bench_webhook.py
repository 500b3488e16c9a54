"""Intake benchmark for the webhook front end (issue: >= 1,000 accepted events/s, p99 < 50 ms, none lost).

Starts `obd-webhook serve --no-workers` on 127.0.0.1 with a fresh data dir, then posts Distribution
envelopes (one tagged manifest push each, every one a distinct image, so each must become a job).
Load generator: `wrk` (Debian package `wrk`, used when installed: it costs the 2-core machine far
less CPU than Python) or a Python one (`--tool python`: processes x keep-alive connections).
Afterwards it checks that every event answered 200 is a queued job in the store.

    .venv/bin/python bench/bench_webhook.py [--tool wrk|python] [--seconds 15] [--connections 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-" + uuid.uuid4().hex
MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def body(worker: int, n: int) -> bytes:
    """A pretty-printed single-event envelope like Distribution 2.8 sends."""
    digest = "sha256:" + uuid.uuid4().hex + uuid.uuid4().hex
    event = {
        "id": str(uuid.uuid4()), "timestamp": "2026-11-28T09:46:02.523800865Z", "action": "push",
        "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 555, "digest": digest,
                   "length": 555, "repository": f"bench/app{worker}", "tag": f"t{n}",
                   "url": f"http://127.0.0.1:5000/v2/bench/app{worker}/manifests/{digest}"},
        "request": {"id": str(uuid.uuid4()), "addr": "127.0.0.1:52104", "host": "127.0.0.1:5000",
                    "method": "PUT", "useragent": "skopeo/1.9.3"},
        "actor": {}, "source": {"addr": "vm:5000", "instanceID": "04b951fe-d84e-4886-9cb3-10b016af7e7c"},
    }
    return json.dumps({"events": [event]}, indent=3).encode()


def _thread(port: int, bodies: list[bytes], latencies: list[float], failures: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": MEDIA_TYPE, "Authorization": f"Bearer {SECRET}"}
    for payload in bodies:
        start = time.perf_counter()
        try:
            conn.request("POST", "/hooks/distribution", body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            failures.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            continue
        latencies.append(time.perf_counter() - start)
        if response.status != 200 or b'"accepted":["' not in data:
            failures.append(f"{response.status} {data[:200]!r}")
    conn.close()


def _process(port: int, worker: int, count: int, threads: int, start_at: float,
             out: multiprocessing.Queue) -> None:
    bodies = [body(worker, n) for n in range(count)]  # built before the clock starts
    latencies: list[float] = []
    failures: list[str] = []
    chunks = [bodies[i::threads] for i in range(threads)]
    pool = [threading.Thread(target=_thread, args=(port, chunk, latencies, failures)) for chunk in chunks]
    time.sleep(max(0.0, start_at - time.time()))
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((latencies, failures))


WRK_SCRIPT = r"""
local counter, threads = 0, {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  math.randomseed(os.time() + tid * 7919)
end
request = function()
  counter = counter + 1
  local digest = string.format("sha256:%08d%08d%048d", tid, counter, math.random(1, 2^30))
  local body = '{"events": [{"id": "' .. string.format("%d-%d-%d", tid, counter, math.random(1, 2^30))
    .. '", "timestamp": "2026-11-28T09:46:02.523800865Z", "action": "push", "target": {'
    .. '"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 555, "digest": "' .. digest
    .. '", "length": 555, "repository": "bench/app' .. tid .. '", "tag": "t' .. counter .. '", '
    .. '"url": "http://127.0.0.1:5000/v2/bench/app/manifests/' .. digest .. '"}, "request": {'
    .. '"id": "r", "addr": "127.0.0.1:52104", "host": "127.0.0.1:5000", "method": "PUT", '
    .. '"useragent": "skopeo/1.9.3"}, "actor": {}, "source": {"addr": "vm:5000", "instanceID": "i"}}]}'
  return wrk.format("POST", "/hooks/distribution", {["Content-Type"] = "MEDIA_TYPE",
    ["Authorization"] = "Bearer SECRET"}, body)
end
"""


def run_wrk(port: int, seconds: int, connections: int, workdir: str) -> tuple[int, float, float, float, int]:
    """Returns (requests answered 2xx, requests/s, p50 s, p99 s, non-2xx)."""
    script = Path(workdir) / "post.lua"
    script.write_text(WRK_SCRIPT.replace("MEDIA_TYPE", MEDIA_TYPE).replace("SECRET", SECRET))
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    def field(prefix: str) -> str:
        return next(line for line in out.splitlines() if line.strip().startswith(prefix)).split()

    def seconds_of(text: str) -> float:
        for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
            if text.endswith(unit):
                return float(text[: -len(unit)]) * scale
        raise ValueError(text)

    total = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
    bad_lines = [line for line in out.splitlines() if "Non-2xx" in line]
    bad = int(bad_lines[0].split()[-1]) if bad_lines else 0
    errors = [line for line in out.splitlines() if "Socket errors" in line]
    if errors:
        print("wrk:", errors[0].strip())
    return (total - bad, float(field("Requests/sec:")[1]), seconds_of(field("50%")[1]),
            seconds_of(field("99%")[1]), bad)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"obd-webhook serve exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    sys.exit("obd-webhook serve did not become ready")


def store_counts(port: int) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/v1/conversions?limit=1", headers={"Authorization": f"Bearer {SECRET}"})
    return json.loads(conn.getresponse().read())["counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python")
    parser.add_argument("--seconds", type=int, default=15, help="wrk run length")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--events", type=int, default=20000, help="python generator: events to send")
    parser.add_argument("--procs", type=int, default=2, help="python generator: processes")
    parser.add_argument("--threads", type=int, default=4, help="python generator: connections per process")
    parser.add_argument("--http-workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--http-threads", type=int, default=8, help="threads per gunicorn worker")
    parser.add_argument("--synchronous", default="NORMAL", help="SQLite synchronous (NORMAL or FULL)")
    args = parser.parse_args()

    port = free_port()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="obd-bench-") as data_dir:
        env = {**os.environ, "OBD_WEBHOOK_DATA_DIR": data_dir, "OBD_WEBHOOK_LISTEN": f"127.0.0.1:{port}",
               "OBD_WEBHOOK_SECRETS": SECRET, "OBD_WEBHOOK_HTTP_WORKERS": str(args.http_workers),
               "OBD_WEBHOOK_HTTP_THREADS": str(args.http_threads), "OBD_WEBHOOK_LOG_LEVEL": "WARNING",
               "OBD_WEBHOOK_SQLITE_SYNCHRONOUS": args.synchronous}
        server = subprocess.Popen([sys.executable, "-m", "webhook.cli", "serve", "--no-workers"], env=env,
                                  cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        load_before = os.getloadavg()[0]
        try:
            wait_ready(port, server)
            if args.tool == "wrk":
                answered, rate, p50, p99, bad = run_wrk(port, args.seconds, args.connections, data_dir)
                if bad:
                    failures.append(f"{bad} non-2xx answers")
                generator = f"wrk 2 threads x {args.connections} connections, {args.seconds} s"
            else:
                answered, rate, p50, p99 = run_python(port, args, failures)
                generator = f"python {args.procs} procs x {args.threads} connections"
            time.sleep(1.0)  # let requests still in flight when wrk stopped finish
            counts = store_counts(port)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)

    queued = counts["queued"]
    # wrk stops with up to `connections` requests in flight: the server may have stored those too.
    in_flight = args.connections if args.tool == "wrk" else 0
    lost = max(0, answered - queued)
    print(f"machine: {os.cpu_count()} cpus, {cpu_model()}; load average before the run {load_before:.2f}")
    print(f"server: gunicorn {args.http_workers} workers x {args.http_threads} threads, sqlite "
          f"synchronous={args.synchronous}; generator: {generator}")
    print(f"answered 200 with a job: {answered}, failures: {len(failures)}")
    print(f"throughput: {rate:,.0f} accepted events/s")
    print(f"latency: p50 {1000 * p50:.2f} ms, p99 {1000 * p99:.2f} ms")
    print(f"jobs queued in the store: {queued} (answered but missing: {lost}; "
          f"stored beyond answered: {queued - answered}, at most {in_flight} in flight allowed)")
    if failures:
        print("first failures:", failures[:3])
    ok = not failures and lost == 0 and queued - answered <= in_flight and rate >= 1000 and p99 < 0.050
    print("RESULT:", "PASS" if ok else "FAIL", "(>= 1000 events/s, p99 < 50 ms, none lost)")
    sys.exit(0 if ok else 1)


def run_python(port: int, args: argparse.Namespace, failures: list[str]) -> tuple[int, float, float, float]:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    per_proc = args.events // args.procs
    start_at = time.time() + 2.0 + per_proc / 20000  # after every generator has built its bodies
    procs = [multiprocessing.Process(target=_process, args=(port, w, per_proc, args.threads, start_at, queue))
             for w in range(args.procs)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    elapsed = time.time() - start_at
    for p in procs:
        p.join()
    latencies = [v for lat, _ in results for v in lat]
    failures.extend(f for _, fail in results for f in fail)
    return (len(latencies) - len(failures), len(latencies) / elapsed, percentile(latencies, 0.5),
            percentile(latencies, 0.99))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
