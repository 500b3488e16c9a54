"""ZFile compression in worker processes (converter/formats/zworkers.py): same bytes as the thread path,
the automatic switch, sharing between writers, and what happens when a worker dies."""

from __future__ import annotations

import io
import os
import signal
import threading
from pathlib import Path

import pytest

from converter.formats import zfile, zworkers
from converter.formats.common import FileView, FormatError
from converter.formats.layer import LayerBlobWriter
from converter.formats.stack import StackedReader
from converter.formats.zfile import ZFileReader, ZFileWriter

MIB = 1 << 20


def data(mib: int, seed: int = 0) -> bytes:
    """Text-like and random MiBs alternating, each worker batch a different mix."""
    text = b"".join(b"%d: a line of log text for block %d\n" % (seed, i) for i in range(mib * MIB // 30 + 1))
    rnd = os.urandom(mib * MIB)
    return b"".join((text if i % 3 else rnd)[i * MIB:(i + 1) * MIB] for i in range(mib))


def write(payload: bytes, path: Path | None = None, *, piece: int = 300_000, **kw: object) -> bytes:
    """Compress `payload` in unaligned pieces into a file (the os.writev path) or a BytesIO (write())."""
    out = open(path, "w+b", buffering=0) if path else io.BytesIO()  # noqa: SIM115
    with out:
        writer = ZFileWriter(out, workers=2, **kw)
        for i in range(0, len(payload), piece):
            writer.write(payload[i:i + piece])
        writer.close()
        if path:
            return path.read_bytes()
        return out.getvalue()


@pytest.fixture(autouse=True)
def fresh_workers():
    """Every test starts without workers and leaves none behind."""
    zworkers._shutdown()
    yield
    zworkers._shutdown()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_worker_processes_write_the_same_bytes_as_threads(tmp_path: Path, algorithm: str) -> None:
    payload = data(6)
    threads = write(payload, algorithm=algorithm, processes=False)
    assert zworkers._shared is None, "processes=False must not start workers"
    procs_file = write(payload, tmp_path / "p.zfile", algorithm=algorithm, processes=True)
    assert zworkers._shared is not None and zworkers._shared.alive
    procs_bytesio = write(payload, algorithm=algorithm, processes=True)
    assert procs_file == threads and procs_bytesio == threads
    reader = ZFileReader(FileView(tmp_path / "p.zfile"))
    assert reader.pread(0, len(payload)) == payload
    assert reader.verify_all_blocks() == len(payload) // 4096


def test_automatic_switch_mid_stream_keeps_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zfile, "PROCESS_THRESHOLD", 3 * MIB)
    payload = data(9, seed=1)
    switched = write(payload, tmp_path / "s.zfile", block_size=16384)
    assert zworkers._shared is not None, "9 MiB is past the threshold: workers must have been used"
    assert switched == write(payload, block_size=16384, processes=False)


def test_small_blobs_stay_on_threads() -> None:
    write(data(2))  # below PROCESS_THRESHOLD
    assert zworkers._shared is None


def test_workers_are_reused_and_a_concurrent_writer_falls_back_to_threads(tmp_path: Path) -> None:
    payload_a, payload_b = data(4, seed=2), data(4, seed=3)
    first = ZFileWriter(io.BytesIO(), workers=2, processes=True)
    first.write(payload_a[:MIB])  # holds the workers until close
    pids = [w.proc.pid for w in zworkers._shared._workers]
    results: dict[str, bytes] = {}
    thread = threading.Thread(target=lambda: results.update(b=write(payload_b, processes=True)))
    thread.start()
    thread.join(60)
    assert results["b"] == write(payload_b, processes=False)
    first.write(payload_a[MIB:])
    first.close()
    write(payload_a, processes=True)
    assert [w.proc.pid for w in zworkers._shared._workers] == pids, "the next writer reuses the workers"


def test_killed_worker_fails_the_blob_and_the_next_blob_gets_new_workers(tmp_path: Path) -> None:
    path = tmp_path / "layer.obd"
    payload = data(8, seed=4)
    with (pytest.raises(FormatError, match=r"compression worker \d+ exited unexpectedly"),
          LayerBlobWriter(path, virtual_size=1 << 30, workers=2) as writer):
        writer.write(0, bytes(zfile.PROCESS_THRESHOLD))
        writer.write(zfile.PROCESS_THRESHOLD, payload[:2 * MIB])  # now on the workers
        dead = zworkers._shared._workers[0].proc
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        for i in range(20):
            writer.write((20 + i) * MIB, payload[:MIB])
    assert not path.exists(), "a failed blob is removed, never left half-written"
    assert zworkers._shared is None
    fresh = data(20, seed=5)
    with LayerBlobWriter(path, virtual_size=1 << 30, workers=2) as writer:
        writer.write(0, fresh)
    assert zworkers._shared is not None and zworkers._shared.alive
    with StackedReader([path]) as stack:
        assert stack.pread(0, len(fresh)) == fresh


def test_workers_exit_when_the_parent_closes_their_pipes() -> None:
    write(data(2), processes=True)
    procs = [w.proc for w in zworkers._shared._workers]
    zworkers._shutdown()
    assert [p.wait(10) for p in procs] == [0, 0]


def test_workers_leave_ctrl_c_to_the_parent() -> None:
    """Ctrl-C goes to the whole process group; the parent aborts the blob, the workers must not die
    with a traceback of their own."""
    payload = data(3, seed=6)
    write(payload, processes=True)
    procs = [w.proc for w in zworkers._shared._workers]
    for proc in procs:
        os.kill(proc.pid, signal.SIGINT)
    assert write(payload, processes=True) == write(payload, processes=False)
    assert [w.proc for w in zworkers._shared._workers] == procs and zworkers._shared.alive


@pytest.mark.parametrize("processes", [False, True])
def test_immutable_input_is_kept_by_reference_mutable_input_is_copied(processes: bool, tmp_path: Path) -> None:
    """bytes (and views of bytes) wait in the pending batch uncopied; a bytearray the caller reuses must
    not change what was written before."""
    payload = data(3)
    out = io.BytesIO()
    writer = ZFileWriter(out, workers=2, processes=processes)
    buffer = bytearray(100_000)
    for i in range(0, len(payload), 100_000):
        piece = payload[i:i + 100_000]
        if (i // 100_000) % 2:
            writer.write(memoryview(piece)[: len(piece)])  # a view of immutable bytes
        else:
            buffer[: len(piece)] = piece
            writer.write(memoryview(buffer)[: len(piece)])
            buffer[:] = bytes(len(buffer))  # the caller reuses its buffer at once
    if writer._pending:
        assert any(isinstance(p.obj, bytes) for p in writer._pending)
    writer.close()
    (tmp_path / "z").write_bytes(out.getvalue())
    reader = ZFileReader(FileView(tmp_path / "z"))
    assert reader.pread(0, len(payload)) == payload


@pytest.mark.parametrize(("algorithm", "block_size", "verify"), [("lz4", 4096, True), ("zstd", 16384, True),
                                                                  ("lz4", 65536, False)])
def test_compress_batch_into_writes_what_compress_batch_returns(algorithm: str, block_size: int, verify: bool) -> None:
    algo = zfile.ALGORITHMS[algorithm]
    batch = data(1)[: MIB - 1000]  # a partial last block too
    parts, lengths = zfile.compress_batch(batch, block_size, algo, verify)
    region = bytearray(3 * MIB)
    region[100:100 + len(batch)] = batch
    got = zfile.compress_batch_into(region, 100, len(batch), MIB + 7, 3 * MIB, block_size, algo, verify)
    assert list(got) == list(lengths)
    assert bytes(region[MIB + 7:MIB + 7 + sum(lengths)]) == b"".join(parts)
    with pytest.raises(FormatError, match="exceeds its output room of 1000 bytes"):
        zfile.compress_batch_into(region, 100, len(batch), MIB + 7, MIB + 1007, block_size, algo, verify)
