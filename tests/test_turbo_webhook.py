"""The webhook's TurboOCI rule option: `turbo_oci: true` (own suffix, default `_turbo`), alone or next to the
native output; loop prevention for turbo tags and turbo images; a real push converted through the service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.harness.oci import build_layout, push_image
from tests.harness.registry import Endpoint
from tests.registry_helpers import client_for
from tests.test_pipeline_registry import VSIZE_GIB, app_image
from tests.test_turbo_pipeline import Blobs, judge_turbo
from tests.test_webhook_e2e import TERMINAL, all_jobs, tags
from tests.test_webhook_support import SECRET, ServeProcess, wait_until
from webhook.config import ConfigError, load_config
from webhook.events import RegistryEvent
from webhook.rules import decide

TURBO_LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "1" * 64,
               "size": 10, "annotations": {
                   "containerd.io/snapshot/overlaybd/turbo-oci/target-digest": "sha256:" + "2" * 64}}


def config_with(tmp_path: Path, rules: list[dict]) -> object:
    path = tmp_path / "webhook.yaml"
    path.write_text(yaml.safe_dump({"rules": rules, "registries": {"reg.example:5000": {}}}))
    return load_config(path, {})


def event(tag: str, references: tuple = (), artifact_type: str | None = None) -> RegistryEvent:
    return RegistryEvent("distribution", "e1", "push", "reg.example:5000", "team/app", tag, "sha256:" + "a" * 64,
                         "application/vnd.oci.image.manifest.v1+json", artifact_type=artifact_type,
                         references=references)


def test_rule_options_give_the_job_targets_and_loop_prevention(tmp_path: Path) -> None:
    config = config_with(tmp_path, [
        {"name": "both", "repositories": ["team/*"], "turbo_oci": True, "options": {"oci": True}},
        {"name": "turbo-only", "repositories": ["lean/*"], "overlaybd": False, "turbo_oci": True,
         "turbo_suffix": "_lean"},
    ])
    both, lean = config.rules
    assert both.job_target("v1") == ("v1_obd", {"oci": True, "turbo_tag": "v1_turbo"})
    assert lean.job_target("v1") == ("v1_lean", {"turbo_oci": True})
    assert set(config.output_suffixes) >= {"_obd", "_turbo", "_lean"}
    assert decide(event("v1"), config).rule is both
    assert decide(event("v1_turbo"), config).reason == "output_tag"  # our own turbo push
    assert decide(event("v1_lean"), config).reason == "output_tag"
    # a turbo image pushed under any other tag is recognised by its layer annotations / artifactType
    assert decide(event("copy", references=(TURBO_LAYER,)), config).reason == "already_overlaybd"
    assert decide(event("copy2", artifact_type="application/vnd.containerd.overlaybd.turbo.v1+json"),
                  config).reason == "already_overlaybd"


@pytest.mark.parametrize(("rule", "problem"), [
    ({"overlaybd": False}, "publish nothing"),
    ({"turbo_oci": True, "turbo_suffix": "_obd"}, "must differ"),
    ({"turbo_oci": True, "turbo_suffix": "a/b"}, "turbo_suffix"),
    ({"options": {"turbo_target": "x/y:z"}}, "cannot be set per rule"),
])
def test_bad_turbo_rules_are_refused_at_startup(tmp_path: Path, rule: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        config_with(tmp_path, [rule])


def test_a_push_becomes_a_native_and_a_turbo_image(tmp_path: Path, registry_factory) -> None:
    service = ServeProcess(tmp_path / "data", {"TMPDIR": str(tmp_path)})
    registry = registry_factory(notifications=[Endpoint(
        url=service.url + "/hooks/distribution", headers={"Authorization": [f"Bearer {SECRET}"]},
        ignored_mediatypes=["application/octet-stream"], ignore_actions=["pull", "mount", "delete"])])
    config = tmp_path / "webhook.yaml"
    config.write_text(yaml.safe_dump({
        "rules": [{"name": "all", "turbo_oci": True, "options": {"vsize": VSIZE_GIB, "work_dir": str(tmp_path),
                                                                "cache_dir": str(tmp_path / "cache")}}],
        "registries": {registry.host: {"endpoint": f"http://{registry.host}", "insecure": True}},
    }))
    service.env["OBD_WEBHOOK_CONFIG"] = str(config)
    service.start()
    try:
        image = build_layout(tmp_path / "src", app_image())
        push_image(image, registry, "hook/app:v1")
        wait_until(lambda: len(all_jobs(service)) == 1 and all(j["state"] in TERMINAL for j in all_jobs(service)),
                   timeout=240, interval=0.5, what="one conversion")
        wait_until(lambda: registry.notification_metrics().get("Pending", 1) == 0, what="events delivered")
        [job] = all_jobs(service)
        assert job["state"] == "succeeded", job["last_error"]
        assert len(all_jobs(service)) == 1  # neither _obd nor _turbo pushes made jobs
        assert tags(registry, "hook/app") == {"v1", "v1_obd", "v1_turbo"}
        client = client_for(registry)
        turbo = client.get_manifest("hook/app", "v1_turbo")
        assert job["target_tag"] == "v1_obd"  # one job publishes both images
        assert job["result"]["target_digest"] == client.get_manifest("hook/app", "v1_obd").digest
        assert job["result"]["turbo_digest"] == turbo.digest  # the job record names both results
        sources = [image.blobs[d["digest"]] for d in json.loads(image.manifests[0])["layers"]]
        judge_turbo(Blobs(tmp_path, client=client, repo="hook/app"), turbo.json(), sources, oci_types=False)
    finally:
        service.stop()
