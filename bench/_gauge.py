"""How fast this machine's cores are right now, for the benchmarks' headers.

The project's 2-vCPU VM changes speed from hour to hour: identical work has taken anywhere from 1x to 2x
the CPU seconds (other tenants, throttling). A benchmark result means little without knowing which
state the machine was in, so every benchmark prints this gauge: three fixed single-thread workloads
that stand for what a conversion spends its CPU on. On the VM at full speed they read about
sha256 1,400 MB/s, LZ4 (4 KiB blocks) 800-1,000 MB/s, Python 10 M loop steps/s.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time


def machine_gauge() -> dict[str, float]:
    """The gauge, measured in a child process (about a second) so that its memory does not count in the
    benchmark's own peak RSS."""
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _measure() -> dict[str, float]:
    rng = random.Random(7)
    text = b"".join(b"%d INFO worker-%d request id=%08x status=%d\n"
                    % (i, rng.randrange(16), rng.getrandbits(32), rng.choice([200, 404])) for i in range(400_000))
    data = (text[: 8 << 20] + rng.randbytes(8 << 20)) * 2  # 32 MiB, half compressible
    import lz4.block

    view = memoryview(data)
    t = time.process_time()
    for i in range(0, len(view), 4096):
        lz4.block.compress(view[i:i + 4096], store_size=False)
    lz4_mbps = len(data) / (time.process_time() - t) / 1e6
    t = time.process_time()
    h = hashlib.sha256()
    for _ in range(8):
        h.update(data)
    sha_mbps = 8 * len(data) / (time.process_time() - t) / 1e6
    t = time.process_time()
    x = 0
    for i in range(2_000_000):
        x += i
    py_msteps = 2.0 / (time.process_time() - t)
    return {"gauge_sha256_MBps": round(sha_mbps), "gauge_lz4_4k_MBps": round(lz4_mbps),
            "gauge_python_Msteps_per_s": round(py_msteps, 1), "load_avg_1min": round(os.getloadavg()[0], 2)}


if __name__ == "__main__":
    print(json.dumps(_measure()))
