"""HTTP behaviour of the app: auth, size limit, payload handling, API, metrics, logs.

Request/response logic goes through Flask's test client; transport-level behaviour (chunked bodies,
real sockets) through the app served on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
from pathlib import Path

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_webhook_support import (
    AUTH,
    DISTRIBUTION_V1,
    OCI_INDEX,
    SECRET,
    digest_of,
    distribution_event,
    envelope,
    harbor_cloudevent,
    harbor_default,
    serve_app,
)
from webhook.app import create_app
from webhook.config import Config, ConfigError, RegistrySettings, Rule

OLD_SECRET = "old-secret-rotating-out-0123"


# The hosts the payloads below name, configured as registries the service may contact (webhook.trust).
REGISTRIES = {host: RegistrySettings() for host in (
    "127.0.0.1:5101", "hub.harbor.com", "harbor.dev", "zot.local:5000", "r:1", "r.example")}


def make_config(tmp_path: Path, **overrides) -> Config:
    base = {"data_dir": tmp_path / "data", "secrets": (SECRET, OLD_SECRET), "max_body_bytes": 64 * 1024,
            "converter_actors": ("robot$obd",), "registries": REGISTRIES}
    return Config(**{**base, **overrides})


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return create_app(make_config(tmp_path))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def post_distribution(client: FlaskClient, body: bytes, headers: dict | None = None,
                      content_type: str = DISTRIBUTION_V1):
    return client.post("/hooks/distribution", data=body, headers={**AUTH, **(headers or {})},
                       content_type=content_type)


# --- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("post", "/hooks/distribution"), ("post", "/hooks/harbor"), ("post", "/hooks/generic"),
    ("get", "/api/v1/conversions"), ("post", "/api/v1/conversions"), ("get", "/status"), ("get", "/metrics"),
    ("post", "/api/v1/conversions/x/retry"),
])
def test_every_hook_and_api_call_needs_the_secret(client: FlaskClient, method: str, path: str) -> None:
    missing = getattr(client, method)(path, data=b"{}")
    wrong = getattr(client, method)(path, data=b"{}", headers={"Authorization": "Bearer not-the-secret"})
    prefix = getattr(client, method)(path, data=b"{}", headers={"Authorization": f"Bearer {SECRET[:-1]}"})
    assert missing.status_code == wrong.status_code == prefix.status_code == 401
    assert "unauthorized" in missing.get_json()["error"]


def test_health_endpoints_are_public(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_rotated_secrets_harbor_verbatim_and_basic_forms(client: FlaskClient) -> None:
    body = envelope(distribution_event())
    for header in (f"Bearer {SECRET}", f"Bearer {OLD_SECRET}", SECRET, f"bearer {SECRET}",
                   "Basic " + base64.b64encode(f"anyone:{SECRET}".encode()).decode()):
        response = client.post("/hooks/distribution", data=body, headers={"Authorization": header})
        assert response.status_code == 200, header
    assert client.post("/hooks/distribution", data=body,
                       headers={"Authorization": "Basic !!notbase64"}).status_code == 401


def test_secret_comparison_is_constant_time_over_all_secrets(client: FlaskClient, monkeypatch) -> None:
    """Every request compares against every secret with hmac.compare_digest, match or not, so the
    number and kind of comparisons do not depend on the presented value."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    counts = []
    for header in (f"Bearer {SECRET}", f"Bearer {OLD_SECRET}", "Bearer x", f"Bearer {SECRET}xyz"):
        calls.clear()
        client.get("/api/v1/conversions", headers={"Authorization": header})
        counts.append(len(calls))
    assert counts == [4, 4, 4, 4]  # 2 candidate forms x 2 secrets, always


def test_create_app_refuses_to_run_without_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secret"):
        create_app(Config(data_dir=tmp_path))


# --- payloads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
    "application/json",
    "text/plain",
])
def test_distribution_envelopes_of_every_media_type_are_accepted(client: FlaskClient, content_type: str) -> None:
    response = post_distribution(client, envelope(distribution_event()), content_type=content_type)
    assert response.status_code == 200
    assert len(response.get_json()["accepted"]) == 1


def test_envelope_with_many_events_mixed_outcomes(client: FlaskClient) -> None:
    index = distribution_event(repository="demo/multi", tag="v1", media_type=OCI_INDEX)
    body = envelope(
        distribution_event(repository="demo/multi", tag=None, media_type="application/octet-stream"),
        distribution_event(repository="demo/multi", tag=None),  # child manifest, no tag
        index,
        index,  # same event delivered twice in one envelope
        distribution_event(repository="demo/multi", tag="v1_obd"),
        distribution_event(action="pull"),
    )
    result = post_distribution(client, body).get_json()
    assert result["received"] == 6 and len(result["accepted"]) == 1
    assert result["ignored"] == {"blob": 1, "untagged": 1, "duplicate_event": 1, "output_tag": 1,
                                 "not_push": 1}


@pytest.mark.parametrize(("body", "status"), [
    (b"not json", 400), (b"\xff\xfe\x00", 400), (b"[]", 400), (b'{"events": 5}', 400), (b"{}", 400),
    (b'{"events": []}', 200), (b'{"events": [1, "x", null, {}]}', 200),
])
def test_bad_distribution_payloads_get_4xx_or_ignored_2xx(client: FlaskClient, body: bytes, status: int) -> None:
    response = post_distribution(client, body)
    assert response.status_code == status
    assert response.is_json


def test_harbor_formats_and_unknown_types(client: FlaskClient) -> None:
    digest = digest_of("debian")
    default = client.post("/hooks/harbor", json=harbor_default("latest", digest), headers=AUTH)
    assert default.status_code == 200 and len(default.get_json()["accepted"]) == 1
    cloud = client.post("/hooks/harbor", data=json.dumps(harbor_cloudevent("1.0", digest_of("bb"))),
                        headers={**AUTH, "Content-Type": "application/cloudevents+json"})
    assert len(cloud.get_json()["accepted"]) == 1
    child = client.post("/hooks/harbor", json=harbor_default(digest, digest), headers=AUTH).get_json()
    assert child["ignored"] == {"tag_is_digest": 1}
    quota = client.post("/hooks/harbor", json={"type": "QUOTA_EXCEED", "occur_at": 1, "operator": "",
                                               "event_data": {"custom_attributes": {}}}, headers=AUTH)
    assert quota.status_code == 200 and quota.get_json()["ignored"] == {"not_push": 1}
    assert client.post("/hooks/harbor", json=[1, 2], headers=AUTH).status_code == 400
    # Redelivery of the identical Default payload (Harbor retries the same job) is recognised.
    again = client.post("/hooks/harbor", json=harbor_default("latest", digest), headers=AUTH).get_json()
    assert again["ignored"] == {"duplicate_event": 1}


def test_generic_zot_hook(client: FlaskClient) -> None:
    body = {"specversion": "1.0", "id": "z1", "type": "zotregistry.image.updated", "source": "zot",
            "data": {"name": "team/app", "reference": "v3", "digest": digest_of("z"),
                     "mediaType": "application/vnd.oci.image.manifest.v1+json"}}
    response = client.post("/hooks/generic?registry=zot.local:5000", json=body, headers=AUTH)
    assert len(response.get_json()["accepted"]) == 1
    assert client.post("/hooks/generic", json=body, headers=AUTH).status_code == 400


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["events", "target", "type", "event_data", "data", "specversion", "id", "tag",
                         "repository", "digest", "action", "resources", "mediaType", "x"]),
        children, max_size=5),
    max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=JSON_VALUES, path=st.sampled_from(["/hooks/distribution", "/hooks/harbor",
                                                  "/hooks/generic?registry=r:1"]))
def test_arbitrary_json_never_causes_a_server_error(client: FlaskClient, payload, path: str) -> None:
    response = client.post(path, data=json.dumps(payload), headers=AUTH, content_type="application/json")
    assert response.status_code in (200, 400), response.get_data(as_text=True)


def test_oversized_body_is_rejected_with_413(client: FlaskClient, tmp_path: Path) -> None:
    big = envelope(*[distribution_event() for _ in range(200)])
    assert len(big) > 64 * 1024
    response = post_distribution(client, big)
    assert response.status_code == 413 and "error" in response.get_json()


def test_oversized_chunked_body_over_real_http_is_rejected(app: Flask) -> None:
    """No Content-Length: the limit must still hold while the body streams in."""
    with serve_app(app) as base:
        def chunks():
            for _ in range(100):
                yield b" " * 4096
        response = requests.post(base + "/hooks/distribution", data=chunks(), headers=AUTH, timeout=10)
        assert response.status_code == 413
        ok = requests.post(base + "/hooks/distribution", data=envelope(distribution_event()), headers=AUTH,
                           timeout=10)
        assert ok.status_code == 200


def test_real_http_without_auth_header_on_raw_socket(app: Flask) -> None:
    with serve_app(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            body = envelope(distribution_event())
            sock.sendall(b"POST /hooks/distribution HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         + DISTRIBUTION_V1.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 401")


# --- API ----------------------------------------------------------------------------------------


def test_manual_trigger_list_get_retry(client: FlaskClient) -> None:
    digest = digest_of("manual")
    ref = f"127.0.0.1:5101/demo/app:v9@{digest}"
    created = client.post("/api/v1/conversions", json={"reference": ref}, headers=AUTH)
    assert created.status_code == 201
    job = created.get_json()["job"]
    assert (job["state"], job["target_ref"], job["source_ref"]) == (
        "queued", "127.0.0.1:5101/demo/app:v9_obd", f"127.0.0.1:5101/demo/app@{digest}")
    again = client.post("/api/v1/conversions", json={"reference": ref}, headers=AUTH)
    assert again.status_code == 200 and again.get_json()["status"] == "duplicate_image"

    listed = client.get("/api/v1/conversions?state=queued", headers=AUTH).get_json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["counts"]["queued"] == 1
    assert client.get("/api/v1/conversions?state=bogus", headers=AUTH).status_code == 400
    detail = client.get(f"/api/v1/conversions/{job['id']}", headers=AUTH).get_json()
    assert detail["attempt_log"] == [] and detail["digest"] == digest
    assert client.get("/api/v1/conversions/nope", headers=AUTH).status_code == 404
    conflict = client.post(f"/api/v1/conversions/{job['id']}/retry", headers=AUTH)
    assert conflict.status_code == 409 and "queued" in conflict.get_json()["error"]
    assert client.post("/api/v1/conversions/nope/retry", headers=AUTH).status_code == 404


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"reference": "demo/app:v1@" + digest_of("x")}, 403, "'demo' is not configured"),
    ({"reference": "oci:/tmp/x/lay:v1@" + digest_of("x")}, 400, "registry host"),
    ({"reference": "127.0.0.1:1/demo/app:v1@" + digest_of("x")}, 403, "not configured"),
    ({"reference": "r.example/demo/app@" + digest_of("x")}, 400, "tag is required"),
    ({"reference": "r.example/demo/app:v1@sha256:abc"}, 400, "digest must be"),
    ({"reference": "r.example/demo/app:v1_obd@" + digest_of("x")}, 422, "loop"),
    ({"reference": "r.example/demo/app:v1@" + digest_of("x"), "rule": "nope"}, 422, "rule"),
    ({"ref": "x"}, 400, "reference"),
])
def test_manual_trigger_validation(client: FlaskClient, body: dict, status: int, message: str) -> None:
    response = client.post("/api/v1/conversions", json=body, headers=AUTH)
    assert response.status_code == status and message in response.get_json()["error"]


def test_manual_trigger_by_tag_resolves_the_digest(tmp_path: Path, registry, oci_image_builder, push_image) -> None:
    from tests.harness import layers as L
    from tests.harness import oci
    pushed = push_image(oci_image_builder(oci.Image([oci.Layer([L.file("a", b"1")])])), registry, "demo/app:v1")
    settings = {registry.host: RegistrySettings(endpoint=f"http://{registry.host}"),
                "127.0.0.1:9": RegistrySettings()}
    client = create_app(make_config(tmp_path, registries=settings)).test_client()
    response = client.post("/api/v1/conversions", json={"reference": f"{registry.host}/demo/app:v1"}, headers=AUTH)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["job"]["digest"] == pushed  # pinned to what the tag named at request time
    missing = client.post("/api/v1/conversions", json={"reference": f"{registry.host}/demo/app:nope"}, headers=AUTH)
    assert missing.status_code == 404 and "does not exist" in missing.get_json()["error"]
    unreachable = client.post("/api/v1/conversions", json={"reference": "127.0.0.1:9/demo/app:v1"}, headers=AUTH)
    assert unreachable.status_code == 502 and "cannot resolve" in unreachable.get_json()["error"]


def test_manual_trigger_uses_named_rule_suffix(tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path, rules=(Rule(), Rule(name="accel", suffix="_accel",
                                                              options={"oci": True}))))
    response = app.test_client().post("/api/v1/conversions", headers=AUTH, json={
        "reference": "r.example/demo/app:v1@" + digest_of("x"), "rule": "accel"})
    job = response.get_json()["job"]
    assert job["target_tag"] == "v1_accel" and job["options"] == {"oci": True}


# --- metrics and logs ---------------------------------------------------------------------------


def test_metrics_count_received_accepted_ignored_by_reason(client: FlaskClient) -> None:
    post_distribution(client, envelope(distribution_event(), distribution_event(action="pull"),
                                       distribution_event(tag=None, media_type="application/octet-stream")))
    client.post("/hooks/harbor", json=harbor_default("v1", digest_of("h")), headers=AUTH)
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'obd_webhook_events_received_total{source="distribution"} 3.0' in text
    assert 'obd_webhook_events_received_total{source="harbor"} 1.0' in text
    assert 'obd_webhook_events_accepted_total{source="distribution"} 1.0' in text
    assert 'obd_webhook_events_ignored_total{reason="not_push"} 1.0' in text
    assert 'obd_webhook_events_ignored_total{reason="blob"} 1.0' in text
    assert 'obd_webhook_jobs{state="queued"} 2.0' in text
    assert "obd_webhook_queue_depth 2.0" in text
    assert "obd_webhook_conversion_duration_seconds_count 0.0" in text


def test_metrics_can_be_public(tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path, metrics_require_auth=False))
    assert app.test_client().get("/metrics").status_code == 200


def test_no_secret_in_logs(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    post_distribution(client, envelope(distribution_event()))
    client.post("/hooks/distribution", data=b"{}", headers={"Authorization": f"Bearer {SECRET}x"})
    client.post("/hooks/distribution", data=b"nope", headers=AUTH)
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "unauthorized request" in text and "event accepted" in text  # the logs were captured
    assert SECRET not in text and OLD_SECRET not in text


def test_status_page_renders_jobs(client: FlaskClient) -> None:
    post_distribution(client, envelope(distribution_event(repository="team/web", tag="2.0")))
    page = client.get("/status", headers=AUTH)
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "team/web:2.0" in html and 'data-state="queued"' in html
    assert client.get("/", headers=AUTH).status_code == 302
