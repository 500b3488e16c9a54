"""The SQLite job store, the retry policy and the worker, with real SQLite files and real threads."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from converter.errors import PermanentError, TransientError
from tests.test_webhook_support import digest_of, flaky_convert, permanent_convert
from webhook.config import RetrySettings
from webhook.conversion import ConversionRequest, ConversionResult
from webhook.retry import RetryPolicy
from webhook.store import Intake, InvalidTransition, JobNotFound, JobState, JobStore, NewJob
from webhook.worker import Worker, WorkerPool, WorkerSettings

FAST_RETRY = RetrySettings(
    max_attempts=3, max_total_seconds=3600, initial_backoff_seconds=0.0, max_backoff_seconds=0.0, jitter_seconds=0.0
)


def new_job(tag: str = "v1", digest: str | None = None, repo: str = "demo/app") -> NewJob:
    return NewJob(
        registry="127.0.0.1:5101",
        repository=repo,
        tag=tag,
        digest=digest or digest_of(tag),
        target_tag=tag + "_obd",
        rule="default",
        options={"oci": True},
    )


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def test_record_dedups_event_ids_and_images_and_counts(store: JobStore) -> None:
    outcomes = store.record(
        [
            Intake("distribution", "e1", job=new_job()),
            Intake("distribution", "e1", job=new_job()),  # redelivery of the same event
            Intake("distribution", "e2", job=new_job()),  # another push of the same digest
            Intake("distribution", "e3", reason="blob"),
        ]
    )
    assert [o.status for o in outcomes] == ["accepted", "duplicate_event", "duplicate_image", "ignored"]
    assert outcomes[1].job_id == outcomes[2].job_id == outcomes[0].job_id
    assert store.counts_by_state()["queued"] == 1
    # A later redelivery of e2 is also recognised by its id.
    assert store.record([Intake("distribution", "e2", job=new_job())])[0].status == "duplicate_event"
    counters = store.stats().counters
    assert counters[("events_received", "distribution")] == 5
    assert counters[("events_accepted", "distribution")] == 1
    assert counters[("events_ignored", "duplicate_event")] == 2
    assert counters[("events_ignored", "duplicate_image")] == 1
    assert counters[("events_ignored", "blob")] == 1


def test_newer_push_supersedes_pending_job_but_not_running_one(store: JobStore) -> None:
    first = store.record([Intake("distribution", "a", job=new_job(digest=digest_of("A")))])[0]
    second = store.record([Intake("distribution", "b", job=new_job(digest=digest_of("B")))])[0]
    assert second.superseded == (first.job_id,)
    old = store.get(first.job_id)
    assert old.state is JobState.SUPERSEDED and old.superseded_by == second.job_id
    running = store.claim("w", 30)
    assert running.id == second.job_id
    third = store.record([Intake("distribution", "c", job=new_job(digest=digest_of("C")))])[0]
    assert third.superseded == () and store.get(second.job_id).state is JobState.RUNNING
    # One conversion per image: the newer job waits while the older one for the same tag runs.
    assert store.claim("w2", 30) is None
    assert store.succeed(running, "sha256:out", 5)
    assert store.claim("w2", 30).id == third.job_id


def test_same_digest_after_tag_moved_away_is_a_new_job(store: JobStore) -> None:
    a = store.record([Intake("distribution", "1", job=new_job(digest=digest_of("A")))])[0]
    job = store.claim("w", 30)
    store.succeed(job, "sha256:x", 1)
    b = store.record([Intake("distribution", "2", job=new_job(digest=digest_of("B")))])[0]
    back = store.record([Intake("distribution", "3", job=new_job(digest=digest_of("A")))])[0]
    assert back.status == "accepted" and back.job_id not in (a.job_id, b.job_id)
    assert store.get(b.job_id).state is JobState.SUPERSEDED


def test_expired_lease_is_reclaimed_and_stale_holder_cannot_finish(store: JobStore) -> None:
    store.record([Intake("api", job=new_job())])
    now = time.time()
    first = store.claim("dead-worker", 5, now=now)
    assert store.claim("other", 5, now=now + 1) is None  # lease still valid
    second = store.claim("other", 5, now=now + 6)
    assert second.id == first.id and second.attempts == 2 and second.lease_owner == "other"
    assert not store.succeed(first, "sha256:stale", 1)  # fenced by the lease token
    assert store.succeed(second, "sha256:good", 1)
    log = store.attempts(first.id)
    assert [a.outcome for a in log] == ["lease_expired", "succeeded"]
    assert store.get(first.id).target_digest == "sha256:good"


def test_concurrent_claims_hand_out_each_job_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    store.record([Intake("api", job=new_job(tag=f"t{i}")) for i in range(60)])
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer() -> None:
        own = JobStore(path)  # separate connections, as separate processes would have
        while (job := own.claim(threading.current_thread().name, 30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, name=f"c{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 60 and len(set(claimed)) == 60


def test_retry_api_transitions(store: JobStore) -> None:
    job_id = store.record([Intake("api", job=new_job())])[0].job_id
    with pytest.raises(InvalidTransition, match="queued"):
        store.retry(job_id)
    with pytest.raises(JobNotFound):
        store.retry("nope")
    job = store.claim("w", 30)
    assert store.bury(job, "permanent error: bad image")
    dead = store.get(job_id)
    assert dead.state is JobState.DEAD and dead.last_error == "permanent error: bad image"
    again = store.retry(job_id)
    assert again.state is JobState.QUEUED and again.attempts == 0
    assert store.stats().counters[("manual_retries", "")] == 1


def test_release_hands_job_back_without_counting_the_attempt(store: JobStore) -> None:
    store.record([Intake("api", job=new_job())])
    job = store.claim("w", 30)
    assert store.release(job)
    again = store.get(job.id)
    assert again.state is JobState.QUEUED and again.attempts == 0 and again.lease_owner is None


def test_retry_policy_uses_backoff_classification_and_budget() -> None:
    policy = RetryPolicy(
        RetrySettings(
            max_attempts=4, max_total_seconds=100, initial_backoff_seconds=2, max_backoff_seconds=10, jitter_seconds=0
        )
    )
    now = 1000.0
    delays = [policy.decide(TransientError("503"), n, now, now).delay for n in (1, 2, 3)]
    assert delays == [2.0, 4.0, 8.0]
    assert not policy.decide(TransientError("503"), 4, now, now).retry  # max attempts
    assert not policy.decide(TransientError("503"), 1, now - 101, now).retry  # max total time
    permanent = policy.decide(PermanentError("unsupported"), 1, now, now)
    assert not permanent.retry and permanent.reason == "permanent error"
    assert policy.decide(ConnectionResetError("reset"), 1, now, now).retry
    assert not policy.decide(ValueError("bug"), 1, now, now).retry


def _worker(store: JobStore, convert, retry: RetrySettings = FAST_RETRY, lease: float = 30) -> Worker:
    return Worker(store, convert, RetryPolicy(retry), WorkerSettings(lease_seconds=lease, poll_interval_seconds=0.01))


def test_worker_retries_transient_failures_then_succeeds(store: JobStore, monkeypatch) -> None:
    monkeypatch.setenv("OBD_TEST_FAILURES", "2")
    job_id = store.record([Intake("api", job=new_job())])[0].job_id
    worker = _worker(store, flaky_convert)
    for _ in range(3):
        assert worker.run_once() is not None
    job = store.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 3 and job.bytes_written == 10
    assert [a.outcome for a in store.attempts(job_id)] == ["retry", "retry", "succeeded"]
    assert "attempt 2" in store.attempts(job_id)[1].error
    assert store.stats().counters[("retries", "")] == 2


def test_worker_gives_up_after_max_attempts(store: JobStore, monkeypatch) -> None:
    monkeypatch.setenv("OBD_TEST_FAILURES", "99")
    job_id = store.record([Intake("api", job=new_job())])[0].job_id
    worker = _worker(store, flaky_convert)
    while worker.run_once() is not None:
        pass
    job = store.get(job_id)
    assert job.state is JobState.DEAD and job.attempts == 3
    assert job.last_error.startswith("gave up after 3 attempt(s): TransientError: registry answered 503")


def test_worker_permanent_failure_is_dead_at_once_and_retryable(store: JobStore) -> None:
    job_id = store.record([Intake("api", job=new_job())])[0].job_id
    _worker(store, permanent_convert).run_once()
    job = store.get(job_id)
    assert job.state is JobState.DEAD and job.attempts == 1
    assert "PermanentError: unsupported image 127.0.0.1:5101/demo/app@sha256:" in job.last_error
    store.retry(job_id)

    def ok(request: ConversionRequest) -> ConversionResult:
        assert request.source_ref == f"127.0.0.1:5101/demo/app@{digest_of('v1')}"
        assert request.target_ref == "127.0.0.1:5101/demo/app:v1_obd" and request.options == {"oci": True}
        return ConversionResult(request.target_ref, "sha256:" + "b" * 64, 42)

    _worker(store, ok).run_once()
    assert store.get(job_id).state is JobState.SUCCEEDED


def test_lease_is_renewed_during_a_long_conversion(store: JobStore) -> None:
    job_id = store.record([Intake("api", job=new_job())])[0].job_id
    seen_expiry: list[float] = []

    def slow(request: ConversionRequest) -> ConversionResult:
        for _ in range(4):
            time.sleep(1.0)
            seen_expiry.append(store.get(request.job_id).lease_expires_at)
        return ConversionResult(request.target_ref)

    _worker(store, slow, lease=2.0).run_once()
    assert store.get(job_id).state is JobState.SUCCEEDED
    assert seen_expiry[-1] > seen_expiry[0]  # renewed while running (2 s lease, 4 s conversion)


def test_job_exceeding_attempts_through_lost_leases_goes_dead(store: JobStore) -> None:
    job_id = store.record([Intake("api", job=new_job())])[0].job_id
    for i in range(3):  # three workers die holding the job; each short lease expires
        assert store.claim(f"w{i}", 0.05) is not None
        time.sleep(0.06)
    assert _worker(store, permanent_convert, lease=1).run_once() is not None
    job = store.get(job_id)
    assert job.state is JobState.DEAD and "worker lost its lease" in job.last_error


def test_pool_graceful_stop_requeues_conversion_past_grace(store: JobStore) -> None:
    store.record([Intake("api", job=new_job(tag="slow")), Intake("api", job=new_job(tag="fast"))])
    aborted = threading.Event()

    def convert(request: ConversionRequest) -> ConversionResult:
        if request.tag == "slow" and request.cancel.wait(30):  # like the pipeline's cancel option
            aborted.set()
            raise TransientError("conversion aborted")
        return ConversionResult(request.target_ref)

    pool = WorkerPool(
        store,
        convert,
        RetryPolicy(FAST_RETRY),
        WorkerSettings(lease_seconds=30, poll_interval_seconds=0.01),
        concurrency=2,
    )
    pool.start()
    time.sleep(0.5)
    released = pool.stop(grace_seconds=0.5)
    assert aborted.wait(5), "the running conversion was told to stop"
    time.sleep(0.2)  # its failure report arrives after the hand-back and must not count
    states = Counter(j.state for j in store.list_jobs())
    assert len(released) == 1 and states[JobState.QUEUED] == 1 and states[JobState.SUCCEEDED] == 1
    assert store.get(released[0]).tag == "slow" and store.get(released[0]).attempts == 0


def test_finished_jobs_are_pruned_after_the_retention_period(store: JobStore) -> None:
    day = 86400.0
    now = time.time()
    old_ok = store.record([Intake("distribution", "e-old", job=new_job("old", digest_of("old")))])[0].job_id
    old_dead = store.record([Intake("api", job=new_job("dead", digest_of("dead")))])[0].job_id
    recent = store.record([Intake("api", job=new_job("recent", digest_of("recent")))])[0].job_id
    pending = store.record([Intake("api", job=new_job("pending", digest_of("pending")))])[0].job_id
    jobs = {}
    for _ in range(3):
        job = store.claim("w", 30)
        jobs[job.id] = job
    assert store.succeed(jobs[old_ok], "sha256:" + "1" * 64, 10, now=now - 40 * day)
    assert store.bury(jobs[old_dead], "bad image", now=now - 40 * day)
    assert store.succeed(jobs[recent], "sha256:" + "2" * 64, 10, now=now - 1 * day)
    assert store.prune_jobs(now - 30 * day) == 2
    for job_id in (old_ok, old_dead):
        with pytest.raises(JobNotFound):
            store.get(job_id)
        assert store.attempts(job_id) == []
    assert store.get(recent).state is JobState.SUCCEEDED
    assert store.get(pending).state is JobState.QUEUED  # never finished: never pruned
    # The pruned job's delivery id is forgotten with it, so a very late redelivery is a new job.
    assert store.record([Intake("distribution", "e-old", job=new_job("old", digest_of("old")))])[0].status == "accepted"


def test_worker_prunes_finished_jobs_when_it_starts(store: JobStore) -> None:
    job_id = store.record([Intake("api", job=new_job())])[0].job_id
    job = store.claim("w", 30)
    store.succeed(job, None, 0, now=time.time() - 90 * 86400)
    worker = Worker(
        store, flaky_convert, RetryPolicy(FAST_RETRY), WorkerSettings(poll_interval_seconds=0.01, job_retention_days=30)
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            store.get(job_id)
        except JobNotFound:
            break
        time.sleep(0.02)
    stop.set()
    thread.join(5)
    with pytest.raises(JobNotFound):
        store.get(job_id)


def _open_files_under(directory: Path) -> list[str]:
    paths = (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
             if os.path.exists(f"/proc/self/fd/{fd}"))
    return [p for p in paths if p.startswith(str(directory))]


class _SlowCloseInOtherThreads(sqlite3.Connection):
    """A connection whose close() takes a while off the main thread: the checkpointer's, here."""

    def close(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        super().close()


def test_close_returns_after_the_checkpointer_closed_its_connection(tmp_path: Path, monkeypatch) -> None:
    # A caller may delete the data directory right after close(): nothing of the store may still be open.
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: connect(*a, factory=_SlowCloseInOtherThreads, **kw))
    store = JobStore(tmp_path / "db" / "jobs.db")
    store.record([Intake(source="test", job=new_job())])
    store.close()
    assert _open_files_under(tmp_path / "db") == []
