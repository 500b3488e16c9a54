"""Delete mirroring and the stale report against a real Distribution 2.8.2 that sends its notifications to
the service's Flask app over HTTP; jobs run in the real worker with the real conversion engine."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from converter.pipeline import convert
from converter.registry import DeleteUnsupportedError, NotFoundError, RegistryClient
from tests.harness.oci import build_layout, push_image
from tests.harness.registry import Endpoint
from tests.lifecycle_helpers import (
    AUTH,
    SECRET,
    client_for,
    drain,
    push_image_tag,
    service_config,
    tiny_image,
    worker_for,
    write_config,
)
from tests.test_webhook_support import distribution_event, envelope, serve_app, wait_until
from webhook.app import create_app
from webhook.cli import distribution_snippet, harbor_policy, main
from webhook.config import Config, RegistrySettings
from webhook.events import parse_harbor
from webhook.lifecycle import ANN_SOURCE_DIGEST, delete_intake
from webhook.store import JobStore

MIRROR_RULES = [{"name": "mirror", "repositories": ["team/*"], "delete_mirror": True},
                {"name": "keep", "repositories": ["keep/*"]}]


class LateApp:
    """A WSGI app whose Flask app is set after the registry (whose host the config names) has started."""

    def __init__(self) -> None:
        self.app: Any = None

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        return self.app(environ, start_response)


@contextmanager
def notified_service(registry_factory, tmp_path: Path, rules: list[dict]) -> Iterator[tuple[Any, Config, JobStore]]:
    """A registry that notifies the service (no filters), the service's config and its store."""
    late = LateApp()
    with serve_app(late) as url:
        registry = registry_factory(notifications=[Endpoint(
            url=url + "/hooks/distribution", headers={"Authorization": [f"Bearer {SECRET}"]})])
        config = service_config(registry, tmp_path, rules)
        store = JobStore(config.db_path)
        late.app = create_app(config, store)
        yield registry, config, store


def delivered(registry) -> None:
    wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, timeout=30,
               what="notifications delivered")


def delete_tag(client: RegistryClient, repository: str, tag: str) -> None:
    found = client.head_manifest(repository, tag)
    assert found is not None
    client.delete_manifest(repository, found.digest)


def metric(app: Any, line_start: str) -> float:
    text = app.test_client().get("/metrics", headers=AUTH).get_data(as_text=True)
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else 0.0


def test_delete_mirroring_on_and_off_only_for_our_outputs(registry_factory, tmp_path: Path) -> None:
    with notified_service(registry_factory, tmp_path, MIRROR_RULES) as (registry, config, store):
        client = client_for(registry)
        for ref in ("team/app:v1", "team/app:v2", "team/app:hand", "keep/app:v1"):
            built = build_layout(tmp_path / ref.replace("/", "-").replace(":", "-"), tiny_image(ref))
            push_image(built, registry, ref)  # skopeo: a live push, notified to the service
        delivered(registry)
        worker = worker_for(store, config)
        assert len(drain(worker)) == 4
        assert all(j.state.value == "succeeded" for j in store.list_jobs())
        # hand_obd replaced by hand: a tag with an output's name that this service did not make.
        push_image_tag(client, tmp_path, "team/app", "hand_obd", "made by hand")
        # release: another (user) tag on the very manifest v2_obd points at.
        v2_obd = client.get_manifest("team/app", "v2_obd")
        client.put_manifest("team/app", "release", v2_obd.raw, v2_obd.media_type)
        delivered(registry)

        for repository, tag in (("team/app", "v1"), ("team/app", "hand"), ("team/app", "v2"), ("keep/app", "v1")):
            delete_tag(client, repository, tag)
        delivered(registry)
        deletes = [j for j in store.list_jobs() if j.action == "delete"]
        assert sorted(j.tag for j in deletes) == ["hand", "v1", "v2"] and {j.origin for j in deletes} == {"push"}
        drain(worker)
        delivered(registry)  # our own deletions notify too; they must be ignored, not mirrored again
        assert drain(worker) == []
        assert all(j.state.value == "succeeded" for j in store.list_jobs()), [j.last_error for j in store.list_jobs()]

        assert set(client.list_tags("team/app")) == {"hand_obd", "v2_obd", "release"}
        assert "v1_obd" in client.list_tags("keep/app")  # delete_mirror off for that rule
        assert "io.github" not in json.dumps(client.get_manifest("team/app", "hand_obd").json())
        app = create_app(config, store)
        assert metric(app, 'obd_webhook_mirror_deletes_total{outcome="deleted"}') == 1
        assert metric(app, 'obd_webhook_mirror_deletes_total{outcome="not_ours"}') == 1
        assert metric(app, 'obd_webhook_mirror_deletes_total{outcome="shared"}') == 1
        assert metric(app, 'obd_webhook_events_ignored_total{reason="delete_mirror_off"}') >= 1
        assert metric(app, 'obd_webhook_events_ignored_total{reason="output_tag"}') >= 1
        client.close()


def test_push_after_delete_supersedes_the_pending_delete(tmp_path: Path) -> None:
    """Deleting and re-pushing a tag before the worker runs: the deletion is superseded, never applied."""
    config = Config(data_dir=tmp_path, secrets=(SECRET,), rules=(Config().rules[0].__class__(delete_mirror=True),))
    store = JobStore(config.db_path)
    http = create_app(config, store).test_client()
    digest = "sha256:" + "1" * 64
    pushed = distribution_event("team/app", "v1", digest=digest)
    deleted = {**distribution_event("team/app", "v1", action="delete"), "target": {"repository": "team/app",
                                                                                   "tag": "v1"}}
    for event in (pushed, deleted, distribution_event("team/app", "v1", digest=digest)):
        answer = http.post("/hooks/distribution", data=envelope(event), headers=AUTH)
        assert answer.status_code == 200
    jobs = sorted(store.list_jobs(), key=lambda j: j.created_at)
    assert [(j.action, j.state.value) for j in jobs] == [
        ("convert", "superseded"), ("delete", "superseded"), ("convert", "queued")]


def test_registry_without_delete_gives_a_clear_job_error(registry_factory, tmp_path: Path) -> None:
    storage = {"filesystem": {"rootdirectory": str(tmp_path / "storage")}, "delete": {"enabled": False}}
    registry = registry_factory(extra_config={"storage": storage})
    client = client_for(registry)
    push_image_tag(client, tmp_path, "team/src", "v1", "source")
    options = {"vsize": 1, "cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path),
               "registry": {"endpoint": f"http://{registry.host}", "insecure": True}}
    # An output of ours whose source tag is gone (team/app:v1 never existed here).
    convert(f"{registry.host}/team/src:v1", f"{registry.host}/team/app:v1_obd", options)
    output = client.get_manifest("team/app", "v1_obd")
    assert ANN_SOURCE_DIGEST in output.json()["annotations"]
    with pytest.raises(DeleteUnsupportedError, match=r"storage\.delete\.enabled"):
        client.delete_manifest("team/app", output.digest)

    config = service_config(registry, tmp_path, MIRROR_RULES)
    store = JobStore(config.db_path)
    http = create_app(config, store).test_client()
    event = {**distribution_event("team/app", "v1", action="delete", host=registry.host),
             "target": {"repository": "team/app", "tag": "v1"}}
    answer = http.post("/hooks/distribution", data=envelope(event), headers=AUTH)
    assert answer.status_code == 200 and len(answer.get_json()["accepted"]) == 1
    job = worker_for(store, config).run_once()  # the worker survives and records the failure
    assert job is not None
    failed = store.get(job.id)
    assert failed.state.value == "dead"
    assert "does not allow deleting manifests" in failed.last_error and "storage.delete.enabled" in failed.last_error
    assert client.get_manifest("team/app", "v1_obd").digest == output.digest
    client.close()


def test_stale_after_repointing_and_deleting_then_fixed(registry, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    client = client_for(registry)
    push_image_tag(client, tmp_path, "team/app", "v1", "first v1")
    push_image_tag(client, tmp_path, "team/app", "v2", "v2")
    push_image_tag(client, tmp_path, "team/app", "x_obd", "made by hand, no source")
    config = service_config(registry, tmp_path, MIRROR_RULES)
    store = JobStore(config.db_path)
    http = create_app(config, store).test_client()
    assert http.post("/api/v1/backfill", json={"wait": True}, headers=AUTH).get_json()["queued"] == 2
    worker = worker_for(store, config)
    drain(worker)
    assert http.get("/api/v1/stale", headers=AUTH).get_json() == {"stale": [], "count": 0}
    assert http.get("/api/v1/stale").status_code == 401

    # The service was not listening: v1 now names another image, v2 is gone.
    new_v1 = push_image_tag(client, tmp_path / "new", "team/app", "v1", "second v1")
    delete_tag(client, "team/app", "v2")
    report = http.get("/api/v1/stale", headers=AUTH).get_json()
    by_tag = {s["tag"]: s for s in report["stale"]}
    assert set(by_tag) == {"v1_obd", "v2_obd"}
    assert by_tag["v1_obd"]["reason"] == "source_moved" and by_tag["v1_obd"]["current_digest"] == new_v1
    assert by_tag["v2_obd"]["reason"] == "source_gone" and by_tag["v2_obd"]["current_digest"] is None
    assert main(["stale", "--config", str(write_config(registry, tmp_path, MIRROR_RULES)), "--json"]) == 0
    assert {s["tag"] for s in json.loads(capsys.readouterr().out)["stale"]} == {"v1_obd", "v2_obd"}

    fixed = http.post("/api/v1/stale/reconvert", json={}, headers=AUTH).get_json()
    assert [(j["tag"], j["origin"], j["digest"]) for j in fixed["queued"]] == [("v1", "manual", new_v1)]
    assert [s["tag"] for s in fixed["skipped"]] == ["v2_obd"]
    drain(worker)
    assert client.get_manifest("team/app", "v1_obd").json()["annotations"][ANN_SOURCE_DIGEST] == new_v1
    assert [s["tag"] for s in http.get("/api/v1/stale", headers=AUTH).get_json()["stale"]] == ["v2_obd"]

    removed = http.post("/api/v1/stale/delete", json={"tags": ["team/app:v2_obd"]}, headers=AUTH).get_json()
    assert [(j["tag"], j["action"]) for j in removed["queued"]] == [("v2", "delete")]
    drain(worker)
    with pytest.raises(NotFoundError):
        client.get_manifest("team/app", "v2_obd")
    assert http.get("/api/v1/stale", headers=AUTH).get_json()["count"] == 0
    assert "x_obd" in client.list_tags("team/app")  # not ours: never reported, never deleted
    metrics = http.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'obd_webhook_stale_found_total{reason="source_moved"}' in metrics
    client.close()


def test_snippets_send_delete_events_only_with_delete_mirroring(tmp_path: Path) -> None:
    off = Config(data_dir=tmp_path, secrets=(SECRET,))
    on = Config(data_dir=tmp_path, secrets=(SECRET,), rules=(off.rules[0].__class__(delete_mirror=True),))
    assert "actions: [pull, mount, delete]" in distribution_snippet(off, SECRET)
    snippet = distribution_snippet(on, SECRET)
    assert "actions: [pull, mount]\n" in snippet and "#       enabled: true" in snippet
    assert "enabled" not in distribution_snippet(off, SECRET)
    assert harbor_policy(off, SECRET)["event_types"] == ["PUSH_ARTIFACT"]
    assert harbor_policy(on, SECRET)["event_types"] == ["PUSH_ARTIFACT", "DELETE_ARTIFACT"]


def test_harbor_delete_artifact_becomes_delete_jobs(tmp_path: Path) -> None:
    rules = (Config().rules[0].__class__(delete_mirror=True, turbo_oci=True),)
    config = Config(data_dir=tmp_path, secrets=(SECRET,), rules=rules,
                    registries={"harbor.example": RegistrySettings()})
    digest = "sha256:" + "2" * 64
    payload = {"type": "DELETE_ARTIFACT", "occur_at": 1, "operator": "admin", "event_data": {
        "resources": [{"digest": digest, "tag": "v1", "resource_url": "harbor.example/proj/app:v1",
                       "tags": ["v1", "stable"]}],
        "repository": {"name": "app", "namespace": "proj", "repo_full_name": "proj/app", "repo_type": "private"}}}
    intakes = [delete_intake(e, config) for e in parse_harbor(payload)]
    jobs = [i.job for i in intakes if i.job is not None]
    assert sorted(j.tag for j in jobs) == ["stable", "v1"]
    assert jobs[0].options["delete_tags"] == [jobs[0].tag + "_obd", jobs[0].tag + "_turbo"]
    by_digest = {**payload, "event_data": {**payload["event_data"], "resources": [
        {"digest": digest, "tag": digest, "resource_url": f"harbor.example/proj/app@{digest}"}]}}
    assert [delete_intake(e, config).reason for e in parse_harbor(by_digest)] == ["untagged"]
    # Deletions obey the same trust model as pushes: an unconfigured registry is never contacted.
    unconfigured = Config(data_dir=tmp_path, secrets=(SECRET,), rules=rules)
    assert {delete_intake(e, unconfigured).reason for e in parse_harbor(payload)} == {"host_not_allowed"}


def test_store_created_before_origins_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    from webhook.store import NewJob

    path = tmp_path / "old.sqlite3"
    old_schema = ("CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, state TEXT NOT NULL, "
                  "source TEXT NOT NULL, event_id TEXT, registry TEXT NOT NULL, repository TEXT NOT NULL, "
                  "tag TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT, target_tag TEXT NOT NULL, "
                  "image_key TEXT NOT NULL, rule TEXT NOT NULL, options TEXT NOT NULL, "
                  "attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL, "
                  "first_attempt_at REAL, next_attempt_at REAL NOT NULL, started_at REAL, finished_at REAL, "
                  "lease_owner TEXT, lease_token TEXT, lease_expires_at REAL, last_error TEXT, target_digest TEXT, "
                  "bytes_written INTEGER, superseded_by TEXT)")
    with sqlite3.connect(path) as conn:
        conn.execute(old_schema)
        conn.execute("INSERT INTO jobs(id, state, source, registry, repository, tag, digest, target_tag, image_key, "
                     "rule, options, created_at, updated_at, next_attempt_at) VALUES ('old', 'queued', 'api', "
                     "'r', 'a', 'v1', 'sha256:x', 'v1_obd', 'r/a:v1_obd', 'default', '{}', 1, 1, 1)")
    store = JobStore(path)
    assert (store.get("old").origin, store.get("old").action, store.get("old").priority) == ("push", "convert", 0)
    from webhook.store import Intake

    store.record([Intake("backfill", job=NewJob("r", "a", "v2", "sha256:y", "v2_obd", "default",
                                                 origin="backfill"))], now=0.5)
    claimed = store.claim("w", 60)
    assert claimed is not None and claimed.id == "old"  # a live job first, although the backfill one is older
    store.close()


def test_walks_only_reach_registries_a_rule_covers(registry, tmp_path: Path) -> None:
    config = service_config(registry, tmp_path, [{"name": "only", "registries": [registry.host]}])
    http = create_app(config, JobStore(config.db_path)).test_client()
    answer = http.post("/api/v1/backfill", json={"registry": "evil.example:443", "wait": True}, headers=AUTH)
    assert answer.status_code == 400 and "no rule covers it" in answer.get_json()["error"]
    assert http.get("/api/v1/stale?registry=evil.example:443", headers=AUTH).status_code == 400
    assert http.get("/api/v1/stale", headers=AUTH).get_json() == {"stale": [], "count": 0}


def backfill_then_push(store: Any) -> tuple[str, str]:
    from webhook.store import Intake, NewJob

    job = NewJob("r:5000", "team/app", "v1", "sha256:" + "3" * 64, "v1_obd", "default", origin="backfill")
    first = store.record([Intake("backfill", job=job)])[0]
    again = store.record([Intake("distribution", event_id="e1", job=NewJob(**{**vars(job), "origin": "push"}))])[0]
    assert first.status == "accepted" and again.status == "duplicate_image" and again.job_id == first.job_id
    return first.job_id, store.get(first.job_id).origin


def test_a_push_of_what_a_backfill_job_waits_for_moves_it_to_the_front(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    job_id, origin = backfill_then_push(store)
    assert origin == "push" and store.get(job_id).priority == 0
    store.close()


def test_redis_backend_runs_counters_and_queue_move(tmp_path: Path) -> None:
    from tests.test_webhook_redis import RedisServer
    from webhook.redis_queue import BACKFILL_QUEUE_NAME, QUEUE_NAME, backend_for

    server = RedisServer(tmp_path / "redis").start()
    try:
        backend = backend_for(Config(data_dir=tmp_path, secrets=(SECRET,), queue="redis", redis_url=server.url))
        job_id, origin = backfill_then_push(backend)
        assert origin == "push" and backend.get(job_id).priority == 0
        assert job_id in backend.queue.job_ids and backend.backfill_queue.job_ids == []
        from webhook.store import Intake, NewJob

        other = NewJob("r:5000", "team/app", "v2", "sha256:" + "4" * 64, "v2_obd", "default", origin="backfill")
        queued = backend.record([Intake("backfill", job=other)])[0].job_id
        assert backend.backfill_queue.job_ids == [queued] and backend.get(queued).origin == "backfill"
        assert backend.counts_by_state()["queued"] == 2
        assert {backend.queue.name, backend.backfill_queue.name} == {QUEUE_NAME, BACKFILL_QUEUE_NAME}

        backend.save_run("run-1", "backfill", {"id": "run-1", "queued": 1}, now=1.0)
        backend.save_run("run-2", "backfill", {"id": "run-2", "queued": 2}, now=2.0)
        backend.save_run("other", "something", {"id": "other"}, now=3.0)
        backend.save_run("run-1", "backfill", {"id": "run-1", "queued": 5})
        assert backend.get_run("run-1") == {"id": "run-1", "queued": 5} and backend.get_run("nope") is None
        assert [r["id"] for r in backend.list_runs("backfill")] == ["run-2", "run-1"]
        assert backend.job_states([job_id, queued, "missing"])["queued"] == 2
        backend.add_counters({("mirror_deletes", "deleted"): 2})
        assert backend.stats().counters[("mirror_deletes", "deleted")] == 2
    finally:
        server.stop()


def test_a_run_whose_process_died_reads_as_interrupted(tmp_path: Path) -> None:
    from webhook.backfill import RUN_KIND, progress_view

    store = JobStore(tmp_path / "jobs.sqlite3")
    store.save_run("r", RUN_KIND, {"id": "r", "state": "running", "updated_at": 1000.0, "job_ids": []})
    assert progress_view(store, store.get_run("r"), now=1000.0 + 60)["state"] == "running"
    assert progress_view(store, store.get_run("r"), now=1000.0 + 301)["state"] == "interrupted"
    store.close()


def test_printed_delete_mirroring_snippet_delivers_deletes_from_a_real_registry(registry_factory,
                                                                                 tmp_path: Path) -> None:
    """The `notifications` block `snippets` prints when a rule mirrors deletes, pasted as is into a real
    registry: pushes and tag deletes arrive, and deleting v1 removes v1_obd."""
    import yaml

    from webhook.config import Rule

    late = LateApp()
    with serve_app(late) as url:
        listen = url.removeprefix("http://")
        snippet = distribution_snippet(Config(listen=listen, rules=(Rule(delete_mirror=True),)), SECRET)
        registry = registry_factory(extra_config=yaml.safe_load(snippet))
        config = service_config(registry, tmp_path, [{"name": "all", "delete_mirror": True}])
        store = JobStore(config.db_path)
        late.app = create_app(config, store)
        push_image(build_layout(tmp_path / "img", tiny_image("snippet")), registry, "snip/app:v1")
        delivered(registry)
        worker = worker_for(store, config)
        assert len(drain(worker)) == 1
        client = client_for(registry)
        assert set(client.list_tags("snip/app")) == {"v1", "v1_obd"}
        delete_tag(client, "snip/app", "v1")
        delivered(registry)
        assert [j.action for j in store.list_jobs()] == ["delete", "convert"]
        drain(worker)
        with pytest.raises(NotFoundError):
            client.get_manifest("snip/app", "v1_obd")
        client.close()
