"""Durable job store on SQLite (WAL): intake with dedup and superseding, leases, retries, dead jobs.

Every state change is one short `BEGIN IMMEDIATE` transaction, so several processes (gunicorn
workers, conversion workers) can share the file. The HTTP front end commits an envelope's jobs
before it answers; with WAL and `synchronous=NORMAL` a committed transaction survives the process
being killed (only an OS crash or power loss can drop the last transactions; use FULL for that).

Job states: queued -> running -> succeeded | failed (waiting for a retry) | dead; queued or failed jobs
become superseded when a newer digest is pushed to the same tag. Workers hold a lease on a running
job; a job whose lease expired (worker killed) is claimable again.
"""

from __future__ import annotations

import _thread
import fcntl
import importlib
import json
import logging
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from webhook.limits import clip


def _native(module: str, name: str) -> Any:
    """`module.name` as it was before gevent monkey-patching, if this process is patched (gunicorn's
    gevent worker). The checkpointer must be a real OS thread: on a greenlet, its page copies and fsync
    would stall every request of the process."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    SUPERSEDED = "superseded"


log = logging.getLogger("webhook.store")
CHECKPOINT_INTERVAL_S = 1.0
PENDING_STATES = (JobState.QUEUED.value, JobState.FAILED.value)
# Columns added after the first release, with their definitions, for stores created before them.
ADDED_COLUMNS = {"origin": "TEXT NOT NULL DEFAULT 'push'", "priority": "INTEGER NOT NULL DEFAULT 0",
                 "action": "TEXT NOT NULL DEFAULT 'convert'", "turbo_digest": "TEXT"}
# Lower runs first: live pushes and manual requests are always claimed before backfill jobs.
ORIGIN_PRIORITY = {"push": 0, "manual": 0, "backfill": 10}
ACTIONS = ("convert", "delete")
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,  -- rowid order = arrival order (finished jobs are pruned after retention)
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    source TEXT NOT NULL,
    event_id TEXT,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT,
    target_tag TEXT NOT NULL,
    image_key TEXT NOT NULL,
    rule TEXT NOT NULL,
    options TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires_at REAL,
    last_error TEXT,
    target_digest TEXT,
    bytes_written INTEGER,
    superseded_by TEXT,
    origin TEXT NOT NULL DEFAULT 'push',
    priority INTEGER NOT NULL DEFAULT 0,
    action TEXT NOT NULL DEFAULT 'convert',
    turbo_digest TEXT
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_image ON jobs(image_key, seq);
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    received_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    outcome TEXT,
    error TEXT,
    PRIMARY KEY (job_id, attempt, started_at)
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,
    label TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (name, label)
);
"""


class JobNotFound(LookupError):
    pass


class InvalidTransition(ValueError):
    pass


@dataclass(frozen=True)
class NewJob:
    """What the intake knows about a conversion to queue."""

    registry: str
    repository: str
    tag: str
    digest: str
    target_tag: str
    rule: str
    options: Mapping[str, Any] = field(default_factory=dict)
    media_type: str | None = None
    origin: str = "push"  # push (registry event) | manual (API/CLI request) | backfill
    action: str = "convert"  # convert | delete (mirror a source tag's deletion onto its outputs)

    @property
    def image_key(self) -> str:
        return f"{self.registry}/{self.repository}:{self.target_tag}"

    @property
    def priority(self) -> int:
        return ORIGIN_PRIORITY.get(self.origin, 0)


@dataclass(frozen=True)
class Intake:
    """One received event: ignored (`reason`) or to be queued (`job`)."""

    source: str
    event_id: str | None = None
    reason: str | None = None
    job: NewJob | None = None


@dataclass(frozen=True)
class IntakeOutcome:
    status: str  # accepted | duplicate_event | duplicate_image | ignored
    job_id: str | None = None
    reason: str | None = None
    superseded: tuple[str, ...] = ()


@dataclass
class _Delivery:
    """One `record` call waiting for (or done by) a group commit."""

    items: list[Intake]
    now: float
    outcomes: list[IntakeOutcome] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None


class ImageRefs:
    """References of a job's source (pinned to the pushed digest) and target, from its fields."""

    registry: str
    repository: str
    digest: str
    target_tag: str

    @property
    def source_ref(self) -> str:
        # Pinned to the pushed digest: if the tag moved meanwhile, a newer job exists and supersedes
        # or follows this one, and `<tag>_obd` still ends up matching the newest push.
        return f"{self.registry}/{self.repository}@{self.digest}"

    @property
    def target_ref(self) -> str:
        return f"{self.registry}/{self.repository}:{self.target_tag}"


@dataclass(frozen=True)
class Job(ImageRefs):
    id: str
    state: JobState
    source: str
    event_id: str | None
    registry: str
    repository: str
    tag: str
    digest: str
    media_type: str | None
    target_tag: str
    rule: str
    options: Mapping[str, Any]
    attempts: int
    created_at: float
    updated_at: float
    first_attempt_at: float | None
    next_attempt_at: float
    started_at: float | None
    finished_at: float | None
    lease_owner: str | None
    lease_token: str | None = field(repr=False)
    lease_expires_at: float | None
    last_error: str | None
    target_digest: str | None
    bytes_written: int | None
    superseded_by: str | None
    origin: str = "push"
    action: str = "convert"
    priority: int = 0
    turbo_digest: str | None = None  # the TurboOCI image of a job that publishes both outputs

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state.value, "source": self.source, "event_id": self.event_id,
            "registry": self.registry, "repository": self.repository, "tag": self.tag,
            "digest": self.digest, "media_type": self.media_type, "target_tag": self.target_tag,
            "source_ref": self.source_ref, "target_ref": self.target_ref, "rule": self.rule,
            "options": dict(self.options), "attempts": self.attempts, "created_at": self.created_at,
            "updated_at": self.updated_at, "first_attempt_at": self.first_attempt_at,
            "next_attempt_at": self.next_attempt_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "lease_owner": self.lease_owner,
            "lease_expires_at": self.lease_expires_at, "last_error": self.last_error,
            "result": {"target_digest": self.target_digest, "bytes_written": self.bytes_written,
                       **({"turbo_digest": self.turbo_digest} if self.turbo_digest else {})},
            "superseded_by": self.superseded_by, "origin": self.origin, "action": self.action,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class Attempt:
    attempt: int
    worker: str
    started_at: float
    finished_at: float | None
    outcome: str | None
    error: str | None


@dataclass(frozen=True)
class StoreStats:
    """Everything /metrics reports, read in one go."""

    counters: Mapping[tuple[str, str], int]
    jobs_by_state: Mapping[str, int]
    queue_depth: int
    duration_buckets: Sequence[tuple[float, int]]  # (upper bound, cumulative count)
    duration_count: int
    duration_sum: float


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], state=JobState(row["state"]), source=row["source"], event_id=row["event_id"],
        registry=row["registry"], repository=row["repository"], tag=row["tag"], digest=row["digest"],
        media_type=row["media_type"], target_tag=row["target_tag"], rule=row["rule"],
        options=json.loads(row["options"]), attempts=row["attempts"], created_at=row["created_at"],
        updated_at=row["updated_at"], first_attempt_at=row["first_attempt_at"],
        next_attempt_at=row["next_attempt_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], lease_owner=row["lease_owner"], lease_token=row["lease_token"],
        lease_expires_at=row["lease_expires_at"],
        # Clipped on the way out too: rows written before errors were bounded may hold megabytes.
        last_error=clip(row["last_error"]) if row["last_error"] is not None else None,
        target_digest=row["target_digest"], bytes_written=row["bytes_written"],
        superseded_by=row["superseded_by"], origin=row["origin"], action=row["action"], priority=row["priority"],
        turbo_digest=row["turbo_digest"],
    )


class JobStore:
    """SQLite job store. Thread-safe (one connection per thread); safe across processes (WAL)."""

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        # Writers take turns before asking SQLite for its write lock: threads of this process through
        # a mutex, processes through flock() on a side file. SQLite's own busy handler polls with
        # sleeps of 1, 2, 5, 10... ms, which would dominate intake latency under load; a blocked
        # flock() wakes as soon as the holder commits.
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Delivery] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        # Every statement is idempotent (IF NOT EXISTS), so concurrent starters cannot conflict.
        conn.executescript(SCHEMA)
        self._add_columns(conn)
        # Released by close(); a lock rather than an Event so that it also works from an OS thread
        # inside a gevent-patched process (see _native).
        self._stop_lock: _thread.LockType = _native("_thread", "allocate_lock")()
        self._stop_lock.acquire()
        self._checkpointer_done: _thread.LockType = _native("_thread", "allocate_lock")()  # released on exit
        self._checkpointer_done.acquire()
        _native("_thread", "start_new_thread")(self._checkpoint_loop, ())

    # -- plumbing ---------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            # Checkpoints (copying the WAL into the database, with an fsync) run in a background
            # thread, not inside whichever commit crosses the threshold: that commit would hold the
            # write lock for the length of an fsync and every waiting request would inherit it.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._local.conn = conn
        return conn

    @staticmethod
    def _add_columns(conn: sqlite3.Connection) -> None:
        """Bring a store created by an older version up to the current columns."""
        present = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
        for name, definition in ADDED_COLUMNS.items():
            if name not in present:
                try:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        try:
            while not self._stop_lock.acquire(timeout=CHECKPOINT_INTERVAL_S):
                try:
                    # PASSIVE never blocks writers; pages still needed by readers are copied next time.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    log.exception("WAL checkpoint failed; will retry")
        finally:
            conn.close()
            self._checkpointer_done.release()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock, self._locked_tx() as conn:
            yield conn

    @contextmanager
    def _locked_tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; the caller holds `_write_lock`."""
        conn = self._conn()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release the store (this thread's connection, the checkpointer, the lock file); do not use it
        afterwards."""
        self._stop_lock.release()
        # Wait for the checkpointer to finish a checkpoint it is in and close its connection, so a caller
        # may remove the data directory right after close() (bounded: a checkpoint never waits on writers).
        self._checkpointer_done.acquire(timeout=max(5.0, self._busy_timeout_s))
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        os.close(self._lock_fd)

    def ping(self) -> None:
        self._conn().execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, label: str, by: int = 1) -> None:
        conn.execute(
            "INSERT INTO counters(name, label, value) VALUES (?, ?, ?) "
            "ON CONFLICT(name, label) DO UPDATE SET value = value + excluded.value",
            (name, label, by),
        )

    # -- intake -----------------------------------------------------------------------------------

    def record(self, items: Sequence[Intake], now: float | None = None) -> list[IntakeOutcome]:
        """Store one delivery (all its events) atomically; returns one outcome per item.

        Group commit: deliveries that arrive while another thread is writing queue up, and the next
        thread to get the write lock commits all of them in one transaction. A commit (WAL append,
        periodic checkpoint) costs far more than the statements, so this is what makes intake scale.
        """
        delivery = _Delivery(list(items), time.time() if now is None else now)
        with self._queue_lock:
            self._queue.append(delivery)
        with self._write_lock:
            if not delivery.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    with self._locked_tx() as conn:
                        self._record_batch(conn, batch)
                except BaseException as exc:
                    for other in batch:
                        other.error = exc
                    raise
                finally:
                    for other in batch:
                        other.done = True
        if delivery.error is not None:
            raise delivery.error
        return delivery.outcomes

    def _record_batch(self, conn: sqlite3.Connection, batch: list[_Delivery]) -> None:
        """Record each delivery of a group commit under its own savepoint: a delivery that fails (a
        value SQLite refuses, a bug) is rolled back alone and answered with its error, while the
        others of the batch commit as if it had never been there."""
        counts: Counter[tuple[str, str]] = Counter()
        for delivery in batch:
            conn.execute("SAVEPOINT delivery")
            try:
                outcomes = [self._record_one(conn, item, delivery.now) for item in delivery.items]
            except Exception as exc:
                conn.execute("ROLLBACK TO delivery")
                conn.execute("RELEASE delivery")
                delivery.error = exc
                continue
            conn.execute("RELEASE delivery")
            delivery.outcomes = outcomes
            for item, outcome in zip(delivery.items, outcomes, strict=True):
                counts["events_received", item.source] += 1
                if outcome.status == "accepted":
                    counts["events_accepted", item.source] += 1
                else:
                    counts["events_ignored", outcome.reason or "unknown"] += 1
        for (name, label), by in counts.items():
            self._bump(conn, name, label, by)

    def _record_one(self, conn: sqlite3.Connection, item: Intake, now: float) -> IntakeOutcome:
        if item.job is None:
            return IntakeOutcome("ignored", reason=item.reason or "unknown")
        if item.event_id is not None:
            seen = conn.execute("SELECT job_id FROM events WHERE event_id = ?", (item.event_id,)).fetchone()
            if seen is not None:
                return IntakeOutcome("duplicate_event", job_id=seen["job_id"], reason="duplicate_event")
        job = item.job
        latest = conn.execute(
            "SELECT id, digest, state, action, priority FROM jobs WHERE image_key = ? AND state != 'superseded' "
            "ORDER BY seq DESC LIMIT 1", (job.image_key,),
        ).fetchone()
        if (latest is not None and latest["digest"] == job.digest and latest["action"] == job.action
                and latest["state"] != JobState.DEAD.value):
            # Same digest already queued, running or converted for this tag: one job is enough. A dead
            # job does not count, so re-pushing is a way to try again.
            if latest["state"] == JobState.QUEUED.value and job.priority < latest["priority"]:
                # A live push of what a backfill job waits for: the job takes the push's place in line.
                conn.execute("UPDATE jobs SET priority = ?, origin = ?, updated_at = ? WHERE id = ?",
                             (job.priority, job.origin, now, latest["id"]))
            if item.event_id is not None:
                conn.execute("INSERT INTO events(event_id, job_id, received_at) VALUES (?, ?, ?)",
                             (item.event_id, latest["id"], now))
            return IntakeOutcome("duplicate_image", job_id=latest["id"], reason="duplicate_image")
        job_id = str(uuid.uuid4())
        superseded = [] if latest is None else [r["id"] for r in conn.execute(
            "SELECT id FROM jobs WHERE image_key = ? AND state IN (?, ?)", (job.image_key, *PENDING_STATES),
        )]
        if superseded:
            conn.executemany(
                "UPDATE jobs SET state = 'superseded', superseded_by = ?, updated_at = ?, finished_at = ? "
                "WHERE id = ?", [(job_id, now, now, old) for old in superseded],
            )
        conn.execute(
            "INSERT INTO jobs(id, state, source, event_id, registry, repository, tag, digest, media_type, "
            "target_tag, image_key, rule, options, created_at, updated_at, next_attempt_at, origin, priority, "
            "action) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, item.source, item.event_id, job.registry, job.repository, job.tag, job.digest,
             job.media_type, job.target_tag, job.image_key, job.rule,
             json.dumps(dict(job.options), sort_keys=True), now, now, now, job.origin, job.priority, job.action),
        )
        if item.event_id is not None:
            conn.execute("INSERT INTO events(event_id, job_id, received_at) VALUES (?, ?, ?)",
                         (item.event_id, job_id, now))
        return IntakeOutcome("accepted", job_id=job_id, superseded=tuple(superseded))

    # -- reading ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _row_to_job(row)

    def list_jobs(self, state: JobState | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        if state is None:
            rows = self._conn().execute(
                "SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset))
        else:
            rows = self._conn().execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ? OFFSET ?",
                (state.value, limit, offset))
        return [_row_to_job(r) for r in rows]

    def attempts(self, job_id: str) -> list[Attempt]:
        rows = self._conn().execute(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY started_at", (job_id,))
        return [Attempt(r["attempt"], r["worker"], r["started_at"], r["finished_at"], r["outcome"],
                        clip(r["error"]) if r["error"] is not None else None) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        for row in self._conn().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    def stats(self) -> StoreStats:
        conn = self._conn()
        counters = {(r["name"], r["label"]): r["value"] for r in conn.execute("SELECT * FROM counters")}
        by_state = self.counts_by_state()
        durations = conn.execute(
            "SELECT " + ", ".join(f"SUM(finished_at - started_at <= {b})" for b in DURATION_BUCKETS)
            + ", COUNT(*) AS n, COALESCE(SUM(finished_at - started_at), 0) AS total "
            "FROM attempts WHERE finished_at IS NOT NULL AND outcome != 'released'"
        ).fetchone()
        buckets = [(b, int(durations[i] or 0)) for i, b in enumerate(DURATION_BUCKETS)]
        return StoreStats(
            counters=counters, jobs_by_state=by_state,
            queue_depth=by_state[JobState.QUEUED.value] + by_state[JobState.FAILED.value],
            duration_buckets=buckets, duration_count=int(durations["n"]),
            duration_sum=float(durations["total"]),
        )

    # -- workers ----------------------------------------------------------------------------------

    def claim(self, worker: str, lease_seconds: float, now: float | None = None) -> Job | None:
        """Take the next due job (or one whose lease expired) and lease it to `worker`.

        A job is skipped while another job for the same target tag is running, so one image is
        converted by one worker at a time. Lower `priority` first: live pushes before backfill jobs.
        """
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute(
                "SELECT * FROM jobs AS j WHERE "
                "((j.state IN ('queued', 'failed') AND j.next_attempt_at <= :now) "
                " OR (j.state = 'running' AND j.lease_expires_at < :now)) "
                "AND NOT EXISTS (SELECT 1 FROM jobs AS r WHERE r.image_key = j.image_key "
                "  AND r.state = 'running' AND r.lease_expires_at >= :now AND r.id != j.id) "
                "ORDER BY j.priority, j.next_attempt_at, j.seq LIMIT 1",
                {"now": now},
            ).fetchone()
            if row is None:
                return None
            if row["state"] == JobState.RUNNING.value:
                # The previous holder died or stalled: close its attempt record.
                conn.execute(
                    "UPDATE attempts SET finished_at = ?, outcome = 'lease_expired', "
                    "error = 'worker lost its lease (killed or stalled)' "
                    "WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
                    (now, row["id"], row["attempts"]),
                )
            token = uuid.uuid4().hex
            conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, "
                "lease_token = ?, lease_expires_at = ?, started_at = ?, updated_at = ?, "
                "first_attempt_at = COALESCE(first_attempt_at, ?) WHERE id = ?",
                (worker, token, now + lease_seconds, now, now, now, row["id"]),
            )
            conn.execute(
                "INSERT INTO attempts(job_id, attempt, worker, started_at) VALUES (?, ?, ?, ?)",
                (row["id"], row["attempts"] + 1, worker, now),
            )
            claimed = conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return _row_to_job(claimed)

    def _finish(self, job: Job, now: float, outcome: str, error: str | None, sets: str,
                params: tuple[Any, ...]) -> bool:
        """Apply `sets` to a running job if `job` still holds its lease; record the attempt's end."""
        with self._tx() as conn:
            cursor = conn.execute(
                f"UPDATE jobs SET {sets}, updated_at = ?, lease_owner = NULL, lease_token = NULL, "
                "lease_expires_at = NULL WHERE id = ? AND state = 'running' AND lease_token = ?",
                (*params, now, job.id, job.lease_token),
            )
            if cursor.rowcount != 1:
                return False
            conn.execute(
                "UPDATE attempts SET finished_at = ?, outcome = ?, error = ? "
                "WHERE job_id = ? AND attempt = ? AND finished_at IS NULL",
                (now, outcome, error, job.id, job.attempts),
            )
            if outcome == "retry":
                self._bump(conn, "retries", "")
            return True

    def renew_lease(self, job: Job, lease_seconds: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_expires_at = ?, updated_at = ? "
                "WHERE id = ? AND state = 'running' AND lease_token = ?",
                (now + lease_seconds, now, job.id, job.lease_token),
            )
            return cursor.rowcount == 1

    def succeed(self, job: Job, target_digest: str | None, bytes_written: int,
                now: float | None = None, *, turbo_digest: str | None = None) -> bool:
        now = time.time() if now is None else now
        ok = self._finish(job, now, "succeeded", None,
                          "state = 'succeeded', finished_at = ?, target_digest = ?, bytes_written = ?, "
                          "turbo_digest = ?, last_error = NULL", (now, target_digest, bytes_written, turbo_digest))
        if ok and bytes_written:
            with self._tx() as conn:
                self._bump(conn, "conversion_bytes", "", bytes_written)
        return ok

    def fail(self, job: Job, error: str, next_attempt_at: float, now: float | None = None) -> bool:
        """A transient failure: wait until `next_attempt_at`, then any worker may claim it again."""
        now = time.time() if now is None else now
        error = clip(error)
        return self._finish(job, now, "retry", error,
                            "state = 'failed', next_attempt_at = ?, last_error = ?", (next_attempt_at, error))

    def bury(self, job: Job, error: str, now: float | None = None) -> bool:
        """Give up: the job is dead until someone retries it through the API."""
        now = time.time() if now is None else now
        error = clip(error)
        return self._finish(job, now, "dead", error,
                            "state = 'dead', finished_at = ?, last_error = ?", (now, error))

    def release(self, job: Job, now: float | None = None) -> bool:
        """Hand a running job back untouched (graceful shutdown); the attempt does not count."""
        now = time.time() if now is None else now
        return self._finish(job, now, "released", "worker shut down",
                            "state = 'queued', attempts = attempts - 1, next_attempt_at = ?", (now,))

    def retry(self, job_id: str, now: float | None = None) -> Job:
        """Queue a dead, failed or succeeded job again with a fresh attempt budget."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if row["state"] in (JobState.QUEUED.value, JobState.RUNNING.value, JobState.SUPERSEDED.value):
                raise InvalidTransition(f"job {job_id} is {row['state']}; only dead, failed or succeeded "
                                        "jobs can be retried")
            conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, first_attempt_at = NULL, "
                "next_attempt_at = ?, finished_at = NULL, updated_at = ? WHERE id = ?",
                (now, now, job_id),
            )
            self._bump(conn, "manual_retries", "")
        return self.get(job_id)

    # -- runs (backfills) and extra counters --------------------------------------------------------

    def add_counters(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Add to the counters /metrics reports, e.g. {("backfill_tags", "queued"): 3}."""
        if counts:
            with self._tx() as conn:
                for (name, label), by in counts.items():
                    self._bump(conn, name, label, by)

    def save_run(self, run_id: str, kind: str, data: Mapping[str, Any], now: float | None = None) -> None:
        """Create or replace the record of a run (a backfill's filters and progress)."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            conn.execute("INSERT INTO runs(id, kind, created_at, data) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(id) DO UPDATE SET data = excluded.data",
                         (run_id, kind, now, json.dumps(dict(data), sort_keys=True)))

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT data FROM runs WHERE id = ?", (run_id,)).fetchone()
        return json.loads(row["data"]) if row is not None else None

    def list_runs(self, kind: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT data FROM runs WHERE kind = ? ORDER BY created_at DESC LIMIT ?",
                                    (kind, limit))
        return [json.loads(r["data"]) for r in rows]

    def job_states(self, job_ids: Sequence[str]) -> dict[str, int]:
        """How many of `job_ids` are in each state (pruned jobs are not counted)."""
        counts = {s.value: 0 for s in JobState}
        rows = self._conn().execute(
            "SELECT state, COUNT(*) AS n FROM jobs WHERE id IN (SELECT value FROM json_each(?)) GROUP BY state",
            (json.dumps(list(job_ids)),))
        for row in rows:
            counts[row["state"]] = row["n"]
        return counts

    def prune_jobs(self, older_than: float) -> int:
        """Delete finished jobs (succeeded, dead, superseded) last changed before `older_than`, with their
        attempt log and delivery ids; queued, running and failed-awaiting-retry jobs are never touched."""
        finished = "state IN ('succeeded', 'dead', 'superseded') AND COALESCE(finished_at, updated_at) < ?"
        with self._tx() as conn:
            for table in ("attempts", "events"):
                conn.execute(f"DELETE FROM {table} WHERE job_id IN (SELECT id FROM jobs WHERE {finished})",
                             (older_than,))
            conn.execute("DELETE FROM runs WHERE created_at < ?", (older_than,))
            return conn.execute(f"DELETE FROM jobs WHERE {finished}", (older_than,)).rowcount

    def prune_events(self, older_than: float) -> int:
        """Forget delivery ids older than `older_than` (epoch seconds); registries stop resending
        long before that."""
        with self._tx() as conn:
            return conn.execute("DELETE FROM events WHERE received_at < ?", (older_than,)).rowcount
