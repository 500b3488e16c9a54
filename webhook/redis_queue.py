"""The `redis` queue backend: jobs, states, retries and leases are RQ's, kept in Redis.

Why RQ, and how our job model maps onto it, is in docs/webhook.md §5. In short:

* one RQ job per conversion job, with our id; our fields live in `job.meta`;
* two RQ queues: live pushes and manual requests in `obd-conversions`, backfill jobs in `obd-backfill`;
  workers listen to both with the live queue first, so a live push never waits behind a backfill;
* states come from RQ's: queued, started (= running), scheduled (= failed, waiting for its retry),
  finished (= succeeded), failed (= dead), canceled (= superseded);
* intake (dedup by delivery id and by tag+digest, superseding) runs under a short Redis lock, so
  several front ends can share one Redis;
* the lease is RQ's job heartbeat: `LeasedWorker` makes it `lease_seconds` long and renews it every
  third, and RQ's maintenance (run by every live worker) retries a job whose heartbeat expired;
* retries: the job function evaluates our tenacity `RetryPolicy` and tells RQ the next interval, or
  sets `retries_left = 0` for a permanent failure so RQ marks the job failed (dead) at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from redis import Redis, RedisError
from redis.exceptions import LockError
from redis.lock import Lock
from rq import Queue, Retry, get_current_job
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.worker import Worker

from converter.errors import PermanentError, TransientError
from webhook.config import Config
from webhook.conversion import (
    ConversionFailed,
    ConversionRequest,
    ConvertFn,
    RegistryRefused,
    load_convert_callable,
    perform,
)
from webhook.limits import clip
from webhook.retry import RetryPolicy
from webhook.store import (
    DURATION_BUCKETS,
    ORIGIN_PRIORITY,
    Attempt,
    Intake,
    IntakeOutcome,
    InvalidTransition,
    Job,
    JobNotFound,
    JobState,
    NewJob,
    StoreStats,
)
from webhook.trust import configured_registry

log = logging.getLogger("webhook.redis")
QUEUE_NAME = "obd-conversions"
BACKFILL_QUEUE_NAME = "obd-backfill"  # lower priority: workers take it only when QUEUE_NAME is empty
PREFIX = "obd:"
JOBS_KEY = PREFIX + "jobs"  # sorted set: job id -> creation time (listing order)
IMAGES_KEY = PREFIX + "images"  # hash: image key -> newest job id
COUNTERS_KEY = PREFIX + "counters"  # hash: "name|label" -> count
RUNS_KEY = PREFIX + "runs"  # hash: run id -> JSON record
RUNS_ORDER_KEY = PREFIX + "runs-order"  # sorted set: run id -> creation time (kind in the member's record)
DURATIONS_KEY = PREFIX + "durations"  # hash: bucket bound / "count" / "sum"
KEEP = -1  # RQ ttl meaning "never expire": job records are the job history

RQ_STATES = {
    JobStatus.QUEUED: JobState.QUEUED,
    JobStatus.STARTED: JobState.RUNNING,
    JobStatus.SCHEDULED: JobState.FAILED,
    JobStatus.DEFERRED: JobState.QUEUED,
    JobStatus.FINISHED: JobState.SUCCEEDED,
    JobStatus.FAILED: JobState.DEAD,
    JobStatus.STOPPED: JobState.DEAD,
    JobStatus.CANCELED: JobState.SUPERSEDED,
}


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc).timestamp() if value.tzinfo is None else value.timestamp()


def _state(job: RQJob) -> JobState:
    return RQ_STATES.get(job.get_status(refresh=False) or JobStatus.QUEUED, JobState.QUEUED)


def _to_job(job: RQJob, scheduled_at: float | None = None) -> Job:
    meta = job.meta
    state = _state(job)
    attempts = meta.get("attempt_log", [])
    last = attempts[-1] if attempts else {}
    return Job(
        id=job.id, state=state, source=meta["source"], event_id=meta.get("event_id"),
        registry=meta["registry"], repository=meta["repository"], tag=meta["tag"], digest=meta["digest"],
        media_type=meta.get("media_type"), target_tag=meta["target_tag"], rule=meta["rule"],
        options=meta.get("options", {}), attempts=len(attempts), created_at=meta["created_at"],
        updated_at=meta.get("updated_at", meta["created_at"]), first_attempt_at=meta.get("first_attempt_at"),
        next_attempt_at=scheduled_at or meta["created_at"], started_at=last.get("started_at"),
        finished_at=_ts(job.ended_at) if state in (JobState.SUCCEEDED, JobState.DEAD) else None,
        lease_owner=job.worker_name if state is JobState.RUNNING else None, lease_token=None,
        lease_expires_at=None,
        last_error=clip(meta["last_error"]) if meta.get("last_error") is not None else None,
        target_digest=meta.get("target_digest"),
        bytes_written=meta.get("bytes_written"), superseded_by=meta.get("superseded_by"),
        origin=meta.get("origin", "push"), action=meta.get("action", "convert"), priority=meta.get("priority", 0),
        turbo_digest=meta.get("turbo_digest"),
    )


def _retry(policy: RetryPolicy) -> Retry | None:
    retries = policy.settings.max_attempts - 1
    # Interval 0 = back to the queue at once: what a job abandoned by a dead worker gets. After a
    # failure the job function sets the interval its retry policy computed.
    return Retry(max=retries, interval=0) if retries > 0 else None


class RedisBackend:
    """The job API (`webhook.backend.JobBackend`, front-end part) on RQ. Workers are RQ workers
    (`run_worker`), so claim/lease/finish happen inside RQ, not through this class."""

    def __init__(self, url: str, config: Config) -> None:
        self.redis = Redis.from_url(url)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.backfill_queue = Queue(BACKFILL_QUEUE_NAME, connection=self.redis)
        self.config = config
        self.policy = RetryPolicy(config.retry)

    # -- intake -----------------------------------------------------------------------------------

    def record(self, items: Sequence[Intake], now: float | None = None) -> list[IntakeOutcome]:
        now = time.time() if now is None else now
        counts: Counter[str] = Counter()
        outcomes = []
        # One front end at a time decides dedup and superseding; the lock expires if its holder dies.
        with self.redis.lock(PREFIX + "intake", timeout=30, blocking_timeout=30):
            for item in items:
                outcome = self._record_one(item, now)
                outcomes.append(outcome)
                counts[f"events_received|{item.source}"] += 1
                if outcome.status == "accepted":
                    counts[f"events_accepted|{item.source}"] += 1
                else:
                    counts[f"events_ignored|{outcome.reason or 'unknown'}"] += 1
        with self.redis.pipeline() as pipe:
            for key, value in counts.items():
                pipe.hincrby(COUNTERS_KEY, key, value)
            pipe.execute()
        return outcomes

    def _record_one(self, item: Intake, now: float) -> IntakeOutcome:
        if item.job is None:
            return IntakeOutcome("ignored", reason=item.reason or "unknown")
        event_key = PREFIX + f"event:{item.event_id}"
        if item.event_id is not None:
            seen = self.redis.get(event_key)
            if seen is not None:
                return IntakeOutcome("duplicate_event", job_id=seen.decode(), reason="duplicate_event")
        new = item.job
        retention = int(self.config.event_retention_days * 86400)
        latest_id = self.redis.hget(IMAGES_KEY, new.image_key)
        latest = self._fetch(latest_id.decode()) if latest_id else None
        if (latest is not None and latest.meta.get("digest") == new.digest
                and latest.meta.get("action", "convert") == new.action and _state(latest) is not JobState.DEAD):
            if (_state(latest) is JobState.QUEUED and latest.origin == BACKFILL_QUEUE_NAME
                    and new.priority < latest.meta.get("priority", 0)):
                # A live push of what a backfill job waits for: move the job to the live queue.
                self.backfill_queue.remove(latest)
                latest.meta.update(origin=new.origin, priority=new.priority, updated_at=now)
                latest.save_meta()
                self.queue.enqueue_job(latest)
            if item.event_id is not None:
                self.redis.set(event_key, latest.id, ex=retention)
            return IntakeOutcome("duplicate_image", job_id=latest.id, reason="duplicate_image")
        job_id = str(uuid.uuid4())
        superseded = []
        if latest is not None and _state(latest) in (JobState.QUEUED, JobState.FAILED):
            latest.meta.update(superseded_by=job_id, updated_at=now)
            latest.save_meta()
            latest.cancel()
            superseded.append(latest.id)
        self._enqueue(job_id, item, new, now)
        with self.redis.pipeline() as pipe:
            pipe.hset(IMAGES_KEY, new.image_key, job_id)
            pipe.zadd(JOBS_KEY, {job_id: now})
            if item.event_id is not None:
                pipe.set(event_key, job_id, ex=retention)
            pipe.execute()
        return IntakeOutcome("accepted", job_id=job_id, superseded=tuple(superseded))

    def _enqueue(self, job_id: str, item: Intake, new: NewJob, now: float) -> None:
        meta = {"source": item.source, "event_id": item.event_id, "registry": new.registry,
                "repository": new.repository, "tag": new.tag, "digest": new.digest,
                "media_type": new.media_type, "target_tag": new.target_tag, "image_key": new.image_key,
                "rule": new.rule, "options": dict(new.options), "created_at": now, "updated_at": now,
                "attempt_log": [], "origin": new.origin, "action": new.action, "priority": new.priority}
        keep = int(self.config.job_retention_days * 86400) or KEEP
        self._queue_of(new.origin).enqueue(run_conversion, job_id=job_id, meta=meta, retry=_retry(self.policy),
                           result_ttl=keep, failure_ttl=keep, job_timeout=KEEP,
                           description=f"{new.registry}/{new.repository}:{new.tag} -> {new.target_tag}")

    def _queue_of(self, origin: str) -> Queue:
        return self.backfill_queue if ORIGIN_PRIORITY.get(origin, 0) > 0 else self.queue

    def _queue_of_job(self, job: RQJob) -> Queue:
        return self.backfill_queue if job.origin == BACKFILL_QUEUE_NAME else self.queue

    # -- reading ----------------------------------------------------------------------------------

    def _fetch(self, job_id: str) -> RQJob | None:
        try:
            return RQJob.fetch(job_id, connection=self.redis)
        except Exception:  # NoSuchJobError, or a record that is not ours
            return None

    def _scheduled_at(self, job: RQJob) -> float | None:
        if job.get_status(refresh=False) != JobStatus.SCHEDULED:
            return None
        score = self.redis.zscore(ScheduledJobRegistry(queue=self._queue_of_job(job)).key, job.id)
        return float(score) if score is not None else None

    def get(self, job_id: str) -> Job:
        job = self._fetch(job_id)
        if job is None or "registry" not in job.meta:
            raise JobNotFound(job_id)
        return _to_job(job, self._scheduled_at(job))

    def list_jobs(self, state: JobState | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        found: list[Job] = []
        skipped, start, page = 0, 0, 200
        while len(found) < limit:
            ids = [i.decode() for i in self.redis.zrevrange(JOBS_KEY, start, start + page - 1)]
            if not ids:
                break
            start += page
            for job in RQJob.fetch_many(ids, connection=self.redis):
                if job is None or (state is not None and _state(job) is not state):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                found.append(_to_job(job, self._scheduled_at(job)))
                if len(found) == limit:
                    break
        return found

    def attempts(self, job_id: str) -> list[Attempt]:
        job = self._fetch(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return [Attempt(a["attempt"], a["worker"], a["started_at"], a.get("finished_at"), a.get("outcome"),
                        clip(a["error"]) if a.get("error") is not None else None)
                for a in job.meta.get("attempt_log", [])]

    def counts_by_state(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for q in (self.queue, self.backfill_queue):
            counts.update({
                JobState.QUEUED.value: q.count,
                JobState.RUNNING.value: StartedJobRegistry(queue=q).count,
                JobState.SUCCEEDED.value: FinishedJobRegistry(queue=q).count,
                JobState.FAILED.value: ScheduledJobRegistry(queue=q).count,
                JobState.DEAD.value: FailedJobRegistry(queue=q).count,
                JobState.SUPERSEDED.value: CanceledJobRegistry(queue=q).count,
            })
        return {s.value: counts[s.value] for s in JobState}

    def stats(self) -> StoreStats:
        counters: dict[tuple[str, str], int] = {}
        for key, value in self.redis.hgetall(COUNTERS_KEY).items():
            name, _, label = key.decode().partition("|")
            counters[(name, label)] = int(value)
        durations = {k.decode(): float(v) for k, v in self.redis.hgetall(DURATIONS_KEY).items()}
        by_state = self.counts_by_state()
        return StoreStats(
            counters=counters, jobs_by_state=by_state,
            queue_depth=by_state[JobState.QUEUED.value] + by_state[JobState.FAILED.value],
            duration_buckets=[(b, int(durations.get(repr(b), 0))) for b in DURATION_BUCKETS],
            duration_count=int(durations.get("count", 0)), duration_sum=durations.get("sum", 0.0),
        )

    def ping(self) -> None:
        self.redis.ping()

    # -- operations -------------------------------------------------------------------------------

    def retry(self, job_id: str, now: float | None = None) -> Job:
        now = time.time() if now is None else now
        job = self._fetch(job_id)
        if job is None or "registry" not in job.meta:
            raise JobNotFound(job_id)
        state = _state(job)
        if state in (JobState.QUEUED, JobState.RUNNING, JobState.SUPERSEDED):
            raise InvalidTransition(f"job {job_id} is {state.value}; only dead, failed or succeeded jobs "
                                    "can be retried")
        queue = self._queue_of_job(job)
        for registry in (FailedJobRegistry(queue=queue), FinishedJobRegistry(queue=queue),
                         ScheduledJobRegistry(queue=queue)):
            registry.remove(job)
        job.meta.update(first_attempt_at=None, updated_at=now)
        job.retries_left = self.policy.settings.max_attempts - 1 or None
        job.save()
        queue.enqueue_job(job)
        self.redis.hincrby(COUNTERS_KEY, "manual_retries|", 1)
        return self.get(job_id)

    # -- runs (backfills) and extra counters --------------------------------------------------------

    def add_counters(self, counts: Mapping[tuple[str, str], int]) -> None:
        _add_counters(self.redis, counts)

    def save_run(self, run_id: str, kind: str, data: Mapping[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.redis.pipeline() as pipe:
            pipe.hset(RUNS_KEY, run_id, json.dumps({**dict(data), "_kind": kind}, sort_keys=True))
            pipe.zadd(RUNS_ORDER_KEY, {run_id: now}, nx=True)
            pipe.execute()

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(RUNS_KEY, run_id)
        if raw is None:
            return None
        data = json.loads(raw)
        data.pop("_kind", None)
        return data

    def list_runs(self, kind: str, limit: int = 20) -> list[dict[str, Any]]:
        found = []
        for run_id in self.redis.zrevrange(RUNS_ORDER_KEY, 0, -1):
            raw = self.redis.hget(RUNS_KEY, run_id)
            data = json.loads(raw) if raw is not None else {}
            if data.pop("_kind", None) == kind:
                found.append(data)
                if len(found) == limit:
                    break
        return found

    def job_states(self, job_ids: Sequence[str]) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        ids = list(job_ids)
        for start in range(0, len(ids), 500):
            for job in RQJob.fetch_many(ids[start:start + 500], connection=self.redis):
                if job is not None:
                    counts[_state(job).value] += 1
        return counts

    def prune_events(self, older_than: float) -> int:
        return 0  # delivery ids expire by themselves (Redis TTL)

    def prune_jobs(self, older_than: float) -> int:
        return 0  # finished jobs expire by themselves (RQ result_ttl / failure_ttl = job_retention_days)


# -- workers ------------------------------------------------------------------------------------------

# Set by run_worker before RQ starts; the job function runs in a work horse forked from that process
# and finds the configuration, the convert hook and the policy here.
_worker_context: dict[str, Any] = {}


class LeasedWorker(Worker):
    """An RQ worker whose job heartbeat (our lease) is `lease_seconds`, renewed every third.

    RQ's default heartbeat expiry is the monitoring interval + 60 s, so a dead worker's job would come
    back only after more than a minute; the lease setting decides that here, as in embedded mode.
    """

    lease_seconds = 60

    def get_heartbeat_ttl(self, job: RQJob, working_time: float = 0.0) -> int:
        return math.ceil(self.lease_seconds)


def run_worker(config: Config) -> None:
    """`obd-webhook worker` in redis mode: one RQ worker (one conversion at a time) with the scheduler
    that moves jobs whose retry time has come back to the queue."""
    redis = Redis.from_url(config.redis_url or "")
    _worker_context.update(config=config, convert=load_convert_callable(config.convert_callable),
                           policy=RetryPolicy(config.retry), redis=redis)
    LeasedWorker.lease_seconds = config.lease_seconds
    # RQ takes from the first non-empty queue in this order: live pushes before backfill jobs.
    worker = LeasedWorker([Queue(QUEUE_NAME, connection=redis), Queue(BACKFILL_QUEUE_NAME, connection=redis)],
                          connection=redis,
                          name=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
                          job_monitoring_interval=max(1, int(config.lease_seconds / 3)),
                          maintenance_interval=max(1, int(config.lease_seconds / 2)),
                          # An idle worker blocks in the dequeue for worker_ttl - 15 s and runs the
                          # maintenance (which finds expired leases) only between two waits.
                          worker_ttl=15 + max(1, int(config.lease_seconds / 2)))
    worker.work(with_scheduler=True, logging_level=config.log_level)


def _renew(lock: Lock, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        try:
            lock.reacquire()
        except (LockError, RedisError):
            log.warning("could not renew the per-tag conversion lock", exc_info=True)


def _record_duration(redis: Redis, seconds: float) -> None:
    with redis.pipeline() as pipe:
        for bound in DURATION_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(DURATIONS_KEY, repr(bound), 1)
        pipe.hincrby(DURATIONS_KEY, "count", 1)
        pipe.hincrbyfloat(DURATIONS_KEY, "sum", seconds)
        pipe.execute()


def run_conversion() -> dict[str, Any]:
    """The RQ job function: one attempt of one conversion job."""
    job = get_current_job()
    assert job is not None, "run_conversion runs inside an RQ worker"
    ctx = _worker_context
    config: Config = ctx["config"]
    policy: RetryPolicy = ctx["policy"]
    convert: ConvertFn = ctx["convert"]
    redis: Redis = ctx["redis"]
    meta = job.meta
    if _succeeded(meta):
        # RQ can start a job again after a worker died (its maintenance and the Retry schedule may both
        # re-enqueue it); a job that already succeeded is not converted twice.
        return _stored_result(meta)
    now = time.time()
    log_entries: list[dict[str, Any]] = meta.setdefault("attempt_log", [])
    if log_entries and log_entries[-1].get("finished_at") is None:
        # The previous holder died: RQ's maintenance re-ran the job after its heartbeat expired.
        log_entries[-1].update(finished_at=now, outcome="lease_expired",
                               error="worker lost its lease (killed or stalled)")
    attempt = len(log_entries) + 1
    meta.setdefault("first_attempt_at", now)
    if meta["first_attempt_at"] is None:
        meta["first_attempt_at"] = now
    log_entries.append({"attempt": attempt, "worker": job.worker_name or "", "started_at": now})
    meta["updated_at"] = now
    job.save_meta()
    fields = {"job_id": job.id, "reference": f"{meta['registry']}/{meta['repository']}@{meta['digest']}",
              "digest": meta["digest"], "attempt": attempt}
    registry = configured_registry(config.registries, meta["registry"])
    request = ConversionRequest(
        job_id=job.id, registry=meta["registry"], repository=meta["repository"], tag=meta["tag"],
        digest=meta["digest"], target_tag=meta["target_tag"],
        # Workers on other machines reuse each other's converted layers through the same Redis.
        options={"cache_url": config.redis_url, **meta.get("options", {})},
        registry_settings=config.registries.get(meta["registry"]), attempt=attempt,
        action=meta.get("action", "convert"),
    )
    # One conversion per target tag at a time, across all workers.
    # The lock expires a lease after its holder stops renewing it (a killed worker frees the tag).
    lock = redis.lock(PREFIX + f"running:{meta['image_key']}", timeout=config.lease_seconds,
                      blocking_timeout=config.lease_seconds * 4)
    started = time.monotonic()
    try:
        if policy.exhausted(attempt, meta["first_attempt_at"]):
            raise PermanentError(f"gave up after {attempt - 1} attempt(s); last error: "
                                 f"{meta.get('last_error') or 'worker lost its lease'}")
        if registry != meta["registry"]:
            raise RegistryRefused(meta["registry"])
        if not lock.acquire():
            raise TransientError(f"another conversion of {meta['image_key']} is still running")
        current = RQJob.fetch(job.id, connection=redis).meta
        if _succeeded(current):  # a duplicate run finished this job while we waited for the tag's lock
            with contextlib.suppress(LockError):
                lock.release()
            job.meta = current
            job.save_meta()
            return _stored_result(current)
        renewing = threading.Event()
        renewer = threading.Thread(target=_renew, args=(lock, renewing, config.lease_seconds / 3), daemon=True)
        renewer.start()
        try:
            result = perform(request, convert)
        finally:
            renewing.set()
            renewer.join()
            with contextlib.suppress(LockError):  # expired while Redis was unreachable: nothing to free
                lock.release()
    except Exception as error:
        message = clip(f"{type(error).__name__}: {error}")
        decision = policy.decide(error, attempt, meta["first_attempt_at"])
        if decision.retry:
            job.retry_intervals = [max(1, math.ceil(decision.delay))]
            redis.hincrby(COUNTERS_KEY, "retries|", 1)
            outcome, meta["last_error"] = "retry", message
        else:
            job.retries_left = 0  # RQ then marks the job failed (dead) instead of retrying
            outcome, meta["last_error"] = "dead", f"{decision.reason}: {message}"
        log_entries[-1].update(finished_at=time.time(), outcome=outcome, error=message)
        meta["updated_at"] = time.time()
        job.save_meta()
        _record_duration(redis, time.monotonic() - started)
        log.warning("conversion failed", extra={**fields, "error": message, "outcome": outcome})
        # RQ stores the raised exception's traceback with the job: raise one whose text is clipped.
        raise ConversionFailed(message) from None
    finished = time.time()
    log_entries[-1].update(finished_at=finished, outcome="succeeded")
    meta.update(target_digest=result.target_digest, bytes_written=result.bytes_written, last_error=None,
                updated_at=finished, turbo_digest=result.details.get("turbo_digest"))
    job.save_meta()
    _record_duration(redis, time.monotonic() - started)
    if result.bytes_written:
        redis.hincrby(COUNTERS_KEY, "conversion_bytes|", result.bytes_written)
    _add_counters(redis, result.details.get("counters") or {})
    log.info("conversion succeeded", extra={**fields, "target_digest": result.target_digest})
    return {"target_digest": result.target_digest, "bytes_written": result.bytes_written,
            "details": json.loads(json.dumps({k: v for k, v in result.details.items() if k != "counters"},
                                             default=str))}


def _add_counters(redis: Redis, counts: Mapping[tuple[str, str], int]) -> None:
    if counts:
        with redis.pipeline() as pipe:
            for (name, label), value in counts.items():
                pipe.hincrby(COUNTERS_KEY, f"{name}|{label}", value)
            pipe.execute()


def _succeeded(meta: dict[str, Any]) -> bool:
    return any(entry.get("outcome") == "succeeded" for entry in meta.get("attempt_log", ()))


def _stored_result(meta: dict[str, Any]) -> dict[str, Any]:
    return {"target_digest": meta.get("target_digest"), "bytes_written": meta.get("bytes_written", 0),
            "details": {"duplicate_run": True}}


def backend_for(config: Config) -> RedisBackend:
    if not config.redis_url:
        raise ValueError("queue: redis needs redis_url (e.g. redis://127.0.0.1:6379/0)")
    return RedisBackend(config.redis_url, config)
