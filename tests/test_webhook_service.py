"""A real `obd-webhook serve` process: durability under kill -9, graceful SIGTERM, split deployment."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
import requests

from tests.test_webhook_support import (
    AUTH,
    DISTRIBUTION_V1,
    ROOT,
    ServeProcess,
    distribution_event,
    envelope,
    read_records,
    wait_until,
)
from webhook.cli import main

RECORDING = "tests.test_webhook_support:recording_convert"


def service_env(record: Path, convert_seconds: float, **extra: str) -> dict[str, str]:
    return {"OBD_WEBHOOK_CONVERT_CALLABLE": RECORDING, "OBD_TEST_RECORD": str(record),
            "OBD_TEST_CONVERT_SECONDS": str(convert_seconds), "OBD_WEBHOOK_LEASE_SECONDS": "2",
            **extra}


def jobs(service: ServeProcess) -> list[dict]:
    response = requests.get(service.url + "/api/v1/conversions?limit=1000", headers=AUTH, timeout=10)
    response.raise_for_status()
    return response.json()["jobs"]


def post(service: ServeProcess, event: dict) -> requests.Response:
    return requests.post(service.url + "/hooks/distribution", data=envelope(event), timeout=5,
                         headers={**AUTH, "Content-Type": DISTRIBUTION_V1})


def test_burst_of_200_with_kill9_then_restart_converts_every_accepted_event_once(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    env = service_env(record, 0.01, OBD_WEBHOOK_WORKERS="2")
    service = ServeProcess(tmp_path / "data", env).start()
    events = [distribution_event(repository=f"burst/app{i % 20}", tag=f"t{i}") for i in range(200)]
    acknowledged: set[str] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def sender(chunk: list[dict]) -> None:
        for event in chunk:
            try:
                ok = post(service, event).status_code == 200
            except requests.RequestException:
                ok = False  # killed mid-request: the registry would resend it
            if ok:
                with lock:
                    acknowledged.add(event["id"])
                    kill_now = len(acknowledged) >= 100 and not killed.is_set()
                    if kill_now:
                        killed.set()
                if kill_now:  # while the other senders keep posting
                    service.kill9()

    try:
        threads = [threading.Thread(target=sender, args=(events[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert killed.is_set()
        killed_pids = {r["pid"] for r in read_records(record)}
        assert 100 <= len(acknowledged) < 200, "the kill should land in the middle of the burst"

        service = ServeProcess(tmp_path / "data", env).start()
        # The registry redelivers what was not acknowledged, and (at-least-once) some that were.
        unacknowledged = [e for e in events if e["id"] not in acknowledged]
        redelivered = [e for e in events if e["id"] in acknowledged][:20]
        for event in unacknowledged + redelivered:
            assert post(service, event).status_code == 200
        wait_until(lambda: Counter(j["state"] for j in jobs(service))["succeeded"] == 200, timeout=120,
                   interval=0.5, what="200 succeeded jobs")
        all_jobs = jobs(service)
        assert sorted(j["event_id"] for j in all_jobs) == sorted(e["id"] for e in events)
        done = [r for r in read_records(record) if r["event"] == "done"]
        per_job = Counter(r["job"] for r in done)
        assert set(per_job) == {j["id"] for j in all_jobs}
        # A conversion that finished in the instant between its result and the kill is done again after
        # the restart (conversions are idempotent); only the 2 workers' in-flight jobs can be affected.
        repeated = {job for job, n in per_job.items() if n > 1}
        assert len(repeated) <= 2 and max(per_job.values()) <= 2
        for job in repeated:
            pids = [r["pid"] for r in done if r["job"] == job]
            assert pids[0] in killed_pids and pids[1] not in killed_pids
        for job in all_jobs:  # the store recorded exactly one success per job
            detail = requests.get(f"{service.url}/api/v1/conversions/{job['id']}", headers=AUTH, timeout=5).json()
            assert [a["outcome"] for a in detail["attempt_log"]].count("succeeded") == 1
    finally:
        service.stop()


def test_kill9_during_conversion_job_resumes_after_lease_expiry(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    env = service_env(record, 2.5)
    service = ServeProcess(tmp_path / "data", env).start()
    try:
        assert post(service, distribution_event(repository="demo/slow", tag="v1")).status_code == 200
        wait_until(lambda: any(r["event"] == "start" for r in read_records(record)), what="conversion start")
        service.kill9()
        service = ServeProcess(tmp_path / "data", env).start()
        (job,) = wait_until(lambda: [j for j in jobs(service) if j["state"] == "succeeded"], timeout=60,
                            what="job succeeded after restart")
        events = [r["event"] for r in read_records(record)]
        assert events == ["start", "start", "done"]
        detail = requests.get(f"{service.url}/api/v1/conversions/{job['id']}", headers=AUTH, timeout=5).json()
        assert [a["outcome"] for a in detail["attempt_log"]] == ["lease_expired", "succeeded"]
        assert detail["attempts"] == 2
    finally:
        service.stop()


def test_sigterm_finishes_running_conversion_within_grace(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    service = ServeProcess(tmp_path / "data", service_env(record, 1.0)).start()
    assert post(service, distribution_event(repository="demo/graceful", tag="v1")).status_code == 200
    wait_until(lambda: any(r["event"] == "start" for r in read_records(record)), what="conversion start")
    assert service.terminate(30) == 0
    assert [r["event"] for r in read_records(record)] == ["start", "done"]
    assert '"conversion succeeded"' in service.log() and '"obd-webhook stopped"' in service.log()


def test_sigterm_requeues_conversion_that_outlives_grace(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    env = service_env(record, 30, OBD_WEBHOOK_SHUTDOWN_GRACE_SECONDS="0.5")
    service = ServeProcess(tmp_path / "data", env).start()
    try:
        assert post(service, distribution_event(repository="demo/long", tag="v1")).status_code == 200
        wait_until(lambda: any(r["event"] == "start" for r in read_records(record)), what="conversion start")
        started = time.monotonic()
        assert service.terminate(30) == 0
        assert time.monotonic() - started < 15
        # Front end only: the job must be back in the queue, untouched.
        service = ServeProcess(tmp_path / "data", env, args=("--no-workers",)).start()
        (job,) = jobs(service)
        assert (job["state"], job["attempts"], job["lease_owner"]) == ("queued", 0, None)
    finally:
        service.stop()


def test_front_end_without_workers_and_separate_worker_process(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    env = service_env(record, 0)
    service = ServeProcess(tmp_path / "data", env, args=("--no-workers",)).start()
    worker = None
    try:
        for i in range(5):
            assert post(service, distribution_event(repository="split/app", tag=f"v{i}")).status_code == 200
        time.sleep(0.5)
        assert {j["state"] for j in jobs(service)} == {"queued"}
        worker = subprocess.Popen([sys.executable, "-m", "webhook.cli", "worker", "--concurrency", "2"],
                                  env=service.env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        wait_until(lambda: {j["state"] for j in jobs(service)} == {"succeeded"}, timeout=30,
                   what="worker process converted the queued jobs")
        pids = {r["pid"] for r in read_records(record)}
        assert pids == {worker.pid}
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        service.stop()


def _http_worker_pids(service: ServeProcess) -> list[int]:
    """gunicorn worker processes: grandchildren of `serve` (serve -> gunicorn master -> workers)."""
    assert service.proc is not None

    def children(pid: int) -> list[int]:
        tasks = Path(f"/proc/{pid}/task")
        return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]

    return [worker for master in children(service.proc.pid) for worker in children(master)]


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_http_worker_classes_store_every_concurrent_event_and_checkpoint(tmp_path: Path, worker_class: str) -> None:
    env = service_env(tmp_path / "record.jsonl", 0, OBD_WEBHOOK_HTTP_WORKER_CLASS=worker_class)
    service = ServeProcess(tmp_path / "data", env, args=("--no-workers",)).start()
    try:
        events = [distribution_event(repository=f"classes/app{i}", tag="v1") for i in range(48)]
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda event: post(service, event).status_code, events))
        assert statuses == [200] * len(events)
        assert sorted(j["event_id"] for j in jobs(service)) == sorted(e["id"] for e in events)
        # Each HTTP process runs the WAL checkpointer on an OS thread of its own, also under gevent
        # (a greenlet would stall the process's requests during the fsync). A worker still booting
        # has not created its store yet, hence the wait.
        wait_until(lambda: [len(list(Path(f"/proc/{pid}/task").iterdir())) >= 2
                            for pid in _http_worker_pids(service)] == [True, True],
                   timeout=30, interval=0.2, what="two HTTP worker processes, each with a checkpoint thread")

        def checkpointed() -> bool:  # the main database file alone (no WAL) already holds every job
            copy = tmp_path / f"main-only-{time.monotonic_ns()}.sqlite3"
            shutil.copyfile(tmp_path / "data" / "jobs.sqlite3", copy)
            with closing(sqlite3.connect(copy)) as conn:
                return conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == len(events)

        wait_until(checkpointed, timeout=15, interval=0.5, what="WAL checkpointed into the database file")
    finally:
        service.stop()


def test_serve_with_zero_configuration_prints_secret_once(tmp_path: Path) -> None:
    """What `make run` does: no file, no secret; the secret is generated, stored and shown once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBD_WEBHOOK_")}
    env.update({"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "xdg")})
    service = ServeProcess(tmp_path / "unused", {})
    service.env = {**env, "OBD_WEBHOOK_LISTEN": f"127.0.0.1:{service.port}", "PYTHONPATH": str(ROOT)}
    service.start()
    service.stop()
    secret_file = tmp_path / "xdg" / "obd-webhook" / "webhook-secret"
    secret = secret_file.read_text().strip()
    first_log = service.log()
    assert secret in first_log and "Authorization: [Bearer " + secret + "]" in first_log
    assert "/hooks/harbor" in first_log
    service.log_path.unlink()
    service.start()
    try:
        assert requests.get(service.url + "/api/v1/conversions", timeout=5,
                            headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    finally:
        service.stop()
    assert secret not in service.log(), "the secret is printed only when it is generated"


def test_snippets_command_and_config_errors(tmp_path: Path, capsys, monkeypatch) -> None:
    for key in [k for k in os.environ if k.startswith("OBD_WEBHOOK_")]:
        monkeypatch.delenv(key)
    assert main(["snippets", "--data-dir", str(tmp_path / "d"), "--listen", "10.1.2.3:9000"]) == 0
    out = capsys.readouterr().out
    secret = (tmp_path / "d" / "webhook-secret").read_text().strip()
    assert "generated now" in out and f"Authorization: [Bearer {secret}]" in out
    assert "url: http://10.1.2.3:9000/hooks/distribution" in out
    assert main(["snippets", "--data-dir", str(tmp_path / "d")]) == 0
    assert "stored in" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: lots\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "configuration error: workers" in capsys.readouterr().err
    bad.write_text("http_worker_class: sync\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "http_worker_class: expected one of gevent, gthread, got 'sync'" in capsys.readouterr().err
