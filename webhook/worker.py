"""Conversion workers: claim a job, keep its lease alive, convert, record the outcome.

A `WorkerPool` runs `concurrency` worker threads in one process. Conversions spend their time in
compression, hashing and network I/O, which release the GIL; run more `obd-webhook worker` processes
(or machines, with the redis backend) to scale further.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from webhook.backend import LeasedJobStore
from webhook.config import Config, RegistrySettings
from webhook.conversion import ConversionRequest, ConvertFn, RegistryRefused, perform
from webhook.limits import clip
from webhook.retry import LeaseLost, RetryPolicy
from webhook.store import Job
from webhook.trust import configured_registry

log = logging.getLogger("webhook.worker")


@dataclass(frozen=True)
class WorkerSettings:
    lease_seconds: float = 60.0
    poll_interval_seconds: float = 1.0
    shutdown_grace_seconds: float = 30.0
    event_retention_days: float = 7.0
    job_retention_days: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> WorkerSettings:
        return cls(config.lease_seconds, config.poll_interval_seconds, config.shutdown_grace_seconds,
                   config.event_retention_days, config.job_retention_days)


def _job_fields(job: Job) -> dict[str, object]:
    return {"job_id": job.id, "reference": job.source_ref, "target": job.target_ref,
            "digest": job.digest, "attempt": job.attempts}


class _LeaseKeeper(threading.Thread):
    """Renews a job's lease every third of its length until stopped; notes when it is lost."""

    def __init__(self, store: LeasedJobStore, job: Job, lease_seconds: float) -> None:
        super().__init__(name=f"lease-{job.id[:8]}", daemon=True)
        self.store, self.job, self.lease_seconds = store, job, lease_seconds
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 3):
            try:
                if not self.store.renew_lease(self.job, self.lease_seconds):
                    self.lost = True
                    return
            except Exception:  # a busy database must not kill the conversion; retry next tick
                log.exception("lease renewal failed", extra=_job_fields(self.job))


class Worker:
    """Processes jobs one at a time. `run_once` is the unit tests drive; `run` loops until stopped."""

    def __init__(self, store: LeasedJobStore, convert: ConvertFn, policy: RetryPolicy,
                 settings: WorkerSettings, registries: Mapping[str, RegistrySettings] | None = None,
                 name: str | None = None) -> None:
        self.store, self.convert, self.policy, self.settings = store, convert, policy, settings
        self.registries = dict(registries or {})
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.current: Job | None = None
        self.current_request: ConversionRequest | None = None

    def run_once(self) -> Job | None:
        """Claim and process one job; returns the claimed job, or None if nothing was due."""
        job = self.store.claim(self.name, self.settings.lease_seconds)
        if job is None:
            return None
        self.current = job
        try:
            self._process(job)
        finally:
            self.current = self.current_request = None
        return job

    def _process(self, job: Job) -> None:
        if self.policy.exhausted(job.attempts, job.first_attempt_at):
            last = job.last_error or "worker lost its lease"
            reason = clip(f"gave up after {job.attempts - 1} attempt(s); last error: {last}")
            self.store.bury(job, reason)
            log.error("job dead", extra={**_job_fields(job), "error": reason})
            return
        if configured_registry(self.registries, job.registry) != job.registry:
            self._failed(job, RegistryRefused(job.registry))
            return
        request = ConversionRequest(
            job_id=job.id, registry=job.registry, repository=job.repository, tag=job.tag,
            digest=job.digest, target_tag=job.target_tag, options=job.options,
            registry_settings=self.registries.get(job.registry), attempt=job.attempts, action=job.action,
        )
        self.current_request = request
        log.info("conversion started", extra=_job_fields(job))
        keeper = _LeaseKeeper(self.store, job, self.settings.lease_seconds)
        keeper.start()
        started = time.monotonic()
        try:
            result = perform(request, self.convert)
            if keeper.lost:
                raise LeaseLost("lease expired during the conversion")
        except Exception as error:
            keeper.stopped.set()
            self._failed(job, error)
            return
        finally:
            keeper.stopped.set()
        turbo_digest = result.details.get("turbo_digest")
        if self.store.succeed(job, result.target_digest, result.bytes_written,
                              turbo_digest=str(turbo_digest) if turbo_digest else None):
            counters = result.details.get("counters")
            if counters:
                self.store.add_counters(counters)
            log.info("conversion succeeded", extra={**_job_fields(job), "target_digest": result.target_digest,
                                                     "seconds": round(time.monotonic() - started, 3)})
        else:
            log.warning("lease lost before the result was recorded; another worker owns the job",
                        extra=_job_fields(job))

    def _failed(self, job: Job, error: Exception) -> None:
        message = clip(f"{type(error).__name__}: {error}")
        decision = self.policy.decide(error, job.attempts, job.first_attempt_at or time.time())
        if decision.retry:
            ok = self.store.fail(job, message, time.time() + decision.delay)
            log.warning("conversion failed, will retry", extra={
                **_job_fields(job), "error": message, "retry_in_s": round(decision.delay, 1), "recorded": ok})
        else:
            ok = self.store.bury(job, clip(f"{decision.reason}: {message}"))
            log.error("conversion failed, job dead", extra={**_job_fields(job), "error": message,
                                                             "recorded": ok})

    def run(self, stop: threading.Event) -> None:
        next_prune = 0.0
        while not stop.is_set():
            try:
                if time.time() >= next_prune:
                    retention = self.settings.event_retention_days * 86400
                    self.store.prune_events(time.time() - retention)
                    if self.settings.job_retention_days > 0:
                        self.store.prune_jobs(time.time() - self.settings.job_retention_days * 86400)
                    next_prune = time.time() + 3600
                job = self.run_once()
            except Exception:
                log.exception("worker loop error")
                job = None
            if job is None:
                stop.wait(self.settings.poll_interval_seconds)


class WorkerPool:
    """N worker threads plus graceful shutdown: stop claiming, wait up to the grace period, hand back
    whatever still runs so another worker starts it again."""

    def __init__(self, store: LeasedJobStore, convert: ConvertFn, policy: RetryPolicy, settings: WorkerSettings,
                 concurrency: int, registries: Mapping[str, RegistrySettings] | None = None) -> None:
        self.store, self.settings = store, settings
        self._stop = threading.Event()
        self.workers = [Worker(store, convert, policy, settings, registries,
                               name=f"{socket.gethostname()}:{os.getpid()}:w{i}") for i in range(concurrency)]
        self._threads = [threading.Thread(target=w.run, args=(self._stop,), name=f"worker-{i}", daemon=True)
                         for i, w in enumerate(self.workers)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        log.info("workers started", extra={"concurrency": len(self.workers)})

    def stop(self, grace_seconds: float | None = None) -> list[str]:
        """Stop; returns the ids of jobs handed back because they outlived the grace period."""
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._stop.set()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        released = []
        for worker, thread in zip(self.workers, self._threads, strict=True):
            job, request = worker.current, worker.current_request
            if thread.is_alive() and job is not None and self.store.release(job):
                released.append(job.id)
                log.warning("conversion still running after the grace period; job re-queued",
                            extra=_job_fields(job))
            if request is not None:
                request.cancel.set()  # after the release, so the abort is not recorded as a failure
        return released
