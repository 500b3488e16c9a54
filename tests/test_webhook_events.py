"""Normalisation of Distribution/Harbor/zot payloads, the ignore reasons and rules, and config loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_webhook_support import (
    OCI_INDEX,
    OCI_MANIFEST,
    digest_of,
    distribution_event,
    harbor_cloudevent,
    harbor_default,
)
from webhook.config import Config, ConfigError, RegistrySettings, Rule, ensure_secret, load_config
from webhook.events import PayloadError, parse_distribution, parse_generic, parse_harbor
from webhook.rules import decide

# The index push captured from Distribution 2.8.2 in registry-events.md §1.3 (digests completed).
CAPTURED_INDEX_PUSH = {"events": [{
    "id": "870d8a45-0cf5-4237-b807-f2ba43a0e5d4",
    "timestamp": "2026-11-28T09:49:53.927093005Z",
    "action": "push",
    "target": {
        "mediaType": "application/vnd.oci.image.index.v1+json", "size": 517,
        "digest": "sha256:23d01d9490761c42cedc9342c49f9b01448eb5645cd4c0a5cd8c29b960297553", "length": 517,
        "repository": "demo/app",
        "url": "http://127.0.0.1:5291/v2/demo/app/manifests/sha256:23d01d9490761c42cedc9342c49f9b01448eb5645cd4c0a5cd8c29b960297553",
        "tag": "v1",
        "references": [
            {"mediaType": OCI_MANIFEST, "size": 418, "digest": digest_of("child-amd64")},
            {"mediaType": OCI_MANIFEST, "size": 418, "digest": digest_of("child-arm64")},
        ],
    },
    "request": {"id": "1fcbf403", "addr": "127.0.0.1:40162", "host": "127.0.0.1:5291", "method": "PUT",
                "useragent": "python-requests/2.34.2"},
    "actor": {},
    "source": {"addr": "vm:5291", "instanceID": "e0c4e663-d5ff-4d46-a312-16577211da91"},
}]}

# Every host these payloads name is a configured registry (webhook.trust): the tests below are about
# parsing and rules; the trust model has its own tests in test_webhook_trust.py.
REGISTRIES = {host: RegistrySettings() for host in (
    "127.0.0.1:5291", "127.0.0.1:5101", "hub.harbor.com", "harbor.dev", "zot.local:5000", "z:1", "other:5000")}
CONFIG = Config(secrets=("s" * 20,), converter_actors=("robot$obd",), registries=REGISTRIES)


def _reason(event_dict: dict, config: Config = CONFIG) -> str | None:
    (event,) = parse_distribution({"events": [event_dict]})
    return decide(event, config).reason


def test_captured_index_push_normalises_and_is_accepted() -> None:
    (event,) = parse_distribution(CAPTURED_INDEX_PUSH)
    assert (event.source, event.event_id, event.action) == ("distribution", "870d8a45-0cf5-4237-b807-f2ba43a0e5d4",
                                                            "push")
    assert (event.registry, event.repository, event.tag) == ("127.0.0.1:5291", "demo/app", "v1")
    assert event.digest.startswith("sha256:23d01d94") and event.media_type == OCI_INDEX
    assert len(event.references) == 2 and event.actor is None and event.user_agent == "python-requests/2.34.2"
    decision = decide(event, CONFIG)
    assert decision.accepted and decision.rule.suffix == "_obd"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"action": "pull"}, "not_push"),
    ({"action": "mount"}, "not_push"),
    ({"action": "delete"}, "not_push"),
    ({"media_type": "application/octet-stream", "tag": None}, "blob"),
    ({"tag": None}, "untagged"),
    ({"tag": "v1_obd"}, "output_tag"),
    ({"actor": "robot$obd"}, "own_actor"),
    ({"useragent": "obd-autoconvert/0.1 python-requests"}, "own_user_agent"),
    ({"tag": "sha256-" + "a" * 64 + ".sig"}, "not_image"),
    ({"media_type": "application/vnd.oci.artifact.manifest.v1+json"}, "not_image"),
    ({"references": [{"mediaType": "application/vnd.cncf.helm.config.v1+json", "size": 1,
                      "digest": digest_of("c")}]}, "not_image"),
    ({"references": [{"mediaType": "application/vnd.oci.image.config.v1+json", "size": 1, "digest": digest_of("c")},
                     {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 2, "digest": digest_of("l"),
                      "annotations": {"containerd.io/snapshot/overlaybd/blob-digest": digest_of("l")}}]},
     "already_overlaybd"),
])
def test_always_ignore_reasons(overrides: dict, reason: str) -> None:
    assert _reason(distribution_event(**overrides)) == reason


def test_blob_delete_and_tag_delete_shapes_are_ignored() -> None:
    manifest_delete = {"id": "d1", "action": "delete", "target": {"digest": digest_of("m"), "repository": "demo/x"}}
    tag_delete = {"id": "d2", "action": "delete", "target": {"repository": "demo/x", "tag": "v1"}}
    assert _reason(manifest_delete) == "not_push"
    assert _reason(tag_delete) == "not_push"


def test_malformed_event_inside_valid_envelope_is_ignored_not_an_error() -> None:
    events = parse_distribution({"events": ["nonsense", {"id": "x", "action": "push"},
                                            {"id": "y", "target": {"tag": "v1"}}]})
    assert [decide(e, CONFIG).reason for e in events] == ["malformed"] * 3
    assert "target" in events[1].malformed and "repository" in events[2].malformed


@pytest.mark.parametrize("payload", [[], {"events": {}}, {"no": "events"}, "x", None])
def test_bad_distribution_envelopes_raise_payload_error(payload: object) -> None:
    with pytest.raises(PayloadError, match="events"):
        parse_distribution(payload)


def test_harbor_default_push_child_pull_replication() -> None:
    digest = digest_of("debian")
    (push,) = parse_harbor(harbor_default("latest", digest))
    assert (push.registry, push.repository, push.tag, push.digest, push.actor) == (
        "hub.harbor.com", "test-webhook/debian", "latest", digest, "admin")
    assert decide(push, CONFIG).accepted
    (child,) = parse_harbor(harbor_default(digest, digest))
    assert decide(child, CONFIG).reason == "tag_is_digest"
    (pull,) = parse_harbor(harbor_default("latest", digest, kind="PULL_ARTIFACT"))
    assert decide(pull, CONFIG).reason == "not_push"
    replication = {"type": "REPLICATION", "occur_at": 1, "operator": "harbor-jobservice",
                   "event_data": {"replication": {"harbor_hostname": "h", "job_status": "Success"}}}
    (rep,) = parse_harbor(replication)
    assert rep.action == "replication" and decide(rep, CONFIG).reason == "not_push"
    (robot,) = parse_harbor(harbor_default("latest", digest, operator="robot$obd"))
    assert decide(robot, CONFIG).reason == "own_actor"


def test_harbor_default_event_id_is_stable_across_redeliveries() -> None:
    digest = digest_of("debian")
    first, second = parse_harbor(harbor_default("v1", digest)), parse_harbor(harbor_default("v1", digest))
    assert first[0].event_id == second[0].event_id
    assert parse_harbor(harbor_default("v2", digest))[0].event_id != first[0].event_id


def test_harbor_cloudevents_by_shape_and_content_type() -> None:
    digest = digest_of("busybox")
    payload = harbor_cloudevent("1.36", digest)
    (event,) = parse_harbor(payload)
    assert (event.event_id, event.registry, event.repository, event.tag) == (
        payload["id"], "harbor.dev", "library/busybox", "1.36")
    assert decide(event, CONFIG).accepted
    (pulled,) = parse_harbor(harbor_cloudevent(digest, digest, kind="harbor.artifact.pulled"),
                             "application/cloudevents+json")
    assert decide(pulled, CONFIG).reason == "not_push"
    with pytest.raises(PayloadError):
        parse_harbor({"specversion": "1.0", "data": []})


def test_zot_structured_and_binary_cloudevents() -> None:
    digest = digest_of("zot")
    structured = {"specversion": "1.0", "id": "z1", "type": "zotregistry.image.updated", "source": "zot",
                  "data": {"name": "team/app", "reference": "v2", "digest": digest, "mediaType": OCI_MANIFEST}}
    (event,) = parse_generic(structured, {}, "zot.local:5000")
    assert (event.registry, event.repository, event.tag, event.event_id) == ("zot.local:5000", "team/app", "v2", "z1")
    assert decide(event, CONFIG).accepted
    binary_headers = {"ce-type": "zotregistry.image.updated", "ce-id": "z2"}
    (untagged,) = parse_generic({"name": "team/app", "reference": digest, "digest": digest}, binary_headers, "z:1")
    assert decide(untagged, CONFIG).reason == "untagged"
    with pytest.raises(PayloadError, match="registry"):
        parse_generic(structured, {}, None)


def test_rules_globs_regex_excludes_and_order() -> None:
    config = Config(secrets=("s" * 20,), registries=REGISTRIES, rules=(
        Rule(name="skip-tmp", repositories=("tmp/*",), tags=("*",), exclude_repositories=("tmp/*",)),
        Rule(name="releases", repositories=("team/*",), tag_regex=r"v\d+(\.\d+)*", suffix="_accel",
             options={"oci": True}),
        Rule(name="main", registries=("127.0.0.1:*",), repositories=("demo/*",), exclude_tags=("*-dev",)),
    ))
    def rule_for(repo: str, tag: str, host: str = "127.0.0.1:5101") -> str | None:
        (event,) = parse_distribution({"events": [distribution_event(repository=repo, tag=tag, host=host)]})
        decision = decide(event, config)
        return decision.rule.name if decision.rule else decision.reason
    assert rule_for("team/api", "v1.2") == "releases"
    assert rule_for("team/api", "latest") == "no_matching_rule"
    assert rule_for("demo/app", "latest") == "main"
    assert rule_for("demo/app", "x-dev") == "no_matching_rule"
    assert rule_for("demo/app", "latest", host="other:5000") == "no_matching_rule"
    assert rule_for("tmp/x", "v1") == "no_matching_rule"
    # Both suffixes count as outputs, whichever rule produced them.
    assert rule_for("demo/app", "v1_accel") == "output_tag"
    assert rule_for("demo/app", "v1_obd") == "output_tag"
    assert config.output_suffixes == ("_accel", "_obd")


def test_config_yaml_env_overrides_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: 0.0.0.0:9000\nworkers: 3\nretry: {max_attempts: 7}\n"
        "rules:\n  - name: r1\n    repositories: [team/*]\n    options: {oci: true, vsize: 64}\n"
        "registries:\n  reg.example:5000: {endpoint: 'http://127.0.0.1:5000', insecure: true,"
        " username: bot, password: pw-not-logged}\n")
    env = {"OBD_WEBHOOK_WORKERS": "5", "OBD_WEBHOOK_RETRY__INITIAL_BACKOFF_SECONDS": "0.5",
           "OBD_WEBHOOK_SECRETS": "first-secret-0123456789, second-secret-0123456789",
           "OBD_WEBHOOK_DATA_DIR": str(tmp_path / "data")}
    config = load_config(path, env)
    assert (config.host, config.port, config.workers) == ("0.0.0.0", 9000, 5)
    assert config.retry.max_attempts == 7 and config.retry.initial_backoff_seconds == 0.5
    assert config.secrets == ("first-secret-0123456789", "second-secret-0123456789")
    assert config.rules[0].options == {"oci": True, "vsize": 64}
    assert config.registries["reg.example:5000"].insecure is True
    assert "pw-not-logged" not in repr(config) and "first-secret" not in repr(config)

    for text, message in [
        ("bogus: 1\n", "unknown key"),
        ("workers: -1\n", "workers"),
        ("rules: []\n", "rules"),
        ("rules: [{name: x, tag_regex: '('}]\n", r"rules\[0\]\.tag_regex"),
        ("rules: [{name: x, options: {turbo: true}}]\n", "turbo"),
        ("rules: [{name: x, options: {vsize: 0}}]\n", r"rules\[0\]\.options: vsize"),
        ("rules: [{name: x, options: {algorithm: gzip}}]\n", "algorithm"),
        ("rules: [{name: x, options: {registry: {}}}]\n", "cannot be set per rule"),
        ("listen: nope\n", "listen"),
        ("retry: {max_attempts: many}\n", "retry.max_attempts"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path, {})
    with pytest.raises(ConfigError, match="secrets"):
        load_config(None, {"OBD_WEBHOOK_SECRETS": "short"})


def test_ensure_secret_generates_once_with_private_mode(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "d")
    first, generated = ensure_secret(config)
    assert generated and first.secrets == (generated,) and len(generated) >= 32
    assert (config.secret_file.stat().st_mode & 0o777) == 0o600
    second, again = ensure_secret(config)
    assert again is None and second.secrets == (generated,)


def test_event_json_roundtrip_of_reference_capture_is_stable() -> None:
    # The Distribution body is pretty-printed; parsing must not depend on formatting.
    compact = json.loads(json.dumps(CAPTURED_INDEX_PUSH, indent=3))
    assert parse_distribution(compact) == parse_distribution(CAPTURED_INDEX_PUSH)
