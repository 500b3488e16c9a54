"""The trust model for registry hosts (docs/webhook.md, "Threat model"): the service contacts only the
registries the operator configured, whatever host an event or API call names; hooks may be bound to
their registry; registry and repository travel as a pair from intake to the converter.

Issue 14 items 1, 2, 4 and 5; the forged-`Host` test pushes through a real Distribution registry.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import requests
import yaml
from flask.testing import FlaskClient

from tests.harness import layers as L
from tests.harness.oci import Image, build_layout, push_image
from tests.harness.registry import Endpoint
from tests.test_pipeline_registry import VSIZE_GIB, app_image
from tests.test_webhook_redis import RedisServer
from tests.test_webhook_support import (
    AUTH,
    OCI_MANIFEST,
    SECRET,
    ServeProcess,
    digest_of,
    distribution_event,
    envelope,
    harbor_default,
    wait_until,
)
from webhook.app import create_app
from webhook.cli import snippets_text
from webhook.config import Config, ConfigError, RegistrySettings, RetrySettings, Rule, load_config
from webhook.conversion import ConversionRequest, default_convert
from webhook.events import parse_distribution
from webhook.redis_queue import RedisBackend
from webhook.retry import RetryPolicy
from webhook.rules import decide, rule_matches
from webhook.store import Intake, JobState, JobStore, NewJob
from webhook.trust import configured_registry, host_matches
from webhook.worker import Worker, WorkerSettings

SKOPEO_COPY = "tests.test_webhook_support:skopeo_copy_convert"


def app_client(tmp_path: Path, **overrides) -> FlaskClient:
    config = Config(data_dir=tmp_path / "data", secrets=(SECRET,), **overrides)
    return create_app(config).test_client()


def post(client: FlaskClient, path: str, *events: dict) -> dict:
    response = client.post(path, data=envelope(*events), headers=AUTH, content_type="application/json")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def ignored_metric(client: FlaskClient, reason: str) -> float:
    for line in client.get("/metrics", headers=AUTH).get_data(as_text=True).splitlines():
        if line.startswith(f'obd_webhook_events_ignored_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- item 1: `oci:` and other non-host values never reach a layout ---------------------------------


def test_oci_layout_paths_are_unreachable_from_every_intake_path(tmp_path: Path) -> None:
    client = app_client(tmp_path)  # zero configuration: loopback registries only
    digest = digest_of("lay")
    forged = distribution_event(repository="tmp/x/lay", tag="v1", digest=digest, host="oci:")
    dotted = distribution_event(repository="tmp/x/lay", tag="v2", digest=digest, host="oci:..")
    summary = post(client, "/hooks/distribution", forged, dotted)
    assert summary["accepted"] == [] and summary["ignored"] == {"host_not_allowed": 2}

    zot = {"specversion": "1.0", "id": "z-oci", "type": "zotregistry.image.updated", "source": "zot",
           "data": {"name": "tmp/x/lay", "reference": "v1", "digest": digest, "mediaType": OCI_MANIFEST}}
    generic = client.post("/hooks/generic?registry=oci:", json=zot, headers=AUTH).get_json()
    assert generic["accepted"] == [] and generic["ignored"] == {"host_not_allowed": 1}

    harbor = harbor_default("v1", digest, repo="tmp/x/lay", host="oci:")
    assert client.post("/hooks/harbor", json=harbor, headers=AUTH).get_json()["ignored"] == {"host_not_allowed": 1}

    for reference in (f"oci:/tmp/x/lay:v1@{digest}", f"oci:tmp/x/lay:v1@{digest}"):
        response = client.post("/api/v1/conversions", json={"reference": reference}, headers=AUTH)
        assert response.status_code == 400 and "registry host" in response.get_json()["error"]
    assert client.get("/api/v1/conversions", headers=AUTH).get_json()["jobs"] == []


def test_worker_refuses_a_stored_job_naming_an_oci_layout_and_leaves_it_untouched(tmp_path: Path) -> None:
    """A job queued by an older version (or edited into the store) still cannot make the worker open a
    layout: the worker checks the registry against the configuration, and the converter is handed a
    registry location built from parts, which has no `oci:` form."""
    layout = build_layout(tmp_path / "lay", Image([[L.file("secret.txt", b"s\n")]]))
    index_before = (layout.layout / "index.json").read_bytes()
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = NewJob(registry="oci:", repository=str(layout.layout).lstrip("/"), tag="latest",
                 digest=layout.digest, target_tag="v1_obd", rule="default")
    job_id = store.record([Intake("api", job=job)])[0].job_id
    worker = Worker(store, default_convert, RetryPolicy(RetrySettings()),
                    WorkerSettings(poll_interval_seconds=0.01))
    assert worker.run_once() is not None
    dead = store.get(job_id)
    assert dead.state is JobState.DEAD and "not configured" in dead.last_error
    assert (layout.layout / "index.json").read_bytes() == index_before
    store.close()


def test_converter_location_from_parts_refuses_non_hosts() -> None:
    from converter.registry import InvalidReferenceError
    from converter.transport import registry_location

    digest = digest_of("x")
    for host in ("oci:", "oci:/tmp", "a/b", "x@y", "", "h:port"):
        with pytest.raises(InvalidReferenceError, match="registry host"):
            registry_location(host, "demo/app", digest=digest)
    location = registry_location("registry", "team/app", digest=digest)
    assert not location.is_layout and (location.registry, location.repository) == ("registry", "team/app")


# --- item 2: the event's host is a claim; only configured registries are contacted ----------------


def test_unbound_hook_accepts_only_configured_registries_and_counts_the_rest(tmp_path: Path) -> None:
    registries = {"registry.example.com": RegistrySettings(aliases=("registry.internal:5000",))}
    client = app_client(tmp_path, registries=registries)
    summary = post(client, "/hooks/distribution",
                   distribution_event(tag="a", host="registry.example.com"),
                   distribution_event(tag="b", host="REGISTRY.internal:5000"),  # an alias, any case
                   distribution_event(tag="c", host="127.0.0.1:5000"),  # loopback: not configured here
                   distribution_event(tag="d", host="evil.example:443"))
    assert len(summary["accepted"]) == 2 and summary["ignored"] == {"host_not_allowed": 2}
    jobs = client.get("/api/v1/conversions", headers=AUTH).get_json()["jobs"]
    assert {j["registry"] for j in jobs} == {"registry.example.com"}  # the alias maps to the registry key
    assert ignored_metric(client, "host_not_allowed") == 2


def test_bound_hook_ignores_events_claiming_another_host(tmp_path: Path) -> None:
    registries = {"registry.example.com": RegistrySettings(aliases=("registry.internal:5000",)),
                  "other.example.com": RegistrySettings()}
    client = app_client(tmp_path, registries=registries)
    path = "/hooks/distribution/registry.example.com"
    no_host = distribution_event(tag="nohost")
    del no_host["request"]["host"], no_host["target"]["url"], no_host["source"]
    summary = post(client, path,
                   distribution_event(tag="own", host="registry.example.com"),
                   distribution_event(tag="alias", host="registry.internal:5000"),
                   no_host,  # nothing claimed: the hook's registry
                   distribution_event(tag="forged", host="127.0.0.1:6379"),
                   distribution_event(tag="sibling", host="other.example.com"))  # configured, but not this hook's
    assert len(summary["accepted"]) == 3 and summary["ignored"] == {"host_not_allowed": 2}
    jobs = client.get("/api/v1/conversions", headers=AUTH).get_json()["jobs"]
    assert {(j["registry"], j["tag"]) for j in jobs} == {
        ("registry.example.com", t) for t in ("own", "alias", "nohost")}
    unknown = client.post("/hooks/distribution/127.0.0.1:6379", data=envelope(distribution_event()),
                          headers=AUTH, content_type="application/json")
    assert unknown.status_code == 404 and "is configured" in unknown.get_json()["error"]
    harbor = client.post("/hooks/harbor/other.example.com", headers=AUTH,
                         json=harbor_default("v1", digest_of("h"), host="other.example.com")).get_json()
    assert len(harbor["accepted"]) == 1


def test_zero_configuration_allows_loopback_registries_only(tmp_path: Path) -> None:
    client = app_client(tmp_path)
    summary = post(client, "/hooks/distribution", *[
        distribution_event(tag=f"t{i}", host=host) for i, host in enumerate(
            ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "10.0.0.8:5000", "registry", "localhost.evil.com"))])
    assert len(summary["accepted"]) == 3 and summary["ignored"] == {"host_not_allowed": 3}
    assert configured_registry({}, "LOCALHOST:5000") == "localhost:5000"


def test_api_triggers_only_configured_registries(tmp_path: Path) -> None:
    client = app_client(tmp_path, registries={"registry": RegistrySettings()})
    digest = digest_of("api")
    accepted = client.post("/api/v1/conversions", json={"reference": f"registry/team/app:v1@{digest}"},
                           headers=AUTH)
    assert accepted.status_code == 201
    assert (accepted.get_json()["job"]["registry"], accepted.get_json()["job"]["repository"]) == (
        "registry", "team/app")
    refused = client.post("/api/v1/conversions", json={"reference": f"127.0.0.1:6379/team/app:v1@{digest}"},
                          headers=AUTH)
    assert refused.status_code == 403 and "host_not_allowed" in refused.get_json()["error"]


def test_configuration_rejects_non_host_registry_keys_and_patterns(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    for text, message in [
        ("registries: {'oci:': {}}\n", "registries.oci:"),
        ("registries: {'reg/x': {}}\n", "not a host"),
        ("registries: {reg.example: {aliases: ['http://reg']}}\n", "not a host"),
        ("rules: [{name: x, registries: ['*/x']}]\n", r"rules\[0\]\.registries"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path, {})
    path.write_text("registries: {'[::1]:5000': {aliases: [localhost:5000]}}\n")
    assert load_config(path, {}).registries["[::1]:5000"].aliases == ("localhost:5000",)


# --- item 4: registry globs never cross `/` and match host[:port] as a whole -----------------------


def test_registry_globs_match_hosts_not_paths() -> None:
    assert host_matches("*.corp.example", "reg.corp.example")
    assert not host_matches("*.corp.example", "127.0.0.1:56169/x.corp.example")
    assert not host_matches("*.corp.example", "reg.corp.example:5000")  # the port is part of the host
    assert host_matches("*.corp.example:*", "reg.corp.example:5000")
    assert host_matches("127.0.0.1:*", "127.0.0.1:5000") and not host_matches("127.0.0.1:*", "127.0.0.10:5")
    assert host_matches("[::1]:*", "[::1]:5000")  # brackets are literal, not a character class
    assert host_matches("*", "registry") and not host_matches("*", "oci:")
    event = parse_distribution({"events": [distribution_event(host="127.0.0.1:56169/x.corp.example")]})[0]
    assert not rule_matches(Rule(registries=("*.corp.example",)), event)
    # Even with that name configured, the forged "host/path" names no configured registry.
    config = Config(registries={"x.corp.example": RegistrySettings()}, rules=(Rule(registries=("*.corp.example",)),))
    assert decide(event, config).reason == "host_not_allowed"


# --- item 5: registry and repository travel as a pair, end to end ---------------------------------


def test_single_label_registry_travels_as_a_pair_through_store_worker_and_converter(
        tmp_path: Path, registry, oci_image_builder) -> None:
    """`registry` (a compose service name) used to be re-parsed as Docker Hub's `registry/...`."""
    built = oci_image_builder(app_image())
    digest = push_image(built, registry, "team/app:v1")
    settings = RegistrySettings(endpoint=f"http://{registry.host}", insecure=True)
    config = Config(data_dir=tmp_path / "data", secrets=(SECRET,), registries={"registry": settings},
                    rules=(Rule(options={"vsize": VSIZE_GIB, "cache_dir": str(tmp_path / "cache"),
                                         "work_dir": str(tmp_path)}),))
    store = JobStore(config.db_path)
    client = create_app(config, store).test_client()
    event = distribution_event(repository="team/app", tag="v1", digest=digest, host="registry")
    (job_id,) = post(client, "/hooks/distribution/registry", event)["accepted"]
    job = store.get(job_id)
    assert (job.registry, job.repository) == ("registry", "team/app")
    worker = Worker(store, default_convert, RetryPolicy(config.retry), WorkerSettings(), config.registries)
    assert worker.run_once() is not None
    done = store.get(job_id)
    assert done.state is JobState.SUCCEEDED, done.last_error
    listed = requests.get(f"{registry.url}/v2/team/app/tags/list", timeout=5).json()["tags"]
    assert set(listed) == {"v1", "v1_obd"}
    store.close()


def test_redis_backend_keeps_registry_and_repository_apart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        config = Config(data_dir=tmp_path / "data", secrets=(SECRET,), queue="redis", redis_url=server.url)
        backend = RedisBackend(server.url, config)
        job = NewJob(registry="registry", repository="team/app", tag="v1", digest=digest_of("r"),
                     target_tag="v1_obd", rule="default")
        job_id = backend.record([Intake("api", job=job)])[0].job_id
        stored = backend.get(job_id)
        assert (stored.registry, stored.repository, stored.tag) == ("registry", "team/app", "v1")
    finally:
        server.stop()


# --- a forged Host through a real registry ---------------------------------------------------------


class Trap:
    """A listening socket that counts the connections it receives (where a forged Host points)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _push_manifest_with_host(registry, repository: str, tag: str, raw: bytes, media_type: str, host: str) -> None:
    response = requests.put(f"{registry.url}/v2/{repository}/manifests/{tag}", data=raw, timeout=10,
                            headers={"Content-Type": media_type, "Host": host})
    assert response.status_code == 201, response.text


def test_forged_host_push_through_a_real_registry_never_makes_the_worker_contact_that_host(
        tmp_path: Path, registry_factory) -> None:
    trap = Trap()
    service = ServeProcess(tmp_path / "data", {"OBD_WEBHOOK_CONVERT_CALLABLE": SKOPEO_COPY, "TMPDIR": str(tmp_path)})
    registry = registry_factory(notifications=[Endpoint(
        url=f"{service.url}/hooks/distribution", headers={"Authorization": [f"Bearer {SECRET}"]},
        ignored_mediatypes=["application/octet-stream"], ignore_actions=["pull", "mount", "delete"])])
    # The registry is the only configured one (which also ends the zero-configuration loopback default).
    config = tmp_path / "webhook.yaml"
    config.write_text(yaml.safe_dump({"registries": {registry.host: {"endpoint": f"http://{registry.host}",
                                                                      "insecure": True}}}))
    service.env["OBD_WEBHOOK_CONFIG"] = str(config)
    service.start()
    try:
        layout = build_layout(tmp_path / "img", Image([[L.file("a.txt", b"a\n")]]))
        digest = push_image(layout, registry, "demo/app:v1")
        raw = requests.get(f"{registry.url}/v2/demo/app/manifests/{digest}", timeout=5,
                           headers={"Accept": OCI_MANIFEST}).content
        # The same manifest under two more tags, pushed with a forged Host header: Distribution copies it
        # into request.host and target.url of the notification it sends.
        _push_manifest_with_host(registry, "demo/app", "forged", raw, OCI_MANIFEST, f"127.0.0.1:{trap.port}")
        _push_manifest_with_host(registry, "demo/app", "layout", raw, OCI_MANIFEST, "oci:")

        def jobs() -> list[dict]:
            return requests.get(service.url + "/api/v1/conversions", headers=AUTH, timeout=5).json()["jobs"]

        def ignored_forged() -> float:
            metrics = requests.get(service.url + "/metrics", headers=AUTH, timeout=5).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith('obd_webhook_events_ignored_total{reason="host_not_allowed"}'))

        wait_until(lambda: ignored_forged() == 2, timeout=60, interval=0.2, what="both forged pushes ignored")
        wait_until(lambda: [j["state"] for j in jobs()] == ["succeeded"], timeout=90, interval=0.2,
                   what="the genuine push converted")
        wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, what="events delivered")
        (job,) = jobs()
        assert (job["registry"], job["tag"]) == (registry.host, "v1")
        assert trap.connections == 0
        tags = requests.get(f"{registry.url}/v2/demo/app/tags/list", timeout=5).json()["tags"]
        assert set(tags) == {"v1", "forged", "layout", "v1_obd"}
        assert json.loads(requests.get(f"{registry.url}/v2/demo/app/manifests/v1_obd", timeout=5, headers={
            "Accept": OCI_MANIFEST}).content)["layers"]
    finally:
        service.stop()
        trap.close()


def test_bound_hook_with_a_single_label_registry_through_a_real_registry_and_the_real_pipeline(
        tmp_path: Path, registry_factory) -> None:
    """The recommended setup: the registry's notifications go to `/hooks/distribution/<its name>`; the
    name is a compose-style single label, the address it is pushed to is an alias, the service reaches
    it through `endpoint`. A forged Host is ignored; the genuine push becomes a real overlaybd image."""
    trap = Trap()
    service = ServeProcess(tmp_path / "data", {"TMPDIR": str(tmp_path)})
    registry = registry_factory(notifications=[Endpoint(
        url=f"{service.url}/hooks/distribution/registry", headers={"Authorization": [f"Bearer {SECRET}"]},
        ignored_mediatypes=["application/octet-stream"], ignore_actions=["pull", "mount", "delete"])])
    config = tmp_path / "webhook.yaml"
    config.write_text(yaml.safe_dump({
        "registries": {"registry": {"endpoint": f"http://{registry.host}", "insecure": True,
                                    "aliases": [registry.host]}},
        "rules": [{"name": "all", "options": {"vsize": VSIZE_GIB, "cache_dir": str(tmp_path / "cache"),
                                              "work_dir": str(tmp_path)}}]}))
    service.env["OBD_WEBHOOK_CONFIG"] = str(config)
    service.start()
    try:
        layout = build_layout(tmp_path / "img", app_image())
        digest = push_image(layout, registry, "team/app:v1")
        raw = requests.get(f"{registry.url}/v2/team/app/manifests/{digest}", timeout=5,
                           headers={"Accept": OCI_MANIFEST}).content
        _push_manifest_with_host(registry, "team/app", "forged", raw, OCI_MANIFEST, f"127.0.0.1:{trap.port}")

        def jobs() -> list[dict]:
            return requests.get(service.url + "/api/v1/conversions", headers=AUTH, timeout=5).json()["jobs"]

        wait_until(lambda: [j["state"] for j in jobs()] == ["succeeded"], timeout=180, interval=0.3,
                   what="the genuine push converted")
        wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, what="events delivered")
        metrics = requests.get(service.url + "/metrics", headers=AUTH, timeout=5).text
        assert 'obd_webhook_events_ignored_total{reason="host_not_allowed"} 1.0' in metrics
        assert 'obd_webhook_events_ignored_total{reason="own_user_agent"} 1.0' in metrics  # our own push
        (job,) = jobs()
        assert (job["registry"], job["repository"], job["target_ref"]) == ("registry", "team/app",
                                                                           "registry/team/app:v1_obd")
        assert trap.connections == 0
        tags = requests.get(f"{registry.url}/v2/team/app/tags/list", timeout=5).json()["tags"]
        assert set(tags) == {"v1", "forged", "v1_obd"}
    finally:
        service.stop()
        trap.close()


def test_default_convert_hands_the_engine_registry_and_repository_unparsed(
        tmp_path: Path, registry, oci_image_builder) -> None:
    """The conversion hook itself: a single-label registry name reaches the engine as the registry (its
    endpoint setting says where it is), not as the Docker Hub namespace `docker.io/registry/...`."""
    digest = push_image(oci_image_builder(app_image()), registry, "solo/app:v1")
    request = ConversionRequest(
        job_id="j1", registry="registry", repository="solo/app", tag="v1", digest=digest, target_tag="v1_obd",
        options={"vsize": VSIZE_GIB, "cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path)},
        registry_settings=RegistrySettings(endpoint=f"http://{registry.host}", insecure=True))
    result = default_convert(request)
    assert result.target_ref == "registry/solo/app:v1_obd" and result.target_digest
    tags = requests.get(f"{registry.url}/v2/solo/app/tags/list", timeout=5).json()["tags"]
    assert set(tags) == {"v1", "v1_obd"}


def test_first_start_snippet_prints_the_line_that_adds_a_registry(tmp_path: Path) -> None:
    text = snippets_text(Config(listen="127.0.0.1:8080"), SECRET, "generated now")
    assert "only registries on this machine" in text and "url: http://127.0.0.1:8080/hooks/distribution\n" in text
    (line,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("OBD_WEBHOOK_REGISTRIES=")]
    name, _, value = line.partition("=")
    config = load_config(None, {name: value.strip("'"), "OBD_WEBHOOK_SECRETS": SECRET})
    assert configured_registry(config.registries, "registry.example.com:5000") == "registry.example.com:5000"
    assert configured_registry(config.registries, "127.0.0.1:5000") is None  # the loopback default ends
    bound = snippets_text(config, SECRET, "stored")
    assert "url: http://127.0.0.1:8080/hooks/distribution/registry.example.com:5000" in bound
    assert "/hooks/harbor/registry.example.com:5000" in bound
