"""Decide, for one normalised event, whether to convert it and with which rule.

Every "no" carries a short reason label; the labels are the values of the `reason` label of the
`obd_webhook_events_ignored_total` metric, so keep them stable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from webhook.config import Config, Rule
from webhook.events import BLOB_MEDIA_TYPE, RegistryEvent
from webhook.limits import clip
from webhook.names import digest_problem, repository_problem, tag_problem
from webhook.trust import event_registry, host_matches

IMAGE_MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})
SINGLE_MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})
IMAGE_CONFIG_TYPES = frozenset({
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
})
OVERLAYBD_ANNOTATION_PREFIX = "containerd.io/snapshot/overlaybd/"
OVERLAYBD_ARTIFACT_PREFIX = "application/vnd.containerd.overlaybd."
# Tags that signing/attestation tools (cosign, notation fallbacks) attach to images.
ACCESSORY_TAG = re.compile(r"^sha256-[0-9a-f]{64}(\..*)?$|\.(sig|att|sbom)$")

REASONS = (
    "malformed", "not_push", "blob", "untagged", "tag_is_digest", "no_digest", "no_registry",
    "host_not_allowed", "own_actor",
    "own_user_agent", "output_tag", "already_overlaybd", "not_image", "no_matching_rule",
    "duplicate_event", "duplicate_image", "delete_mirror_off",
)


@dataclass(frozen=True)
class Decision:
    rule: Rule | None
    reason: str | None  # None when accepted
    registry: str | None = None  # the configured registry the job is for (when accepted)
    detail: str | None = None  # for `malformed`: which field is wrong and how

    @property
    def accepted(self) -> bool:
        return self.rule is not None


def _ignore(reason: str, detail: str | None = None) -> Decision:
    return Decision(None, reason, detail=detail)


def name_problem(repository: str, tag: str, digest: str) -> str | None:
    """Why an image's names break the distribution grammar (then no registry could serve the job)."""
    return repository_problem(repository) or tag_problem(tag) or digest_problem(digest)


def _is_overlaybd(event: RegistryEvent) -> bool:
    if event.artifact_type and event.artifact_type.startswith(OVERLAYBD_ARTIFACT_PREFIX):
        return True
    for ref in event.references:
        annotations = ref.get("annotations")
        if isinstance(annotations, dict) and any(
                k.startswith(OVERLAYBD_ANNOTATION_PREFIX) for k in annotations):
            return True
    return False


def _is_not_image(event: RegistryEvent) -> bool:
    if event.tag and ACCESSORY_TAG.search(event.tag):
        return True
    if event.media_type is not None and event.media_type not in IMAGE_MANIFEST_TYPES:
        return True
    if event.media_type in SINGLE_MANIFEST_TYPES and event.references:
        # includereferences lists the config first; artifacts (helm charts, sigstore bundles) use
        # their own config media types.
        config_type = event.references[0].get("mediaType")
        if isinstance(config_type, str) and config_type not in IMAGE_CONFIG_TYPES:
            return True
    return False


def rule_matches(rule: Rule, event: RegistryEvent) -> bool:
    tag = event.tag or ""
    if not any(host_matches(g, event.registry) for g in rule.registries):
        return False
    if not any(fnmatchcase(event.repository, g) for g in rule.repositories):
        return False
    if any(fnmatchcase(event.repository, g) for g in rule.exclude_repositories):
        return False
    if rule.tag_regex is not None:
        if not re.fullmatch(rule.tag_regex, tag):
            return False
    elif not any(fnmatchcase(tag, g) for g in rule.tags):
        return False
    return not any(fnmatchcase(tag, g) for g in rule.exclude_tags)


def decide(event: RegistryEvent, config: Config, bound: str | None = None) -> Decision:
    """The first matching reason to ignore, else the first rule that matches. `bound` is the registry
    the hook URL names (None for an unbound hook); see webhook.trust."""
    if event.malformed:
        return _ignore("malformed", event.malformed)
    if event.action != "push":
        return _ignore("not_push")
    if event.media_type == BLOB_MEDIA_TYPE:
        return _ignore("blob")
    if not event.tag:
        return _ignore("untagged")
    if event.tag == event.digest or event.tag.startswith("sha256:"):
        return _ignore("tag_is_digest")
    if not event.digest:
        return _ignore("no_digest")
    if problem := name_problem(event.repository, event.tag, event.digest):
        return _ignore("malformed", problem)
    if event.actor and event.actor in config.converter_actors:
        return _ignore("own_actor")
    if event.user_agent and any(event.user_agent.startswith(ua) for ua in config.converter_user_agents):
        return _ignore("own_user_agent")
    if any(event.tag.endswith(suffix) for suffix in config.output_suffixes):
        return _ignore("output_tag")
    # After the loop checks: our own pushes name the host we reach the registry at (its `endpoint`),
    # which need not be a configured name, and they should be counted as ours, not as foreign hosts.
    registry, refusal = event_registry(event.registry, bound, config.registries)
    if registry is None:
        return _ignore(refusal or "host_not_allowed", f"registry {clip(event.registry, 200)!r}")
    event = replace(event, registry=registry)
    if _is_overlaybd(event):
        return _ignore("already_overlaybd")
    if _is_not_image(event):
        return _ignore("not_image")
    for rule in config.rules:
        if rule_matches(rule, event):
            return Decision(rule, None, registry)
    return _ignore("no_matching_rule")
