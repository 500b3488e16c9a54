"""Backfill: convert the tags a registry already holds, as if each had just been pushed.

Walks the repositories (catalog, Harbor's API or an explicit list) and their tags, applies the same
decision as push events (`webhook.rules.decide`: rules, suffixes, artifact and loop checks), skips tags
whose outputs already record the tag's digest (one manifest GET per output), and records the rest as
ordinary jobs with origin `backfill`, which every worker takes only when no live push waits.

A run's progress is a record in the job store (`save_run`), so the API, the status page and the CLI
see the same numbers. Re-running is idempotent: converted tags are skipped as up to date, and tags whose
job is still pending are answered `duplicate_image` by the store ("already_queued" here).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from webhook.backend import JobBackend
from webhook.config import Config, Rule
from webhook.events import RegistryEvent
from webhook.lifecycle import source_digest_of, split_output
from webhook.registry_access import matches, open_client, repositories
from webhook.rules import ACCESSORY_TAG, decide, rule_matches
from webhook.store import Intake, JobState, NewJob

if TYPE_CHECKING:
    from converter.registry import RegistryClient

log = logging.getLogger("webhook.backfill")
RUN_KIND = "backfill"
STALLED_AFTER_S = 300.0  # a running run not updated for this long died with its process
MAX_LISTED = 1000  # would-queue references kept in a dry run's record (the CLI prints them all)


@dataclass(frozen=True)
class BackfillRequest:
    registry: str
    repositories: tuple[str, ...] = ("*",)
    tags: tuple[str, ...] = ("*",)
    dry_run: bool = False
    limit: int | None = None  # queue at most this many jobs

    def describe(self) -> dict[str, Any]:
        return {"registry": self.registry, "repositories": list(self.repositories), "tags": list(self.tags),
                "dry_run": self.dry_run, "limit": self.limit}


@dataclass
class Candidate:
    """One listed tag and what the backfill made of it."""

    repository: str
    tag: str
    reason: str | None = None  # why it is skipped; None = to queue
    job: NewJob | None = None


@dataclass
class Progress:
    id: str
    request: BackfillRequest
    state: str = "running"  # running | finished | failed (| interrupted, when read back)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    repositories: int = 0
    tags: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    queued: int = 0
    job_ids: list[str] = field(default_factory=list)
    would_queue: list[str] = field(default_factory=list)
    error: str | None = None

    def record(self) -> dict[str, Any]:
        return {"id": self.id, **self.request.describe(), "state": self.state, "started_at": self.started_at,
                "updated_at": self.updated_at, "finished_at": self.finished_at,
                "listed": {"repositories": self.repositories, "tags": self.tags},
                "skipped": dict(self.skipped), "queued": self.queued, "job_ids": self.job_ids,
                "would_queue": self.would_queue[:MAX_LISTED], "error": self.error}


def save_interval(progress: Progress) -> float:
    """Seconds between two saves of a running record: 5, growing with the job-id list it rewrites (the
    record of a 100k-tag backfill is megabytes), never beyond 60 (well inside STALLED_AFTER_S)."""
    return min(60.0, 5.0 + len(progress.job_ids) / 2000)


def tag_reason_without_manifest(config: Config, registry: str, repository: str, tag: str) -> str | None:
    """The reasons to skip a tag that need no registry call (name checks), else None."""
    if tag.startswith("sha256:"):
        return "tag_is_digest"
    if split_output(tag, config.output_suffixes) is not None:
        return "output_tag"
    if ACCESSORY_TAG.search(tag):
        return "not_image"
    event = RegistryEvent("backfill", "", "push", registry, repository, tag, None, None)
    if not any(rule_matches(rule, event) for rule in config.rules):
        return "no_matching_rule"
    return None


def _event_for(registry: str, repository: str, tag: str, manifest: Any) -> RegistryEvent:
    """The push event this tag would have produced (with includereferences), for `decide`."""
    try:
        body = manifest.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    if "manifests" in body:
        references = [m for m in body.get("manifests") or [] if isinstance(m, dict)]
    else:  # Distribution lists the config first, then the layers
        config = body.get("config")
        references = ([config] if isinstance(config, dict) else []) + [
            layer for layer in body.get("layers") or [] if isinstance(layer, dict)]
    artifact_type = body.get("artifactType")
    return RegistryEvent("backfill", "", "push", registry, repository, tag, manifest.digest, manifest.media_type,
                         artifact_type=artifact_type if isinstance(artifact_type, str) else None,
                         references=tuple(references))


def up_to_date(client: RegistryClient, repository: str, tag: str, digest: str, rule: Rule) -> bool:
    """Every output of `rule` for `tag` records `digest` as its source (one manifest GET per output)."""
    from converter.registry import RegistryPermanentError

    for suffix in rule.output_suffixes:
        try:
            output = client.get_manifest(repository, tag + suffix)
        except RegistryPermanentError:  # missing, or not a manifest we can read: convert (and replace)
            return False
        if source_digest_of(output) != digest:
            return False
    return True


def evaluate(config: Config, client: RegistryClient, registry: str, repository: str, tag: str) -> Candidate:
    """Decide one listed tag: a skip reason, or the job to queue."""
    from converter.registry import NotFoundError, RegistryPermanentError, UnsupportedManifestError

    reason = tag_reason_without_manifest(config, registry, repository, tag)
    if reason is not None:
        return Candidate(repository, tag, reason)
    try:
        manifest = client.get_manifest(repository, tag)
    except NotFoundError:
        return Candidate(repository, tag, "gone")  # deleted between the listing and now
    except UnsupportedManifestError:
        return Candidate(repository, tag, "not_image")
    except RegistryPermanentError as exc:
        log.warning("cannot read manifest", extra={"repository": repository, "tag": tag, "error": str(exc)})
        return Candidate(repository, tag, "unreadable")
    decision = decide(_event_for(registry, repository, tag, manifest), config)
    if decision.rule is None:
        return Candidate(repository, tag, decision.reason)
    rule = decision.rule
    if up_to_date(client, repository, tag, manifest.digest, rule):
        return Candidate(repository, tag, "up_to_date")
    target_tag, options = rule.job_target(tag)
    return Candidate(repository, tag, job=NewJob(
        registry=registry, repository=repository, tag=tag, digest=manifest.digest,
        target_tag=target_tag, rule=rule.name, options=options,
        media_type=manifest.media_type, origin="backfill"))


def candidates(config: Config, client: RegistryClient, request: BackfillRequest, progress: Progress
               ) -> Iterator[Candidate]:
    from converter.registry import NotFoundError

    for repository in repositories(client, request.repositories, config.backfill.page_size):
        progress.repositories += 1
        try:
            tags = client.list_tags(repository, config.backfill.page_size)
        except NotFoundError:  # explicit name that does not exist, or deleted meanwhile
            progress.skipped["repository_not_found"] += 1
            continue
        for tag in tags:
            if not matches(tag, request.tags):
                continue
            progress.tags += 1
            yield evaluate(config, client, request.registry, repository, tag)


def run_backfill(config: Config, store: JobBackend, request: BackfillRequest, *, run_id: str | None = None,
                 client: RegistryClient | None = None) -> Progress:
    """Run one backfill to the end (or its limit); its progress record is updated as it goes."""
    progress = Progress(run_id or str(uuid.uuid4()), request)
    store.save_run(progress.id, RUN_KIND, progress.record())
    own = client is None
    client = client or open_client(config, request.registry)
    batch: list[Candidate] = []
    saved = time.monotonic()
    try:
        for candidate in candidates(config, client, request, progress):
            if time.monotonic() - saved > save_interval(progress):  # fresh (and "running") on long walks
                progress.updated_at = time.time()
                store.save_run(progress.id, RUN_KIND, progress.record())
                saved = time.monotonic()
            if candidate.job is None:
                progress.skipped[candidate.reason or "unknown"] += 1
                continue
            if request.limit is not None and progress.queued + len(batch) >= request.limit:
                break
            if request.dry_run:
                progress.queued += 1
                progress.would_queue.append(f"{request.registry}/{candidate.repository}:{candidate.tag}")
                continue
            batch.append(candidate)
            if len(batch) >= config.backfill.batch_size:
                _flush(store, batch, progress)
                batch = []
        _flush(store, batch, progress)
        progress.state = "finished"
    except Exception as exc:
        _flush(store, batch, progress)
        progress.state, progress.error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("backfill failed", extra={"run_id": progress.id})
    finally:
        if own:
            client.close()
        progress.finished_at = progress.updated_at = time.time()
        store.save_run(progress.id, RUN_KIND, progress.record())
        counts = Counter({("backfill_tags", "listed"): progress.tags})
        if not request.dry_run:
            counts[("backfill_tags", "queued")] = progress.queued
            for reason, n in progress.skipped.items():
                counts[("backfill_tags", f"skipped_{reason}")] = n
        store.add_counters({k: v for k, v in counts.items() if v})
    log.info("backfill %s", progress.state, extra={"run_id": progress.id, "queued": progress.queued,
                                                  "skipped": dict(progress.skipped), "tags": progress.tags})
    return progress


def _flush(store: JobBackend, batch: Sequence[Candidate], progress: Progress) -> None:
    if not batch:
        return
    outcomes = store.record([Intake(source="backfill", job=c.job) for c in batch])
    for outcome in outcomes:
        if outcome.status == "accepted" and outcome.job_id is not None:
            progress.queued += 1
            progress.job_ids.append(outcome.job_id)
        else:  # the same digest is already queued or running for that tag
            progress.skipped["already_queued"] += 1
    progress.updated_at = time.time()


def progress_view(store: JobBackend, record: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A run record plus how its jobs are doing (done, failed, pending) for the API and status page."""
    now = time.time() if now is None else now
    view = {k: v for k, v in record.items() if k != "job_ids"}
    if view.get("state") == "running" and now - float(view.get("updated_at") or 0) > STALLED_AFTER_S:
        view["state"] = "interrupted"  # its process died; running it again picks up where it stopped
    states = store.job_states(record.get("job_ids") or [])
    view["jobs"] = {
        "done": states[JobState.SUCCEEDED.value],
        "failed": states[JobState.DEAD.value],
        "pending": states[JobState.QUEUED.value] + states[JobState.RUNNING.value] + states[JobState.FAILED.value],
        "superseded": states[JobState.SUPERSEDED.value],
    }
    return view
