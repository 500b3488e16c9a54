"""Lifecycle of converted tags: mirror a source tag's deletion onto its outputs, and find stale outputs.

"Ours" means a manifest carrying the source-digest annotation the pipeline writes on every output
(`io.github.obd-autoconvert.source.digest`); a tag without it is never deleted, whatever its name.

* Delete mirroring (rule option `delete_mirror`): a tag-delete event becomes a `delete` job; the worker
  deletes `<tag><suffix>` for each of the rule's output suffixes when the output is ours, the source tag
  is still gone, and no other live tag points at the same manifest (Distribution deletes a manifest with
  every tag on it; only the outputs of other deleted sources may share it).
* Stale report: outputs whose source tag is gone, or points at another digest than the one recorded.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from webhook.config import Config, Rule
from webhook.conversion import ConversionRequest, ConversionResult
from webhook.events import RegistryEvent
from webhook.names import digest_problem, repository_problem, tag_problem
from webhook.registry_access import client_for, open_client, repositories
from webhook.rules import ACCESSORY_TAG, rule_matches
from webhook.store import Intake, NewJob
from webhook.trust import event_registry

if TYPE_CHECKING:
    from converter.registry import Manifest, RegistryClient

log = logging.getLogger("webhook.lifecycle")
ANN_SOURCE_DIGEST = "io.github.obd-autoconvert.source.digest"  # converter.image.ANN_SOURCE_DIGEST
# Outcomes of one output tag in a delete job (label values of obd_webhook_mirror_deletes_total).
DELETED, ABSENT, NOT_OURS, SHARED, SOURCE_BACK = "deleted", "absent", "not_ours", "shared", "source_exists"


def source_digest_of(manifest: Manifest) -> str | None:
    """The source digest our pipeline recorded on an output manifest, None if it is not ours."""
    try:
        annotations = manifest.json().get("annotations") or {}
    except (ValueError, AttributeError):
        return None
    value = annotations.get(ANN_SOURCE_DIGEST) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) and value else None


def split_output(tag: str, suffixes: Sequence[str]) -> tuple[str, str] | None:
    """(source tag, suffix) if `tag` ends in one of `suffixes` (the longest wins), else None."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if tag.endswith(suffix) and len(tag) > len(suffix):
            return tag[: -len(suffix)], suffix
    return None


# --- delete mirroring: intake ---------------------------------------------------------------------------


def delete_intake(event: RegistryEvent, config: Config, bound: str | None = None) -> Intake:
    """A registry `delete` event: a delete job if a rule with `delete_mirror` covers the tag, else a reason.
    The same intake checks as pushes apply: names in the distribution grammar, configured registries only
    (`bound` is the registry a bound hook URL names; see webhook.trust)."""
    def ignore(reason: str) -> Intake:
        return Intake(source=event.source, event_id=event.event_id, reason=reason)

    if event.malformed:
        return ignore("malformed")
    if not event.tag or event.tag.startswith("sha256:") or event.tag == event.digest:
        return ignore("untagged")  # a manifest or blob delete: its tag deletes arrive as their own events
    if repository_problem(event.repository) or tag_problem(event.tag) or (
            event.digest and digest_problem(event.digest)):
        return ignore("malformed")
    if event.actor and event.actor in config.converter_actors:
        return ignore("own_actor")
    if any(event.tag.endswith(s) for s in config.output_suffixes):
        return ignore("output_tag")  # our own deletions, or someone removing an output by hand
    registry, refusal = event_registry(event.registry, bound, config.registries)
    if registry is None:
        return ignore(refusal or "host_not_allowed")
    event = replace(event, registry=registry)
    if ACCESSORY_TAG.search(event.tag):
        return ignore("not_image")
    rule = next((r for r in config.rules if rule_matches(r, event)), None)
    if rule is None:
        return ignore("no_matching_rule")
    if not rule.delete_mirror:
        return ignore("delete_mirror_off")
    return Intake(source=event.source, event_id=event.event_id, job=delete_job(
        registry, event.repository, event.tag, rule, config, digest=event.digest or "", origin="push"))


def delete_job(registry: str, repository: str, tag: str, rule: Rule, config: Config, *, digest: str = "",
               origin: str) -> NewJob:
    """The job deleting `tag`'s outputs. Its key is the one a conversion of the tag has (`rule.job_target`),
    so a pending conversion of the tag is superseded by the deletion and a pending deletion by a new push."""
    return NewJob(registry=registry, repository=repository, tag=tag, digest=digest,
                  target_tag=rule.job_target(tag)[0], rule=rule.name,
                  options={"delete_tags": [tag + s for s in rule.output_suffixes],
                           "output_suffixes": list(config.output_suffixes)},
                  origin=origin, action="delete")


# --- delete mirroring: the worker's side ---------------------------------------------------------------


@dataclass(frozen=True)
class TagDeletion:
    tag: str
    outcome: str  # deleted | absent | not_ours | shared | source_exists
    digest: str | None = None
    detail: str = ""


def mirror_delete(job: ConversionRequest) -> ConversionResult:
    """Delete the outputs named in the job (see the module doc); raises DeleteUnsupportedError (permanent)
    when the registry refuses deletes, so the job ends dead with that message."""
    targets = [str(t) for t in job.options.get("delete_tags", [job.target_tag])]
    suffixes = [str(s) for s in job.options.get("output_suffixes", [])]
    with client_for(job.registry, job.registry_settings) as client:
        results = delete_outputs(client, job.repository, job.tag, targets, suffixes)
    for result in results:
        log.info("mirrored delete", extra={"job_id": job.job_id, "repository": job.repository,
                                           "source_tag": job.tag, **asdict(result)})
    deleted = next((r.digest for r in results if r.outcome == DELETED), None)
    counters = Counter(("mirror_deletes", r.outcome) for r in results)
    return ConversionResult(target_ref=job.target_ref, target_digest=deleted,
                            details={"deletions": [asdict(r) for r in results], "counters": dict(counters)})


def delete_outputs(client: RegistryClient, repository: str, source_tag: str, targets: Sequence[str],
                   suffixes: Sequence[str]) -> list[TagDeletion]:
    from converter.registry import NotFoundError

    if client.head_manifest(repository, source_tag) is not None:
        # Pushed again since the delete: the outputs are (or will be) its conversion.
        return [TagDeletion(t, SOURCE_BACK, detail=f"{source_tag} exists again") for t in targets]
    results: list[TagDeletion] = []
    tags: list[str] | None = None
    for target in targets:
        try:
            manifest = client.get_manifest(repository, target)
        except NotFoundError:
            results.append(TagDeletion(target, ABSENT))
            continue
        if source_digest_of(manifest) is None:
            results.append(TagDeletion(target, NOT_OURS, manifest.digest,
                                       "no source-digest annotation: not created by obd-autoconvert"))
            continue
        if tags is None:
            tags = client.list_tags(repository)
        holders = _other_holders(client, repository, target, manifest.digest, tags, suffixes)
        if holders:
            results.append(TagDeletion(target, SHARED, manifest.digest,
                                       f"kept: the same manifest is also tagged {', '.join(holders)}"))
            continue
        client.delete_manifest(repository, manifest.digest)
        results.append(TagDeletion(target, DELETED, manifest.digest))
    return results


def _other_holders(client: RegistryClient, repository: str, target: str, digest: str, tags: Sequence[str],
                   suffixes: Sequence[str]) -> list[str]:
    """Live tags other than `target` that point at `digest`. Outputs whose own source tag is gone do not
    count: they are orphans that their own delete jobs remove anyway."""
    present = set(tags)
    holders = []
    for tag in tags:
        if tag == target:
            continue
        found = client.head_manifest(repository, tag)
        if found is None or found.digest != digest:
            continue
        split = split_output(tag, suffixes)
        if split is not None and split[0] not in present:
            continue
        holders.append(tag)
    return holders


# --- stale report -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaleOutput:
    registry: str
    repository: str
    tag: str  # the output tag
    source_tag: str
    recorded_digest: str  # the source digest the output was made from
    current_digest: str | None  # what the source tag points at now (None: gone)
    reason: str  # source_gone | source_moved
    rule: str | None  # the rule that would reconvert or delete it

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reference": f"{self.registry}/{self.repository}:{self.tag}"}


def find_stale(config: Config, registry: str, repository_patterns: Sequence[str] = ("*",),
               client: RegistryClient | None = None) -> list[StaleOutput]:
    """Every output tag (ours) whose source tag is gone or moved, in the matching repositories."""
    if client is None:
        with open_client(config, registry) as own:
            return list(_scan(config, registry, repository_patterns, own))
    return list(_scan(config, registry, repository_patterns, client))


def _scan(config: Config, registry: str, patterns: Sequence[str], client: RegistryClient) -> Iterator[StaleOutput]:
    from converter.registry import NotFoundError, RegistryPermanentError

    for repository in repositories(client, patterns, config.backfill.page_size):
        try:
            tags = client.list_tags(repository, config.backfill.page_size)
        except NotFoundError:
            continue
        present = set(tags)
        for tag in tags:
            split = split_output(tag, config.output_suffixes)
            if split is None:
                continue
            source_tag, suffix = split
            try:
                recorded = source_digest_of(client.get_manifest(repository, tag))
            except RegistryPermanentError:  # vanished meanwhile, or not a manifest we can read
                continue
            if recorded is None:
                continue
            current = None
            if source_tag in present:
                found = client.head_manifest(repository, source_tag)
                current = found.digest if found is not None else None
            if current == recorded:
                continue
            yield StaleOutput(registry, repository, tag, source_tag, recorded, current,
                              "source_gone" if current is None else "source_moved",
                              _rule_for(config, registry, repository, source_tag, suffix))


def _rule_for(config: Config, registry: str, repository: str, source_tag: str, suffix: str) -> str | None:
    event = RegistryEvent("api", "", "push", registry, repository, source_tag, None, None)
    rule = next((r for r in config.rules if suffix in r.output_suffixes and rule_matches(r, event)), None)
    return rule.name if rule is not None else None


def stale_counters(found: Sequence[StaleOutput]) -> dict[tuple[str, str], int]:
    return dict(Counter(("stale_found", s.reason) for s in found))


def fix_intakes(config: Config, found: Sequence[StaleOutput], fix: str) -> tuple[list[Intake], list[dict]]:
    """Jobs fixing stale outputs: `reconvert` (source moved: convert what the tag names now) or `delete`
    (source gone: a delete job, with the same safety checks as delete mirroring). Returns the intakes and
    the entries that cannot be fixed that way, with why."""
    rules = {r.name: r for r in config.rules}
    intakes, skipped = [], []
    for entry in found:
        rule = rules.get(entry.rule or "")
        if rule is None:
            skipped.append({**entry.to_dict(), "why": "no rule covers this output any more"})
        elif fix == "reconvert" and entry.current_digest is None:
            skipped.append({**entry.to_dict(), "why": "source tag is gone: delete instead"})
        elif fix == "delete" and entry.current_digest is not None:
            skipped.append({**entry.to_dict(), "why": "source tag exists (moved): reconvert instead"})
        elif fix == "reconvert":
            assert entry.current_digest is not None
            target_tag, options = rule.job_target(entry.source_tag)
            intakes.append(Intake(source="api", job=NewJob(
                registry=entry.registry, repository=entry.repository, tag=entry.source_tag,
                digest=entry.current_digest, target_tag=target_tag,
                rule=rule.name, options=options, origin="manual")))
        else:
            intakes.append(Intake(source="api", job=delete_job(entry.registry, entry.repository, entry.source_tag,
                                                               rule, config, origin="manual")))
    return intakes, skipped
