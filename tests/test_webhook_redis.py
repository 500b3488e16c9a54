"""The `redis` queue backend (RQ) against a real Debian `redis-server` on 127.0.0.1: the same job API,
workers on separate processes, lease expiry after kill -9, persistence across a Redis restart."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.harness import layers as L
from tests.harness.oci import Image, build_layout, push_image
from tests.harness.registry import Endpoint
from tests.test_webhook_support import (
    AUTH,
    ROOT,
    SECRET,
    ServeProcess,
    digest_of,
    distribution_event,
    envelope,
    free_port,
    read_records,
    wait_until,
)
from webhook.app import create_app
from webhook.config import Config, ConfigError, load_config

RECORDING = "tests.test_webhook_support:recording_convert"
REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer:
    """redis-server with append-only persistence in `workdir`, on a free port of 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port = workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> RedisServer:
        if not Path(REDIS_SERVER).exists():
            pytest.fail(f"{REDIS_SERVER} missing: apt-get install -y redis-server (make test does)")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, timeout=10, what="redis-server ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # redis flushes the append-only file on SIGTERM
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def redis_config(server: RedisServer, tmp_path: Path, **extra) -> Config:
    return Config(data_dir=tmp_path / "data", secrets=(SECRET,), queue="redis", redis_url=server.url, **extra)


def test_same_job_api_in_redis_mode(redis_server: RedisServer, tmp_path: Path) -> None:
    client = create_app(redis_config(redis_server, tmp_path)).test_client()

    def post(*events: dict) -> dict:
        return client.post("/hooks/distribution", data=envelope(*events), headers=AUTH).get_json()

    first = distribution_event(repository="r/app", tag="v1", digest=digest_of("A"))
    result = post(first, distribution_event(action="pull"), distribution_event(tag=None))
    assert len(result["accepted"]) == 1 and result["ignored"] == {"not_push": 1, "untagged": 1}
    assert post(first)["ignored"] == {"duplicate_event": 1}
    assert post(distribution_event(repository="r/app", tag="v1", digest=digest_of("A")))["ignored"] == {
        "duplicate_image": 1}
    newer = post(distribution_event(repository="r/app", tag="v1", digest=digest_of("B")))["accepted"][0]

    old = client.get(f"/api/v1/conversions/{result['accepted'][0]}", headers=AUTH).get_json()
    assert old["state"] == "superseded" and old["superseded_by"] == newer
    listed = client.get("/api/v1/conversions", headers=AUTH).get_json()
    assert [j["id"] for j in listed["jobs"]] == [newer, result["accepted"][0]]
    assert listed["counts"]["queued"] == 1 and listed["counts"]["superseded"] == 1
    queued = client.get("/api/v1/conversions?state=queued", headers=AUTH).get_json()["jobs"]
    assert [(j["id"], j["target_ref"]) for j in queued] == [(newer, "127.0.0.1:5101/r/app:v1_obd")]
    assert client.post(f"/api/v1/conversions/{newer}/retry", headers=AUTH).status_code == 409
    assert client.get("/api/v1/conversions/nope", headers=AUTH).status_code == 404
    metrics = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'obd_webhook_events_received_total{source="distribution"} 6.0' in metrics
    assert 'obd_webhook_events_ignored_total{reason="duplicate_image"} 1.0' in metrics
    assert 'obd_webhook_jobs{state="superseded"} 1.0' in metrics
    assert client.get("/readyz").status_code == 200


def worker_process(service: ServeProcess) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "webhook.cli", "worker"], env=service.env, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=open(service.log_path, "ab"),
                            start_new_session=True)


def jobs(service: ServeProcess) -> list[dict]:
    return requests.get(service.url + "/api/v1/conversions?limit=1000", headers=AUTH, timeout=10).json()["jobs"]


def redis_env(server: RedisServer, record: Path, seconds: float, **extra: str) -> dict[str, str]:
    return {"OBD_WEBHOOK_QUEUE": "redis", "OBD_WEBHOOK_REDIS_URL": server.url,
            "OBD_WEBHOOK_CONVERT_CALLABLE": RECORDING, "OBD_TEST_RECORD": str(record),
            "OBD_TEST_CONVERT_SECONDS": str(seconds), "OBD_WEBHOOK_LEASE_SECONDS": "3", **extra}


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_workers_share_ten_pushed_images_and_a_killed_workers_job_completes_elsewhere(
        redis_server: RedisServer, tmp_path: Path, registry_factory) -> None:
    record = tmp_path / "record.jsonl"
    env = redis_env(redis_server, record, 0, TMPDIR=str(tmp_path),
                    OBD_WEBHOOK_CONVERT_CALLABLE="tests.test_webhook_support:recording_skopeo_convert")
    service = ServeProcess(tmp_path / "data", env, args=("--no-workers",))
    service.start()
    workers = [worker_process(service), worker_process(service)]
    try:
        registry = registry_factory(notifications=[Endpoint(
            url=service.url + "/hooks/distribution", headers={"Authorization": [f"Bearer {SECRET}"]})])
        for i in range(10):
            image = build_layout(tmp_path / f"img{i}", Image([[L.file("n.txt", f"image {i}\n".encode())]]))
            push_image(image, registry, f"spread/app{i}:v1")
        wait_until(lambda: Counter(j["state"] for j in jobs(service))["succeeded"] == 10, timeout=120,
                   interval=0.3, what="10 pushed images converted by 2 workers")
        wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, what="events delivered")
        assert len(jobs(service)) == 10  # the workers' own `_obd` pushes made no jobs
        for i in range(10):
            tags = requests.get(f"{registry.url}/v2/spread/app{i}/tags/list", timeout=5).json()["tags"]
            assert sorted(tags) == ["v1", "v1_obd"]
        done = [r for r in read_records(record) if r["event"] == "done"]
        assert sorted(Counter(r["job"] for r in done).values()) == [1] * 10, "each converted exactly once"
        # RQ forks a work horse per job: the worker process is the horse's parent.
        assert {r["ppid"] for r in done} == {p.pid for p in workers}, "work spread over both workers"

        # Now one long conversion; kill -9 the worker (and its work horse) that runs it.
        slow_record = tmp_path / "slow.jsonl"
        for proc in workers:
            stop_all([proc])
        slow_env = redis_env(redis_server, slow_record, 4)
        service.env.update(slow_env)
        workers = [worker_process(service), worker_process(service)]
        requests.post(service.url + "/hooks/distribution", headers=AUTH, timeout=5,
                      data=envelope(distribution_event(repository="spread/slow", tag="v1")))
        start = wait_until(lambda: [r for r in read_records(slow_record) if r["event"] == "start"],
                           timeout=30, what="slow conversion started")[0]
        (victim,) = [p for p in workers if p.pid == start["ppid"]]
        os.kill(start["pid"], signal.SIGKILL)  # the work horse (RQ gives it its own process group)
        os.killpg(victim.pid, signal.SIGKILL)  # and the worker
        victim.wait(10)
        (job,) = wait_until(lambda: [j for j in jobs(service) if j["repository"] == "spread/slow"
                                     and j["state"] == "succeeded"], timeout=90, interval=0.5,
                            what="the killed worker's job completed by the other worker")
        detail = requests.get(f"{service.url}/api/v1/conversions/{job['id']}", headers=AUTH, timeout=5).json()
        assert [a["outcome"] for a in detail["attempt_log"]] == ["lease_expired", "succeeded"]
        slow = read_records(slow_record)
        assert [r["event"] for r in slow] == ["start", "start", "done"]
        assert slow[-1]["ppid"] != victim.pid
    finally:
        stop_all(workers)
        service.stop()


def test_accepted_jobs_survive_a_redis_restart(redis_server: RedisServer, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    service = ServeProcess(tmp_path / "data", redis_env(redis_server, record, 0), args=("--no-workers",))
    service.start()
    worker = None
    try:
        for i in range(5):
            requests.post(service.url + "/hooks/distribution", headers=AUTH, timeout=5,
                          data=envelope(distribution_event(repository=f"persist/app{i}", tag="v1")))
        before = {j["id"] for j in jobs(service)}
        assert len(before) == 5
        redis_server.stop()
        redis_server.start()  # same port, same append-only file
        after = jobs(service)
        assert {j["id"] for j in after} == before and {j["state"] for j in after} == {"queued"}
        worker = worker_process(service)
        wait_until(lambda: {j["state"] for j in jobs(service)} == {"succeeded"}, timeout=60,
                   what="jobs accepted before the restart converted")
        assert sorted(Counter(r["job"] for r in read_records(record) if r["event"] == "done").values()) == [1] * 5
    finally:
        if worker is not None:
            stop_all([worker])
        service.stop()


def test_permanent_failure_is_dead_and_retryable_in_redis_mode(redis_server: RedisServer, tmp_path: Path) -> None:
    env = redis_env(redis_server, tmp_path / "r.jsonl", 0,
                    OBD_WEBHOOK_CONVERT_CALLABLE="tests.test_webhook_support:permanent_convert")
    service = ServeProcess(tmp_path / "data", env, args=("--no-workers",)).start()
    worker = worker_process(service)
    try:
        requests.post(service.url + "/hooks/distribution", headers=AUTH, timeout=5,
                      data=envelope(distribution_event(repository="perm/app", tag="v1")))
        (job,) = wait_until(lambda: [j for j in jobs(service) if j["state"] == "dead"], timeout=30,
                            what="dead job")
        assert job["attempts"] == 1 and "PermanentError: unsupported image" in job["last_error"]
        stop_all([worker])
        service.env.update(OBD_WEBHOOK_CONVERT_CALLABLE=RECORDING)
        worker = worker_process(service)
        retried = requests.post(f"{service.url}/api/v1/conversions/{job['id']}/retry", headers=AUTH, timeout=5)
        assert retried.status_code == 200 and retried.json()["state"] == "queued"
        wait_until(lambda: [j["state"] for j in jobs(service)] == ["succeeded"], timeout=30, what="retried")
    finally:
        stop_all([worker])
        service.stop()


def test_a_job_publishing_both_outputs_records_both_digests_in_redis_mode(
        redis_server: RedisServer, tmp_path: Path) -> None:
    env = redis_env(redis_server, tmp_path / "r.jsonl", 0, OBD_WEBHOOK_RULES='[{"name": "both", "turbo_oci": true}]')
    service = ServeProcess(tmp_path / "data", env, args=("--no-workers",)).start()
    worker = worker_process(service)
    try:
        requests.post(service.url + "/hooks/distribution", headers=AUTH, timeout=5,
                      data=envelope(distribution_event(repository="dual/app", tag="v1")))
        (job,) = wait_until(lambda: [j for j in jobs(service) if j["state"] == "succeeded"], timeout=30,
                            what="dual-output job succeeded")
        assert job["target_tag"] == "v1_obd" and job["options"]["turbo_tag"] == "v1_turbo"
        assert job["result"]["turbo_digest"] == "sha256:" + hashlib.sha256(b"v1_turbo").hexdigest()
    finally:
        stop_all([worker])
        service.stop()


def test_transient_failures_are_retried_by_rq(redis_server: RedisServer, tmp_path: Path) -> None:
    env = redis_env(redis_server, tmp_path / "r.jsonl", 0,
                    OBD_WEBHOOK_CONVERT_CALLABLE="tests.test_webhook_support:flaky_convert", OBD_TEST_FAILURES="2",
                    OBD_WEBHOOK_RETRY__INITIAL_BACKOFF_SECONDS="0.1", OBD_WEBHOOK_RETRY__JITTER_SECONDS="0")
    service = ServeProcess(tmp_path / "data", env, args=("--no-workers",)).start()
    worker = worker_process(service)
    try:
        requests.post(service.url + "/hooks/distribution", headers=AUTH, timeout=5,
                      data=envelope(distribution_event(repository="flaky/app", tag="v1")))
        (job,) = wait_until(lambda: [j for j in jobs(service) if j["state"] == "succeeded"], timeout=60,
                            what="succeeded after two transient failures")
        detail = requests.get(f"{service.url}/api/v1/conversions/{job['id']}", headers=AUTH, timeout=5).json()
        assert [a["outcome"] for a in detail["attempt_log"]] == ["retry", "retry", "succeeded"]
        metrics = requests.get(service.url + "/metrics", headers=AUTH, timeout=5).text
        assert "obd_webhook_conversion_retries_total 2.0" in metrics
    finally:
        stop_all([worker])
        service.stop()


def test_redis_mode_needs_a_url() -> None:
    with pytest.raises(ConfigError, match="redis_url"):
        load_config(None, {"OBD_WEBHOOK_QUEUE": "redis"})
    config = load_config(None, {"OBD_WEBHOOK_QUEUE": "redis", "OBD_WEBHOOK_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert config.queue == "redis" and config.redis_url == "redis://127.0.0.1:1/0"


def test_one_conversion_per_tag_at_a_time_across_workers(redis_server: RedisServer, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    service = ServeProcess(tmp_path / "data", redis_env(redis_server, record, 1.5), args=("--no-workers",))
    service.start()
    workers = [worker_process(service), worker_process(service)]
    try:
        first = distribution_event(repository="one/app", tag="v1", digest=digest_of("A"))
        requests.post(service.url + "/hooks/distribution", data=envelope(first), headers=AUTH, timeout=5)
        wait_until(lambda: read_records(record), what="first conversion started")
        second = distribution_event(repository="one/app", tag="v1", digest=digest_of("B"))
        requests.post(service.url + "/hooks/distribution", data=envelope(second), headers=AUTH, timeout=5)
        wait_until(lambda: {j["state"] for j in jobs(service)} == {"succeeded"}, timeout=60, what="both done")
        events = [(r["event"], r["digest"]) for r in read_records(record)]
        # The second push's job was picked up by the idle worker at once, but waited for the tag.
        assert events == [("start", digest_of("A")), ("done", digest_of("A")),
                          ("start", digest_of("B")), ("done", digest_of("B"))]
    finally:
        stop_all(workers)
        service.stop()


def test_layer_reuse_across_machines_through_the_shared_redis_cache(
        redis_server: RedisServer, registry, oci_image_builder, push_image, tmp_path: Path, capsys) -> None:
    """Two converters with separate local cache dirs (two machines) share converted layers via Redis."""
    from converter.cli import main
    from tests.harness import layers as L
    from tests.harness import oci as oci_h
    from tests.test_pipeline_registry import app_image

    base = app_image()
    push_image(oci_image_builder(base, name="a"), registry, "one:a")
    extra = oci_h.Layer([L.file("app/new", b"new")])
    push_image(oci_image_builder(oci_h.Image([*base.layers, extra], config=base.config), name="b"), registry, "two:b")

    def convert_on(machine: str, repo: str, tag: str) -> dict:
        code = main(["-r", f"{registry.host}/{repo}", "-i", tag, "--plain", "--vsize", "1", "--json",
                     "-d", str(tmp_path / machine / "work"), "--cache-dir", str(tmp_path / machine / "cache"),
                     "--cache-url", redis_server.url])
        out = capsys.readouterr()
        assert code == 0, out.err
        return __import__("json").loads(out.out)

    first = convert_on("machine-1", "one", "a")
    assert first["layers_converted"] == 2 and first["layers_reused"] == 0
    second = convert_on("machine-2", "two", "b")  # an empty local cache: the hits come from Redis
    assert second["layers_converted"] == 1 and second["layers_reused"] == 2
    assert not (tmp_path / "machine-2" / "cache" / "layers.sqlite3").exists()
