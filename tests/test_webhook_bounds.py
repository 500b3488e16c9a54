"""Bounded intake: odd payloads get 400 or are ignored one event at a time (never a 500), names are
checked against the distribution grammar, errors are clipped, one poisoned delivery never fails another,
API parameters are validated. Issue 14 items 6, 8, 9, 10, 12 and 14, and a fuzz test of the parsers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converter.errors import PermanentError
from tests.test_webhook_support import (
    AUTH,
    OCI_MANIFEST,
    SECRET,
    ServeProcess,
    digest_of,
    distribution_event,
    envelope,
    harbor_default,
    serve_app,
    wait_until,
)
from webhook.app import create_app
from webhook.config import Config, RegistrySettings, RetrySettings
from webhook.conversion import ConversionRequest, ConversionResult
from webhook.limits import MAX_ERROR_CHARS
from webhook.retry import RetryPolicy
from webhook.store import Intake, JobState, JobStore, NewJob
from webhook.worker import Worker, WorkerSettings

HOST = "127.0.0.1:5101"  # a loopback registry: allowed with zero configuration
CLIPPED = MAX_ERROR_CHARS + 100  # the clip note adds a few dozen characters


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(data_dir=tmp_path / "data", secrets=(SECRET,), max_body_bytes=4 * 1024 * 1024)


@pytest.fixture
def client(config: Config) -> FlaskClient:
    return create_app(config).test_client()


def post_raw(client: FlaskClient, path: str, body: bytes) -> Any:
    return client.post(path, data=body, headers=AUTH, content_type="application/json")


def event_json(**overrides: Any) -> bytes:
    return json.dumps(distribution_event(host=HOST, **overrides)).encode()


def raw_envelope(*events: bytes) -> bytes:
    return b'{"events": [' + b", ".join(events) + b"]}"


# --- item 8: JSON depth, number size, lone surrogates, bad target.url ------------------------------


def test_deeply_nested_envelope_is_a_400(client: FlaskClient) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b'{"events": ' + deep + b"}"):
        response = post_raw(client, "/hooks/distribution", body)
        assert response.status_code == 400 and "nested" in response.get_json()["error"]


def test_one_odd_event_is_malformed_and_the_rest_of_the_envelope_is_accepted(client: FlaskClient) -> None:
    good = event_json(tag="good")
    huge_number = event_json(tag="num").replace(b'"size": 555', b'"size": 1' + b"0" * 5000)
    deep_ref = event_json(tag="deep").replace(b'"references": null', b"").replace(
        b'"repository"', b'"references": [' + b"[" * 500 + b"]" * 500 + b'], "repository"')
    surrogate_tag = event_json(tag="placeholder").replace(b'"placeholder"', b'"\\ud800"')
    bad_url = distribution_event(tag="url", host=HOST)
    bad_url["target"]["url"] = "http://[::1"
    del bad_url["request"]["host"], bad_url["source"]
    response = post_raw(client, "/hooks/distribution", raw_envelope(
        good, huge_number, deep_ref, surrogate_tag, json.dumps(bad_url).encode()))
    assert response.status_code == 200, response.get_data(as_text=True)
    summary = response.get_json()
    assert summary["received"] == 5 and len(summary["accepted"]) == 1
    assert summary["ignored"] == {"malformed": 3, "no_registry": 1}
    (job,) = client.get("/api/v1/conversions", headers=AUTH).get_json()["jobs"]
    assert job["tag"] == "good"


def test_odd_values_in_harbor_and_generic_payloads(client: FlaskClient) -> None:
    digest = digest_of("h")
    harbor = harbor_default("v1", digest, host=HOST)
    harbor["event_data"]["resources"].append({"digest": digest, "tag": "\ud800", "resource_url": "x"})
    body = json.dumps(harbor).encode()  # json.dumps escapes the lone surrogate as \ud800
    summary = post_raw(client, "/hooks/harbor", body).get_json()
    assert len(summary["accepted"]) == 1 and summary["ignored"] == {"malformed": 1}
    harbor_top = harbor_default("v2", digest, host=HOST)
    harbor_top["occur_at"] = int("9" * 100)
    assert post_raw(client, "/hooks/harbor", json.dumps(harbor_top).encode()).status_code == 400
    zot = {"specversion": "1.0", "id": "z", "type": "zotregistry.image.updated", "source": "zot",
           "data": {"name": "team/app", "reference": "v1", "digest": digest, "size": 7}}
    body = json.dumps(zot).encode().replace(b'"size": 7', b'"size": ' + b"9" * 5000)
    generic = post_raw(client, "/hooks/generic/127.0.0.1:5101", body).get_json()
    assert generic["accepted"] == [] and generic["ignored"] == {"malformed": 1}
    # Nesting near the parser's own limit, inside one Harbor resource: 400 or that resource ignored.
    for depth in (900, 960, 990, 1200):
        deep = harbor_default(f"d{depth}", digest_of(f"deep{depth}"), host=HOST)
        deep["event_data"]["resources"].append({"tag": "x"})
        raw = json.dumps(deep).encode().replace(b'{"tag": "x"}', b"[" * depth + b"]" * depth)
        response = post_raw(client, "/hooks/harbor", raw)
        assert response.status_code in (200, 400), (depth, response.get_data(as_text=True)[:300])
        if response.status_code == 200:
            assert response.get_json()["ignored"] == {"malformed": 1}


# --- item 14: names checked against the distribution grammar at intake -----------------------------


@pytest.mark.parametrize(("overrides", "why"), [
    ({"digest": "sha256:abc"}, "digest"),
    ({"digest": "md5:" + "0" * 32}, "digest"),
    ({"repository": "Team/App"}, "repository"),
    ({"repository": "team//app"}, "repository"),
    ({"repository": "a" * 256}, "longer than 255"),
    ({"tag": "bad tag"}, "tag"),
    ({"tag": "-leading"}, "tag"),
    ({"tag": "é"}, "tag"),  # \w would accept it; the distribution grammar is ASCII
    ({"tag": "t" * 129}, "tag"),
])
def test_invalid_names_are_malformed_with_the_field_named(client: FlaskClient, overrides: dict, why: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="webhook.hooks")
    body = envelope(distribution_event(host=HOST, **overrides), distribution_event(host=HOST, tag="fine"))
    summary = post_raw(client, "/hooks/distribution", body).get_json()
    assert len(summary["accepted"]) == 1 and summary["ignored"] == {"malformed": 1}
    details = [r.detail for r in caplog.records if getattr(r, "reason", None) == "malformed"]
    assert len(details) == 1 and why in details[0]


def test_harbor_resource_url_without_a_registry_is_no_registry(client: FlaskClient) -> None:
    digest = digest_of("harbor")
    payload = harbor_default("v1", digest, repo="library/busybox")
    payload["event_data"]["resources"][0]["resource_url"] = "library/busybox:v1"
    unbound = post_raw(client, "/hooks/harbor", json.dumps(payload).encode()).get_json()
    assert unbound["ignored"] == {"no_registry": 1}
    bound = post_raw(client, f"/hooks/harbor/{HOST}", json.dumps(payload).encode()).get_json()
    assert len(bound["accepted"]) == 1  # the hook URL names the registry


def test_api_checks_names_too(client: FlaskClient) -> None:
    for reference, field in ((f"{HOST}/Team/App:v1@{digest_of('x')}", "repository"),
                             (f"{HOST}/team/app:bad!tag@{digest_of('x')}", "tag")):
        response = client.post("/api/v1/conversions", json={"reference": reference}, headers=AUTH)
        assert response.status_code == 400 and field in response.get_json()["error"]


# --- item 6: error messages clipped before they are logged, stored or served ------------------------


def huge_failure(request: ConversionRequest) -> ConversionResult:
    """A 5 MB error message, barely compressible (RQ compresses what it stores)."""
    noise = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(80_000))
    raise PermanentError("layer 1, entry " + noise + ": bad header")


def test_conversion_errors_are_clipped_in_store_api_and_log(config: Config, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    store = JobStore(config.db_path)
    client = create_app(config, store).test_client()
    (job_id,) = client.post("/hooks/distribution", data=envelope(distribution_event(host=HOST)),
                            headers=AUTH).get_json()["accepted"]
    caplog.set_level(logging.INFO, logger="webhook.worker")
    worker = Worker(store, huge_failure, RetryPolicy(RetrySettings()), WorkerSettings())
    assert worker.run_once() is not None
    job = client.get(f"/api/v1/conversions/{job_id}", headers=AUTH).get_json()
    assert job["state"] == "dead" and job["last_error"].startswith("permanent error: PermanentError: layer 1")
    assert len(job["last_error"]) < CLIPPED and "more characters]" in job["last_error"]
    assert len(job["attempt_log"][0]["error"]) < CLIPPED
    raw = store._conn().execute("SELECT length(last_error) FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    assert raw < CLIPPED
    assert all(len(str(getattr(r, "error", ""))) < CLIPPED for r in caplog.records)
    # A row stored before errors were bounded is clipped when served.
    store._conn().execute("UPDATE jobs SET last_error = ? WHERE id = ?", ("y" * 1_000_000, job_id))
    assert len(client.get(f"/api/v1/conversions/{job_id}", headers=AUTH).get_json()["last_error"]) < CLIPPED
    assert len(client.get("/status", headers=AUTH).get_data()) < 100_000
    store.close()


# --- item 9: per-delivery isolation in the group commit ----------------------------------------------


def _new_job(tag: str, repository: str = "demo/app") -> NewJob:
    return NewJob(registry=HOST, repository=repository, tag=tag, digest=digest_of(tag + repository),
                  target_tag=tag + "_obd", rule="default")


def test_a_poisoned_delivery_never_fails_the_others_of_its_group_commit(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    results: dict[str, Any] = {}

    def deliver(name: str, items: list[Intake]) -> None:
        try:
            results[name] = store.record(items)
        except Exception as exc:
            results[name] = exc

    # Hold the write lock so that the three deliveries queue up and are committed as one batch.
    poison = Intake("distribution", "p1", job=dataclasses.replace(_new_job("v1"), repository="demo/\ud800"))
    with store._write_lock:
        threads = [threading.Thread(target=deliver, args=args) for args in (
            ("first", [Intake("distribution", "a1", job=_new_job("a"))]),
            ("poison", [Intake("distribution", "p0", job=_new_job("p")), poison]),
            ("last", [Intake("distribution", "b1", job=_new_job("b")), Intake("distribution", "b2", reason="blob")]),
        )]
        for thread in threads:
            thread.start()
        while len(store._queue) < 3:
            threading.Event().wait(0.001)
    for thread in threads:
        thread.join(10)
    assert isinstance(results["poison"], UnicodeEncodeError)
    assert [o.status for o in results["first"]] == ["accepted"]
    assert [o.status for o in results["last"]] == ["accepted", "ignored"]
    assert {j.tag for j in store.list_jobs()} == {"a", "b"}  # nothing of the poisoned delivery remains
    assert store.stats().counters[("events_received", "distribution")] == 3
    store.close()


def test_gthread_front_end_answers_every_valid_delivery_among_odd_ones(tmp_path: Path) -> None:
    service = ServeProcess(tmp_path / "data", {"OBD_WEBHOOK_HTTP_WORKER_CLASS": "gthread"},
                           args=("--no-workers",)).start()
    odd = [raw_envelope(event_json(tag="placeholder").replace(b'"placeholder"', b'"\\ud800"')),
           raw_envelope(event_json(tag="n").replace(b'"size": 555', b'"size": 1' + b"0" * 5000)),
           b"[" * 50_000 + b"]" * 50_000]

    def send(i: int) -> tuple[int, int, dict]:
        valid = i % 2 == 0
        body = envelope(distribution_event(host=HOST, tag=f"t{i}")) if valid else odd[i % 3]
        response = requests.post(service.url + "/hooks/distribution", data=body, headers=AUTH, timeout=30)
        return i, response.status_code, response.json()

    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, range(300)))
        assert all(status in (200, 400) for _, status, _ in answers), [a for a in answers if a[1] >= 500][:3]
        assert all(len(body["accepted"]) == 1 for i, _, body in answers if i % 2 == 0)
        jobs = requests.get(service.url + "/api/v1/conversions?limit=1000", headers=AUTH, timeout=10).json()
        assert jobs["counts"]["queued"] == 150
    finally:
        service.stop()


# --- item 10: API query parameters --------------------------------------------------------------


def test_list_parameters_are_validated_and_limit_is_clamped(config: Config) -> None:
    store = JobStore(config.db_path)
    store.record([Intake("api", job=_new_job(f"t{i}")) for i in range(1005)])
    client = create_app(config, store).test_client()

    def listing(query: str) -> Any:
        return client.get(f"/api/v1/conversions?{query}", headers=AUTH)

    assert len(listing("limit=-1").get_json()["jobs"]) == 1
    assert len(listing("limit=0").get_json()["jobs"]) == 1
    assert len(listing("limit=5000").get_json()["jobs"]) == 1000
    assert len(listing("").get_json()["jobs"]) == 100
    assert len(listing("offset=1000&limit=10").get_json()["jobs"]) == 5
    for query in ("offset=99999999999999999999999", "offset=-1", "offset=" + "9" * 5000, "limit=abc",
                  "limit=1e3", "offset=١٢", "state=nope"):
        response = listing(query)
        assert response.status_code == 400 and response.get_json()["error"], query
    store.close()


# --- item 12: HTTP-level parse errors are 4xx ------------------------------------------------------

BAD_CHUNKED = [b"ZZ\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX0\r\n\r\n", b"-3\r\nabc\r\n0\r\n\r\n"]


def _raw_post(port: int, path: str, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n".encode()
                     + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     + body)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return reply


def test_bad_chunked_encoding_is_a_400_under_gunicorn(tmp_path: Path) -> None:
    service = ServeProcess(tmp_path / "data", args=("--no-workers",)).start()
    try:
        for path in ("/hooks/distribution", "/api/v1/conversions"):
            for body in BAD_CHUNKED:
                reply = _raw_post(service.port, path, body)
                assert reply.startswith(b"HTTP/1.1 400"), (path, body, reply[:300])
    finally:
        service.stop()
    assert "Traceback" not in service.log()


def test_bad_chunked_encoding_is_a_400_under_werkzeug(config: Config) -> None:
    with serve_app(create_app(config)) as base:
        port = int(base.rsplit(":", 1)[1])
        for body in BAD_CHUNKED[:2]:
            assert _raw_post(port, "/hooks/distribution", body).startswith(b"HTTP/1.1 400")


# --- fuzz: hypothesis over JSON shapes of the three hook formats -----------------------------------

JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**40, max_value=10**60)
             | st.floats(allow_nan=False) | st.text(max_size=12)
             | st.sampled_from(["oci:", "http://[::1", "\ud800", "sha256:abc", "127.0.0.1:5101", "a/b:c", ""]))
JSON_VALUE = st.recursive(JSON_LEAF, lambda children: st.lists(children, max_size=3) | st.dictionaries(
    st.sampled_from(["target", "request", "host", "url", "repository", "tag", "digest", "mediaType",
                     "action", "id", "references", "resources", "resource_url", "name", "reference", "data"]),
    children, max_size=4), max_leaves=12)
NAMES = st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}", fullmatch=True)
TAGS = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True).filter(
    lambda t: not t.endswith("_obd") and not t.endswith((".sig", ".att", ".sbom")))


def _junk_event(value: Any) -> Any:
    """A Distribution-looking event with arbitrary values in its fields (or any JSON at all)."""
    if isinstance(value, dict):
        return {"action": "push", "target": value, "request": {"host": value.get("host", HOST)}}
    return value


def _deep(depth: int) -> Any:
    node: Any = "x"
    for _ in range(depth):
        node = [node]
    return node


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(valid=st.lists(st.tuples(NAMES, TAGS), min_size=1, max_size=4, unique=True),
       junk=st.lists(JSON_VALUE | st.integers(40, 200).map(_deep), max_size=4),
       format_=st.sampled_from(["distribution", "harbor", "generic"]), data=st.data())
def test_fuzzed_payloads_never_500_and_every_valid_event_is_accepted(
        config: Config, valid: list[tuple[str, str]], junk: list[Any], format_: str, data: st.DataObject) -> None:
    # A fresh store per example: every example's valid events must be accepted, not found as duplicates
    # of an earlier example's (and nothing random in the test body, so CI replays exactly).
    # (Left for pytest's tmp_path cleanup: the store's checkpoint thread may still touch its files.)
    data_dir = Path(tempfile.mkdtemp(prefix="example-", dir=config.data_dir.parent))
    app = create_app(dataclasses.replace(config, data_dir=data_dir))
    try:
        _post_fuzzed(app.test_client(), valid, junk, format_, data)
    finally:
        app.extensions["obd_webhook"].store.close()


def _post_fuzzed(client: FlaskClient, valid: list[tuple[str, str]], junk: list[Any], format_: str,
                 data: st.DataObject) -> None:
    run = "fuzz"
    if format_ == "distribution":
        events = [distribution_event(repository=repo, tag=tag, digest=digest_of(run + repo + tag), host=HOST)
                  for repo, tag in valid]
        events += [_junk_event(j) for j in junk]
        order = data.draw(st.permutations(range(len(events))))
        response = client.post("/hooks/distribution", headers=AUTH, content_type="application/json",
                               data=json.dumps({"events": [events[i] for i in order]}))
        expected = len(valid)
    elif format_ == "harbor":
        repo, tag = valid[0]
        payload = harbor_default(tag, digest_of(run + repo + tag), repo=repo, host=HOST)
        payload["event_data"]["resources"] += [j for j in junk]
        response = client.post("/hooks/harbor", headers=AUTH, content_type="application/json",
                               data=json.dumps(payload))
        expected = 1
    else:
        repo, tag = valid[0]
        body = {"specversion": "1.0", "id": run, "type": "zotregistry.image.updated", "source": "zot",
                "data": {"name": repo, "reference": tag, "digest": digest_of(run + repo + tag),
                         "mediaType": OCI_MANIFEST, "extra": junk}}
        response = client.post("/hooks/generic/127.0.0.1:5101", headers=AUTH, content_type="application/json",
                               data=json.dumps(body))
        # Junk inside the single event's data may make that one event malformed, never a 500.
        expected = None
    assert response.status_code == 200, response.get_data(as_text=True)
    summary = response.get_json()
    if expected is not None:
        assert len(summary["accepted"]) == expected, summary
    else:
        assert len(summary["accepted"]) + summary["ignored"].get("malformed", 0) == 1, summary


def test_fuzz_helpers_produce_what_they_claim() -> None:
    assert json.loads(json.dumps(_deep(3))) == [[["x"]]]
    assert _junk_event({"host": "oci:"})["request"]["host"] == "oci:"
    settings_ = RegistrySettings()
    assert settings_.client_options() == {"endpoint": None, "username": None, "password": None,
                                          "insecure": False}
    assert JobState.QUEUED.value == "queued"


def test_service_log_lines_clip_messages_and_extra_fields() -> None:
    import io

    from webhook.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", "INFO")
        stream = io.StringIO()
        root.handlers[0].stream = stream  # type: ignore[attr-defined]
        logging.getLogger("webhook.test").warning("entry " + "m" * 100_000,
                                                  extra={"error": "e" * 100_000, "attempt": 3})
        logging.getLogger("webhook.test").warning("bad tar entry %s", "n" * 100_000)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert len(lines) == 2 and all(len(json.dumps(line)) < 3 * CLIPPED for line in lines)
        assert lines[0]["attempt"] == 3 and lines[0]["error"].endswith("more characters]")
        assert lines[1]["message"].startswith("bad tar entry nnn") and "more characters]" in lines[1]["message"]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_conversion_errors_are_clipped_in_redis_mode_and_unconfigured_registries_refused(tmp_path: Path) -> None:
    from redis import Redis

    from tests.test_webhook_redis import RedisServer, stop_all, worker_process
    from webhook.redis_queue import RedisBackend

    server = RedisServer(tmp_path / "redis").start()
    env = {"OBD_WEBHOOK_QUEUE": "redis", "OBD_WEBHOOK_REDIS_URL": server.url,
           "OBD_WEBHOOK_CONVERT_CALLABLE": "tests.test_webhook_bounds:huge_failure"}
    service = ServeProcess(tmp_path / "data", env, args=("--no-workers",)).start()
    worker = None
    try:
        (job_id,) = requests.post(service.url + "/hooks/distribution", headers=AUTH, timeout=5,
                                  data=envelope(distribution_event(host=HOST))).json()["accepted"]
        # A job naming `oci:` that did not come through intake (an older version, a hand-made record).
        config = Config(data_dir=tmp_path / "data", secrets=(SECRET,), queue="redis", redis_url=server.url)
        layout_job = NewJob(registry="oci:", repository="tmp/x/lay", tag="v1", digest=digest_of("lay"),
                            target_tag="v1_obd", rule="default")
        refused_id = RedisBackend(server.url, config).record([Intake("api", job=layout_job)])[0].job_id
        worker = worker_process(service)

        def job(job_id: str) -> dict:
            return requests.get(f"{service.url}/api/v1/conversions/{job_id}", headers=AUTH, timeout=5).json()

        wait_until(lambda: job(job_id)["state"] == "dead" and job(refused_id)["state"] == "dead", timeout=60,
                   what="both jobs dead")
        dead = job(job_id)
        assert dead["last_error"].startswith("permanent error: PermanentError: layer 1, entry ")
        assert len(dead["last_error"]) < CLIPPED and len(dead["attempt_log"][0]["error"]) < CLIPPED
        assert "not configured" in job(refused_id)["last_error"]
        redis = Redis.from_url(server.url)
        stored = sum(redis.memory_usage(key) or 0 for key in redis.keys(f"*{job_id}*"))
        assert stored < 100_000  # RQ's own failure record holds the clipped message, not 5 MB
    finally:
        if worker is not None:
            stop_all([worker])
        service.stop()
        server.stop()
