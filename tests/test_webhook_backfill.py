"""Backfill against a real registry: a pre-filled Distribution 2.8.2, the real worker and conversion engine.

The registry holds 30 tags in 6 repositories: images that match the rule, tags the rule excludes, an
output that is already up to date, outputs made by hand, helm-chart artifacts, a signature tag, and a
multi-arch index. The backfill must queue exactly the convertible, not yet converted tags.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests

from converter.pipeline import convert
from converter.registry import DOCKER_LIST, OCI_INDEX, NotFoundError
from tests.harness.httpserver import QuietHandler, serve_in_background, stop_server
from tests.harness.oci import build_layout, push_image
from tests.harness.registry import Endpoint
from tests.lifecycle_helpers import (
    AUTH,
    annotations,
    client_for,
    drain,
    push_helm_chart,
    push_image_tag,
    retag,
    service_config,
    tiny_image,
    worker_for,
    write_config,
)
from tests.test_webhook_support import SECRET, ServeProcess, read_records, wait_until
from webhook.app import create_app
from webhook.backfill import BackfillRequest, run_backfill
from webhook.cli import main
from webhook.lifecycle import ANN_SOURCE_DIGEST
from webhook.registry_access import ListingError, repositories
from webhook.store import JobStore

RULES = [{"name": "team", "repositories": ["team/*"], "exclude_tags": ["skip-*", "ci-*"]}]
EXPECTED = {"team/web:v1", "team/web:v2", "team/web:v3", "team/web:latest", "team/api:1.1", "team/api:dev",
            "team/multi:v1", "team/tools:a1", "team/tools:a2"}
EXPECTED_SKIPS = {"up_to_date": 1, "output_tag": 2, "not_image": 4, "no_matching_rule": 14}


@pytest.fixture
def prefilled(registry, tmp_path: Path) -> Any:
    """30 tags in 6 repositories (see the module doc); returns the registry."""
    client = client_for(registry)
    for n in (1, 2, 3):
        push_image_tag(client, tmp_path, "team/web", f"v{n}", f"web {n}")
    retag(client, "team/web", "v3", "latest")
    push_image_tag(client, tmp_path, "team/web", "skip-1", "skipped")  # excluded by the rule
    push_image_tag(client, tmp_path, "team/api", "1.0", "api 1.0")
    push_image_tag(client, tmp_path, "team/api", "1.1", "api 1.1")
    push_image_tag(client, tmp_path, "team/api", "dev", "api dev")
    push_image_tag(client, tmp_path, "team/api", "1.1_obd", "made by hand")  # an output name, not ours
    options = {"vsize": 1, "cache_dir": str(tmp_path / "layer-cache"), "work_dir": str(tmp_path),
               "registry": {"endpoint": f"http://{registry.host}", "insecure": True}}
    convert(f"{registry.host}/team/api:1.0", f"{registry.host}/team/api:1.0_obd", options)  # already converted
    push_image_tag(client, tmp_path, "team/multi", "v1", "multi", multi=True)
    push_helm_chart(client, "team/multi", "sha256-" + "a" * 64 + ".sig", "signature")
    for n in (1, 2, 3):
        push_helm_chart(client, "team/charts", f"c{n}", f"chart {n}")
    for n in range(1, 6):
        push_image_tag(client, tmp_path, "other/lib", f"{n}.0", f"lib {n}")
    push_image_tag(client, tmp_path, "team/tools", "a1", "tools a1")
    push_image_tag(client, tmp_path, "team/tools", "a2", "tools a2")
    for n in range(1, 9):
        retag(client, "team/tools", "a1", f"ci-{n}")
    total = sum(len(client.list_tags(r)) for r in client.list_repositories())
    assert total == 30
    client.close()
    return registry


def references(store: JobStore) -> set[str]:
    return {f"{j.repository}:{j.tag}" for j in store.list_jobs(limit=1000)}


def test_backfill_converts_exactly_the_expected_set(prefilled, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    registry = prefilled
    config_file = write_config(registry, tmp_path, RULES)
    config = service_config(registry, tmp_path, RULES)
    store = JobStore(config.db_path)
    host = registry.host

    # A dry run prints what it would queue and queues nothing.
    assert main(["backfill", "--config", str(config_file), "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert set(dry["would_queue"]) == {f"{host}/{ref}" for ref in EXPECTED}
    assert dry["queued"] == len(EXPECTED) and dry["skipped"] == EXPECTED_SKIPS
    assert dry["listed"] == {"repositories": 6, "tags": 30}
    assert store.list_jobs() == []
    assert main(["backfill", "--config", str(config_file), "--dry-run", "--limit", "3"]) == 0
    assert "would queue 3 conversion(s)" in capsys.readouterr().out
    assert store.list_jobs() == []

    # The real run, through the authenticated API.
    app = create_app(config, store)
    http = app.test_client()
    assert http.post("/api/v1/backfill", json={"wait": True}).status_code == 401
    answer = http.post("/api/v1/backfill", json={"wait": True}, headers=AUTH)
    assert answer.status_code == 200, answer.get_json()
    run = answer.get_json()
    assert run["state"] == "finished" and run["queued"] == len(EXPECTED) and run["skipped"] == EXPECTED_SKIPS
    assert references(store) == EXPECTED
    assert {(j.origin, j.priority) for j in store.list_jobs()} == {("backfill", 10)}

    ran = drain(worker_for(store, config))
    assert len(ran) == len(EXPECTED)
    client = client_for(registry)
    for job in store.list_jobs():
        assert job.state.value == "succeeded", job.last_error
        assert annotations(client, job.repository, job.target_tag)[ANN_SOURCE_DIGEST] == job.digest
    multi = client.get_manifest("team/multi", "v1_obd")
    assert multi.media_type in (OCI_INDEX, DOCKER_LIST) and len(multi.json()["manifests"]) == 2
    for skipped in ("skip-1_obd", "ci-1_obd"):
        with pytest.raises(NotFoundError):
            client.get_manifest("team/tools" if skipped.startswith("ci") else "team/web", skipped)
    assert "c1_obd" not in client.list_tags("team/charts") and "1.0_obd" not in client.list_tags("other/lib")

    progress = http.get(f"/api/v1/backfill/{run['id']}", headers=AUTH).get_json()
    assert progress["jobs"] == {"done": len(EXPECTED), "failed": 0, "pending": 0, "superseded": 0}
    status = http.get("/status", headers=AUTH).get_data(as_text=True)
    assert f'data-run-id="{run["id"]}"' in status and "backfill" in status

    # Again: nothing to queue; every converted tag is up to date. The catalog needed 3+ pages of 2.
    catalog_pages = []
    client.session.hooks["response"].append(
        lambda r, *a, **k: catalog_pages.append(r.url) if "/v2/_catalog" in r.url else None)
    again = run_backfill(config, store, BackfillRequest(host), client=client)
    assert again.state == "finished" and again.queued == 0
    assert again.skipped["up_to_date"] == len(EXPECTED) + 1
    assert len(catalog_pages) >= 3 and again.repositories == 6
    assert len(store.list_jobs(limit=1000)) == len(EXPECTED)

    metrics = http.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert f'obd_webhook_backfill_tags_total{{outcome="queued"}} {float(len(EXPECTED))}' in metrics
    assert 'obd_webhook_backfill_tags_total{outcome="skipped_not_image"} 8.0' in metrics  # two real runs
    client.close()


def test_backfill_jobs_pending_are_not_queued_twice(prefilled, tmp_path: Path) -> None:
    config = service_config(prefilled, tmp_path, RULES)
    store = JobStore(config.db_path)
    first = run_backfill(config, store, BackfillRequest(prefilled.host, repositories=("team/web",)))
    assert first.queued == 4 and first.repositories == 1
    second = run_backfill(config, store, BackfillRequest(prefilled.host, repositories=("team/web",)))
    assert second.queued == 0 and second.skipped["already_queued"] == 4
    limited = run_backfill(config, store, BackfillRequest(prefilled.host, repositories=("team/ap*",),
                                                          tags=("1.*",), limit=5))
    assert limited.queued == 1 and references(store) == {f"team/web:{t}" for t in ("v1", "v2", "v3", "latest")} | {
        "team/api:1.1"}


def test_list_tags_and_catalog_follow_link_pages(registry, tmp_path: Path) -> None:
    client = client_for(registry)
    for n in range(5):
        push_image_tag(client, tmp_path, f"repo{n}", "t", f"r{n}")
        retag(client, "repo0", "t", f"t{n}")
    pages: list[str] = []
    client.session.hooks["response"].append(lambda r, *a, **k: pages.append(r.url))
    # Distribution 2.8 answers tags/list in one page whatever `n` says (3.x pages it); the Link-following
    # code is the catalog's, exercised below.
    assert sorted(client.list_tags("repo0", page_size=2)) == ["t", "t0", "t1", "t2", "t3", "t4"]
    assert all("n=2" in p for p in pages)
    pages.clear()
    assert sorted(client.list_repositories(page_size=2)) == [f"repo{n}" for n in range(5)]
    assert len(pages) >= 3
    client.close()


class FakeHarbor(QuietHandler):
    """Harbor's REST API as far as listing goes (no Harbor can run here); its catalog is disabled."""

    projects: ClassVar[list[dict]] = [{"name": "p1"}, {"name": "p2"}, {"name": "p3"}]
    repos: ClassVar[dict[str, list[dict]]] = {"p1": [{"name": "p1/app"}, {"name": "p1/web"}], "p2": [],
                                              "p3": [{"name": "p3/tools/x"}]}
    seen_auth: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        FakeHarbor.seen_auth.append(self.headers.get("Authorization"))
        if parts.path == "/v2/_catalog":
            return self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "catalog disabled"}]})
        page, size = int(query.get("page", 1)), int(query.get("page_size", 10))
        if parts.path == "/api/v2.0/projects":
            items = self.projects
        elif parts.path.startswith("/api/v2.0/projects/") and parts.path.endswith("/repositories"):
            items = self.repos.get(parts.path.split("/")[4], [])
        else:
            return self._send(404, {"errors": [{"code": "NOT_FOUND", "message": "no such API"}]})
        return self._send(200, items[(page - 1) * size: page * size])

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_harbor() -> Iterator[str]:
    server = serve_in_background(0, FakeHarbor)
    FakeHarbor.seen_auth = []
    yield f"127.0.0.1:{server.server_address[1]}"
    stop_server(server)


def test_harbor_api_lists_repositories_when_catalog_is_disabled(fake_harbor: str) -> None:
    from converter.registry import RegistryClient

    client = RegistryClient(fake_harbor, plain_http=True, credentials="robot$obd:s3cret", docker_config="/nonexistent")
    assert list(repositories(client, ["*"], page_size=2)) == ["p1/app", "p1/web", "p3/tools/x"]
    assert list(repositories(client, ["p1/*"], page_size=2)) == ["p1/app", "p1/web"]
    assert any(a and a.startswith("Basic ") for a in FakeHarbor.seen_auth)
    # Explicit names need no listing at all.
    FakeHarbor.seen_auth.clear()
    assert list(repositories(client, ["a/b", "c/d"], page_size=2)) == ["a/b", "c/d"]
    assert FakeHarbor.seen_auth == []
    client.close()


def test_no_catalog_and_not_harbor_is_a_clear_error(registry) -> None:
    """A registry whose catalog refuses us and that has no Harbor API: the error says what to do."""
    state = {"calls": 0}

    class NoCatalog(FakeHarbor):
        def do_GET(self) -> None:
            state["calls"] += 1
            self._send(404, {"errors": [{"code": "NOT_FOUND", "message": "not here"}]})

    server = serve_in_background(0, NoCatalog)
    try:
        from converter.registry import RegistryClient

        client = RegistryClient(f"127.0.0.1:{server.server_address[1]}", plain_http=True,
                                docker_config="/nonexistent")
        with pytest.raises(ListingError, match=r"--repository team/app"):
            list(repositories(client, ["*"], page_size=2))
        assert state["calls"] == 2  # the catalog, then Harbor's projects
    finally:
        stop_server(server)


def test_backfill_api_starts_in_background_and_validates(prefilled, tmp_path: Path) -> None:
    config = service_config(prefilled, tmp_path, RULES)
    store = JobStore(config.db_path)
    http = create_app(config, store).test_client()
    assert http.post("/api/v1/backfill", json={"limit": 0}, headers=AUTH).status_code == 400
    assert http.post("/api/v1/backfill", json={"repositories": []}, headers=AUTH).status_code == 400
    started = http.post("/api/v1/backfill", json={"repositories": ["team/web"], "dry_run": True}, headers=AUTH)
    assert started.status_code == 202
    run_id = started.get_json()["id"]
    wait_until(lambda: http.get(f"/api/v1/backfill/{run_id}", headers=AUTH).get_json().get("state") == "finished",
               timeout=30, what="background backfill finished")
    view = http.get(f"/api/v1/backfill/{run_id}", headers=AUTH).get_json()
    assert view["state"] == "finished" and view["queued"] == 4 and view["dry_run"] is True
    assert len(view["would_queue"]) == 4 and store.list_jobs() == []
    runs = http.get("/api/v1/backfill", headers=AUTH).get_json()["runs"]
    assert [r["id"] for r in runs] == [run_id]



def test_live_pushes_are_converted_before_the_remaining_backfill_jobs(registry_factory, tmp_path: Path,
                                                                      queue_env: dict[str, str]) -> None:
    """One worker, ten backfill jobs of half a second each; two pushes arrive while they run. Every job
    that starts after a push has been accepted is a live one, until both live ones have started."""
    record = tmp_path / "record.jsonl"
    service = ServeProcess(tmp_path / "data", {
        "OBD_WEBHOOK_CONVERT_CALLABLE": "tests.test_webhook_support:recording_convert",
        "OBD_TEST_RECORD": str(record), "OBD_TEST_CONVERT_SECONDS": "0.5", "OBD_WEBHOOK_WORKERS": "1",
        "TMPDIR": str(tmp_path), **queue_env})
    registry = registry_factory(notifications=[Endpoint(
        url=service.url + "/hooks/distribution", headers={"Authorization": [f"Bearer {SECRET}"]})])
    service.env["OBD_WEBHOOK_CONFIG"] = str(write_config(registry, tmp_path, [{"name": "team",
                                                                              "repositories": ["team/*"]}]))
    client = client_for(registry)
    # Tags that were there before the service: pushed with the service's own client, whose events the
    # service ignores as its own (user agent), so only the backfill finds them.
    for n in range(10):
        push_image_tag(client, tmp_path, "team/bulk", f"b{n}", f"bulk {n}")
    service.start()
    try:
        wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, timeout=30,
                   what="prefill events delivered")
        started = requests.post(service.url + "/api/v1/backfill", json={"wait": True}, headers=AUTH, timeout=60)
        assert started.status_code == 200 and started.json()["queued"] == 10, started.text
        wait_until(lambda: len(read_records(record)) >= 1, timeout=30, what="first backfill job started")
        for tag in ("l1", "l2"):
            built = build_layout(tmp_path / f"live-{tag}", tiny_image(f"live {tag}"))
            push_image(built, registry, f"team/live:{tag}")

        def jobs() -> list[dict]:
            return requests.get(service.url + "/api/v1/conversions?limit=100", headers=AUTH, timeout=5).json()["jobs"]

        wait_until(lambda: len(jobs()) == 12 and all(j["state"] == "succeeded" for j in jobs()), timeout=90,
                   what="all twelve jobs converted")
        all_jobs = jobs()
        live = [j for j in all_jobs if j["origin"] == "push"]
        backfill = [j for j in all_jobs if j["origin"] == "backfill"]
        assert sorted(j["tag"] for j in live) == ["l1", "l2"] and len(backfill) == 10
        for job in live:
            jumped = [b["tag"] for b in backfill if job["created_at"] < b["first_attempt_at"] < job["first_attempt_at"]]
            assert jumped == [], f"backfill jobs {jumped} started while live {job['tag']} waited"
        last_live_start = max(j["first_attempt_at"] for j in live)
        assert any(b["first_attempt_at"] > last_live_start for b in backfill), "backfill had finished already"
        starts = [r["job"] for r in read_records(record) if r["event"] == "start"]
        order = {j["id"]: j["origin"] for j in all_jobs}
        first_live = next(i for i, job_id in enumerate(starts) if order[job_id] == "push")
        assert [order[j] for j in starts[first_live:first_live + 2]] == ["push", "push"]
        assert "backfill" in [order[j] for j in starts[first_live + 2:]]
    finally:
        service.stop()
        client.close()


def test_backfill_walk_honours_429_retry_after(registry, tmp_path: Path) -> None:
    from tests.harness.faultproxy import FaultProxy

    client = client_for(registry)
    push_image_tag(client, tmp_path, "team/web", "v1", "web")
    client.close()
    proxy = FaultProxy(int(registry.host.rsplit(":", 1)[1])).start()
    try:
        proxy.add("status", method="GET", path="/v2/_catalog", status=429, headers={"Retry-After": "1"}, times=1)
        proxied = client_for(registry, host=proxy.host)
        assert list(repositories(proxied, ["*"], page_size=2)) == ["team/web"]
        assert [e[2] for e in proxy.log if "/v2/_catalog" in e[1]] == [429, 200]
        proxied.close()
    finally:
        proxy.stop()


def test_rate_limiter_spaces_request_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The waits it asks for, on a frozen clock (no timing in the assertion)."""
    from converter.registry import client as client_module

    slept: list[float] = []
    monkeypatch.setattr(client_module.time, "monotonic", lambda: 100.0)
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    limiter = client_module.RateLimiter(4.0)
    for _ in range(4):
        limiter.wait()
    assert slept == [0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="positive"):
        client_module.RateLimiter(0)
