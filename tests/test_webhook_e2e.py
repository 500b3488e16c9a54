"""End to end with reality: Distribution 2.8.2 sends its notifications to a running `obd-webhook serve`,
images are pushed with skopeo, and the service publishes `<tag>_obd` back into the same registry.

The conversion engine is not wired in yet, so the service runs with a conversion function that
publishes the pushed image unchanged under the target tag with skopeo: the registry sees exactly
the traffic a real conversion causes (a push of `<tag>_obd` by the service), which is what the
webhook side must handle (no loop, one job per tag). When `converter.pipeline` exists these tests
should switch to the default hook and verify the overlaybd output as the pipeline tests do.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import requests
import yaml
from werkzeug.wrappers import Request

from tests.harness import layers as L
from tests.harness.oci import Image, build_layout, push_image
from tests.harness.registry import Endpoint
from tests.registry_helpers import client_for
from tests.test_pipeline_registry import VSIZE_GIB, app_image, layer_blobs, pull_and_judge
from tests.test_webhook_support import (
    AUTH,
    SECRET,
    ServeProcess,
    distribution_event,
    envelope,
    harbor_cloudevent,
    harbor_default,
    serve_app,
    wait_until,
)
from webhook.cli import distribution_snippet
from webhook.config import Config

SKOPEO_COPY = "tests.test_webhook_support:skopeo_copy_convert"
TERMINAL = {"succeeded", "dead", "superseded"}


def tags(registry, repo: str) -> set[str]:
    response = requests.get(f"{registry.url}/v2/{repo}/tags/list", timeout=5)
    if response.status_code == 404:
        return set()
    response.raise_for_status()
    return set(response.json()["tags"] or [])


def manifest_digest(registry, repo: str, ref: str) -> str:
    accept = ", ".join([
        "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json"])
    response = requests.head(f"{registry.url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept}, timeout=5)
    response.raise_for_status()
    return response.headers["Docker-Content-Digest"]


def all_jobs(service: ServeProcess) -> list[dict]:
    return requests.get(service.url + "/api/v1/conversions?limit=1000", headers=AUTH, timeout=5).json()["jobs"]


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.yaml"
    path.write_text("rules:\n  - name: demo\n    repositories: ['demo/*']\n")
    return path



def test_distribution_pushes_convert_exactly_the_expected_tags(tmp_path: Path, registry_factory,
                                                               rules_file: Path, queue_env: dict[str, str]) -> None:
    service = ServeProcess(tmp_path / "data", {"OBD_WEBHOOK_CONVERT_CALLABLE": SKOPEO_COPY,
                                               "OBD_WEBHOOK_CONFIG": str(rules_file), "TMPDIR": str(tmp_path),
                                               **queue_env})
    service.start()
    try:
        # No filters on the registry side: every blob, pull and mount event reaches the service,
        # which must ignore them itself.
        registry = registry_factory(notifications=[Endpoint(
            url=service.url + "/hooks/distribution", headers={"Authorization": [f"Bearer {SECRET}"]})])
        single = build_layout(tmp_path / "single", Image([[L.file("hello.txt", b"hello\n")]]))
        multi = build_layout(tmp_path / "multi", [
            Image([[L.file("a.txt", b"amd64\n")]], architecture="amd64"),
            Image([[L.file("a.txt", b"arm64\n")]], architecture="arm64")])
        single_digest = push_image(single, registry, "demo/single:v1")
        multi_digest = push_image(multi, registry, "demo/multi:v1")
        push_image(single, registry, "demo/single:v2")  # re-tag of the same digest
        push_image(single, registry, "other/x:v1")  # no rule matches
        push_image(single, registry, "demo/single:manual_obd")  # looks like an output: never converted

        def settled() -> bool:
            if registry.notification_metrics().get("Pending", 1) != 0:
                return False
            jobs = all_jobs(service)
            return len(jobs) == 3 and all(j["state"] in TERMINAL for j in jobs)

        wait_until(settled, timeout=90, interval=0.2, what="notifications delivered and jobs finished")
        # The service's own pushes produce events too; give them time to arrive and be ignored.
        wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, what="no pending events")

        assert tags(registry, "demo/single") == {"v1", "v2", "v1_obd", "v2_obd", "manual_obd"}
        assert tags(registry, "demo/multi") == {"v1", "v1_obd"}
        assert tags(registry, "other/x") == {"v1"}
        assert manifest_digest(registry, "demo/single", "v1_obd") == single_digest
        assert manifest_digest(registry, "demo/multi", "v1_obd") == multi_digest

        jobs = all_jobs(service)
        assert Counter(j["state"] for j in jobs) == {"succeeded": 3}
        assert sorted(j["target_ref"] for j in jobs) == sorted(
            f"{registry.host}/{ref}" for ref in ("demo/single:v1_obd", "demo/single:v2_obd", "demo/multi:v1_obd"))
        by_ref = {j["target_tag"]: j for j in jobs if j["repository"] == "demo/single"}
        assert by_ref["v1_obd"]["result"]["target_digest"] == single_digest

        metrics = requests.get(service.url + "/metrics", headers=AUTH, timeout=5).text
        ignored = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("obd_webhook_events_ignored_total{")}
        # 3 pushes by the service + the manual _obd push; blob uploads and child manifests.
        assert ignored["output_tag"] >= 4 and ignored["blob"] >= 3 and ignored["untagged"] >= 2
        assert ignored["no_matching_rule"] == 1
    finally:
        service.stop()


def test_harbor_payloads_against_real_registry(tmp_path: Path, registry_factory, queue_env: dict[str, str]) -> None:
    """The real registry stands in for Harbor's: Harbor payloads name it in resource_url."""
    registry = registry_factory()
    image = build_layout(tmp_path / "img", Image([[L.file("h.txt", b"harbor\n")]]))
    digest = push_image(image, registry, "proj/app:1.0")
    push_image(image, registry, "proj/app:2.0")
    service = ServeProcess(tmp_path / "data", {"OBD_WEBHOOK_CONVERT_CALLABLE": SKOPEO_COPY,
                                               "TMPDIR": str(tmp_path),
                                               "OBD_WEBHOOK_CONVERTER_ACTORS": "robot$obd-converter", **queue_env})
    service.start()
    try:
        def send(payload: dict, content_type: str = "application/json") -> dict:
            response = requests.post(service.url + "/hooks/harbor", data=json.dumps(payload), timeout=5,
                                     headers={"Authorization": f"Bearer {SECRET}", "Content-Type": content_type})
            assert response.status_code == 200
            return response.json()

        host = registry.host
        assert len(send(harbor_default("1.0", digest, repo="proj/app", host=host))["accepted"]) == 1
        assert send(harbor_default(digest, digest, repo="proj/app", host=host))["ignored"] == {"tag_is_digest": 1}
        assert send(harbor_default("1.0", digest, repo="proj/app", host=host, kind="PULL_ARTIFACT"))["ignored"] == {
            "not_push": 1}
        replication = {"type": "REPLICATION", "occur_at": 1, "operator": "harbor-jobservice",
                       "event_data": {"replication": {"harbor_hostname": host, "job_status": "Success",
                                                      "successful_artifact": [{"name_tag": "app:1.0"}]}}}
        assert send(replication)["ignored"] == {"not_push": 1}
        assert send(harbor_default("1.0_obd", digest, repo="proj/app", host=host,
                                   operator="robot$obd-converter"))["ignored"] == {"own_actor": 1}
        cloud = harbor_cloudevent("2.0", digest, repo="proj/app", host=host)
        assert len(send(cloud, "application/cloudevents+json")["accepted"]) == 1

        wait_until(lambda: {j["state"] for j in all_jobs(service)} == {"succeeded"}, timeout=60,
                   what="harbor jobs converted")
        assert tags(registry, "proj/app") == {"1.0", "2.0", "1.0_obd", "2.0_obd"}
        assert manifest_digest(registry, "proj/app", "2.0_obd") == digest
    finally:
        service.stop()


class FlakyRegistryProxy:
    """A reverse proxy in front of the real registry that refuses manifest pushes: the first
    `unavailable` ones with 503 (transient), and all of them for repositories in `denied` with 403.
    The registry builds its Location headers from the Host header, which the proxy passes through."""

    def __init__(self, upstream: str, unavailable: int = 0, denied: tuple[str, ...] = ()) -> None:
        self.upstream, self.unavailable, self.denied = upstream, unavailable, set(denied)
        self.refused: list[tuple[int, str]] = []
        self.session = requests.Session()

    def __call__(self, environ, start_response):
        request = Request(environ)
        if request.method == "PUT" and "/manifests/" in request.path:
            repo = request.path.split("/v2/", 1)[1].split("/manifests/", 1)[0]
            if repo in self.denied:
                return self._refuse(start_response, 403, "DENIED", f"push to {repo} denied by policy")
            if self.unavailable > 0:
                self.unavailable -= 1
                return self._refuse(start_response, 503, "UNAVAILABLE", "registry is being upgraded")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        upstream = self.session.request(request.method, self.upstream + request.full_path.rstrip("?"),
                                        headers=headers, data=request.get_data(), allow_redirects=False,
                                        stream=True, timeout=30)
        body = upstream.raw.read(decode_content=False)
        hop = {"connection", "transfer-encoding", "keep-alive"}
        start_response(f"{upstream.status_code} {upstream.reason}",
                       [(k, v) for k, v in upstream.headers.items() if k.lower() not in hop])
        return [body]

    def _refuse(self, start_response, status: int, code: str, message: str):
        self.refused.append((status, code))
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        start_response(f"{status} {code}", [("Content-Type", "application/json"),
                                           ("Content-Length", str(len(body)))])
        return [body]


def test_registry_failing_pushes_then_permanent_refusal_and_manual_retry(tmp_path: Path, registry_factory,
                                                                        queue_env: dict[str, str]) -> None:
    registry = registry_factory()
    image = build_layout(tmp_path / "img", Image([[L.file("r.txt", b"retry\n")]]))
    digest = push_image(image, registry, "retry/app:v1")
    push_image(image, registry, "retry/denied:v1")
    proxy = FlakyRegistryProxy(registry.url, unavailable=2, denied=("retry/denied",))
    with serve_app(proxy) as proxy_url:
        proxy_host = proxy_url.split("://", 1)[1]
        service = ServeProcess(tmp_path / "data", {
            "OBD_WEBHOOK_CONVERT_CALLABLE": SKOPEO_COPY, "TMPDIR": str(tmp_path),
            "OBD_WEBHOOK_RETRY__INITIAL_BACKOFF_SECONDS": "0.2", "OBD_WEBHOOK_RETRY__MAX_BACKOFF_SECONDS": "0.5",
            "OBD_WEBHOOK_RETRY__JITTER_SECONDS": "0", "OBD_WEBHOOK_RETRY__MAX_ATTEMPTS": "5", **queue_env})
        service.start()
        try:
            for repo in ("retry/app", "retry/denied"):
                event = distribution_event(repository=repo, tag="v1", digest=digest, host=proxy_host)
                response = requests.post(service.url + "/hooks/distribution", data=envelope(event),
                                         headers=AUTH, timeout=5)
                assert len(response.json()["accepted"]) == 1
            wait_until(lambda: {j["state"] for j in all_jobs(service)} == {"succeeded", "dead"}, timeout=90,
                       what="one job succeeded after retries, one dead")
            jobs = {j["repository"]: j for j in all_jobs(service)}

            ok = requests.get(f"{service.url}/api/v1/conversions/{jobs['retry/app']['id']}", headers=AUTH,
                              timeout=5).json()
            assert ok["attempts"] == 3
            assert [a["outcome"] for a in ok["attempt_log"]] == ["retry", "retry", "succeeded"]
            assert "503" in ok["attempt_log"][0]["error"] or "UNAVAILABLE" in ok["attempt_log"][0]["error"]
            assert manifest_digest(registry, "retry/app", "v1_obd") == digest

            dead = jobs["retry/denied"]
            assert dead["attempts"] == 1 and dead["last_error"].startswith("permanent error: PermanentError")
            assert "denied" in dead["last_error"]
            assert "v1_obd" not in tags(registry, "retry/denied")
            metrics = requests.get(service.url + "/metrics", headers=AUTH, timeout=5).text
            assert "obd_webhook_conversion_retries_total 2.0" in metrics
            assert 'obd_webhook_jobs{state="dead"} 1.0' in metrics

            proxy.denied.clear()  # the operator fixed the registry policy
            retried = requests.post(f"{service.url}/api/v1/conversions/{dead['id']}/retry", headers=AUTH, timeout=5)
            assert retried.status_code == 200 and retried.json()["state"] == "queued"
            wait_until(lambda: {j["state"] for j in all_jobs(service)} == {"succeeded"}, timeout=60,
                       what="retried job succeeded")
            assert manifest_digest(registry, "retry/denied", "v1_obd") == digest
            assert sorted(proxy.refused) == [(403, "DENIED"), (503, "UNAVAILABLE"), (503, "UNAVAILABLE")]
        finally:
            service.stop()


def test_printed_distribution_snippet_configures_a_real_registry(tmp_path: Path, registry_factory) -> None:
    """The `notifications` block that `serve`/`snippets` print, pasted as is into a real registry."""
    service = ServeProcess(tmp_path / "data", {"OBD_WEBHOOK_CONVERT_CALLABLE": SKOPEO_COPY,
                                               "TMPDIR": str(tmp_path)}).start()
    try:
        snippet = yaml.safe_load(distribution_snippet(Config(listen=f"127.0.0.1:{service.port}"), SECRET))
        registry = registry_factory(extra_config=snippet)
        image = build_layout(tmp_path / "img", Image([[L.file("s.txt", b"snippet\n")]]))
        digest = push_image(image, registry, "snip/app:v1")
        wait_until(lambda: [j["state"] for j in all_jobs(service)] == ["succeeded"], timeout=60,
                   what="conversion through the pasted snippet")
        wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, what="delivered")
        assert tags(registry, "snip/app") == {"v1", "v1_obd"}
        assert manifest_digest(registry, "snip/app", "v1_obd") == digest
        metrics = requests.get(service.url + "/metrics", headers=AUTH, timeout=5).text
        # The registry-side filters let only the two manifest pushes through (ours and the service's).
        assert 'obd_webhook_events_received_total{source="distribution"} 2.0' in metrics
        assert 'obd_webhook_events_ignored_total{reason="output_tag"} 1.0' in metrics
    finally:
        service.stop()


def test_real_conversion_pipeline_end_to_end(tmp_path: Path, registry_factory, queue_env: dict[str, str]) -> None:
    """The default hook (`converter.pipeline.convert`): pushes of a single-arch image and of a 2-platform
    index become real overlaybd `<tag>_obd` images, judged like the pipeline's own tests (layer
    annotations and UUIDs, stacked disk e2fsck-clean with the image's tree); the service's own pushes
    are ignored."""
    service = ServeProcess(tmp_path / "data", {"TMPDIR": str(tmp_path), **queue_env})
    registry = registry_factory(notifications=[Endpoint(
        url=service.url + "/hooks/distribution", headers={"Authorization": [f"Bearer {SECRET}"]},
        ignored_mediatypes=["application/octet-stream"], ignore_actions=["pull", "mount", "delete"])])
    config = tmp_path / "webhook.yaml"
    config.write_text(yaml.safe_dump({
        "rules": [{"name": "all", "options": {"vsize": VSIZE_GIB, "cache_dir": str(tmp_path / "cache"),
                                              "work_dir": str(tmp_path)}}],
        "registries": {registry.host: {"endpoint": f"http://{registry.host}", "insecure": True}},
    }))
    service.env["OBD_WEBHOOK_CONFIG"] = str(config)
    service.start()
    try:
        single = build_layout(tmp_path / "single", app_image())
        multi = build_layout(tmp_path / "multi", [app_image("amd64"), app_image("arm64", b"arm")])
        push_image(single, registry, "real/app:v1")
        push_image(multi, registry, "real/multi:v1")
        wait_until(lambda: len(all_jobs(service)) == 2 and all(j["state"] in TERMINAL for j in all_jobs(service)),
                   timeout=240, interval=0.5, what="two real conversions")
        wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, what="events delivered")
        jobs = {j["repository"]: j for j in all_jobs(service)}
        assert {j["state"] for j in jobs.values()} == {"succeeded"}, [j["last_error"] for j in jobs.values()]
        assert len(all_jobs(service)) == 2  # the service's own pushes made no jobs
        assert tags(registry, "real/app") == {"v1", "v1_obd"}
        assert tags(registry, "real/multi") == {"v1", "v1_obd"}

        client = client_for(registry)
        converted = jobs["real/app"]["result"]["target_digest"]
        assert manifest_digest(registry, "real/app", "v1_obd") == converted
        pull_and_judge(client, "real/app", converted, layer_blobs(single, single.manifests[0]), tmp_path,
                       oci_types=False)
        index = json.loads(requests.get(f"{registry.url}/v2/real/multi/manifests/v1_obd", timeout=5, headers={
            "Accept": "application/vnd.docker.distribution.manifest.list.v2+json"}).content)
        children = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
        assert set(children) == {"amd64", "arm64"}
        for k, arch in enumerate(("amd64", "arm64")):
            pull_and_judge(client, "real/multi", children[arch], layer_blobs(multi, multi.manifests[k]), tmp_path,
                           oci_types=False)
        metrics = requests.get(service.url + "/metrics", headers=AUTH, timeout=5).text
        assert 'obd_webhook_jobs{state="succeeded"} 2.0' in metrics
        assert "obd_webhook_conversion_bytes_total 0.0" not in metrics
    finally:
        service.stop()
