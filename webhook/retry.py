"""Retry policy for conversions, built from tenacity's strategies.

Workers never sleep between attempts: a failed job goes back to the store with a `next_attempt_at`,
so backoff survives restarts and frees the worker. tenacity supplies the pieces (which errors are
retryable, exponential backoff with jitter, stop after N attempts or T seconds); this module evaluates
them for one failure from the job's persisted attempt count and first-attempt time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests
import tenacity

from converter.errors import PermanentError, TransientError
from webhook.config import RetrySettings

TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class LeaseLost(TransientError):
    """The worker's lease expired while it converted; another worker may have taken the job."""


def is_transient(error: BaseException) -> bool:
    """True for failures worth retrying. Unknown exceptions count as transient: the attempt budget
    bounds them, and a dead job with the message is worse than a late success. Errors that come from the
    data itself (a value, type, missing key or attribute: bad image data that slipped past the converter's
    shape checks) fail the same way on every attempt, so they are permanent."""
    if isinstance(error, PermanentError):
        return False
    if isinstance(error, TransientError):
        return True
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code in TRANSIENT_HTTP_STATUSES
    return not isinstance(error, ValueError | TypeError | LookupError | AttributeError)


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay: float
    reason: str


class RetryPolicy:
    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings
        self._retry = tenacity.retry_if_exception(is_transient)
        self._stop = (tenacity.stop_after_attempt(settings.max_attempts)
                      | tenacity.stop_after_delay(settings.max_total_seconds))
        # Exponential from initial_backoff_seconds, capped, plus up to jitter_seconds of random delay
        # so jobs that failed together (a registry outage) do not all come back at the same moment.
        self._wait = (tenacity.wait_exponential(multiplier=settings.initial_backoff_seconds,
                                                max=settings.max_backoff_seconds)
                      + tenacity.wait_random(0, settings.jitter_seconds))

    def _state(self, error: BaseException, attempts: int, first_attempt_at: float, now: float
               ) -> tenacity.RetryCallState:
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempts
        # tenacity measures elapsed time on the monotonic clock; rebuild it from persisted wall time.
        mono = time.monotonic()
        state.start_time = mono - max(0.0, now - first_attempt_at)
        state.outcome_timestamp = mono
        state.outcome = tenacity.Future.construct(attempts, error, True)
        return state

    def decide(self, error: BaseException, attempts: int, first_attempt_at: float,
               now: float | None = None) -> RetryDecision:
        now = time.time() if now is None else now
        state = self._state(error, attempts, first_attempt_at, now)
        if not self._retry(state):
            return RetryDecision(False, 0.0, "permanent error")
        if self._stop(state):
            return RetryDecision(False, 0.0, f"gave up after {attempts} attempt(s)")
        return RetryDecision(True, float(self._wait(state)), "transient error")

    def exhausted(self, attempts: int, first_attempt_at: float | None, now: float | None = None) -> bool:
        """Whether a job claimed for its `attempts`-th time is already over budget (lease losses)."""
        now = time.time() if now is None else now
        if attempts > self.settings.max_attempts:
            return True
        return first_attempt_at is not None and now - first_attempt_at > self.settings.max_total_seconds
