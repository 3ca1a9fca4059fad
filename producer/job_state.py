"""A job as a client sees it: its :class:`JobState` (from rq's status) and its outcome (from rq's result stream).

:class:`ResultWatch` turns rq's result entries and statuses into an outcome
without I/O; :func:`wait_result` is the plan (:mod:`producer.redis_io`) that
``result()`` runs, sync or asyncio. How rq encodes a result entry is read in
:mod:`common.rq_internals`; what an entry means for a client is decided here.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from pydantic import ValidationError
from rq.results import Result

from common import keys
from common.errors import InvalidRequestError, JobCancelled, JobFailed, JobNotFound, ResultTimeout, TpqError
from common.results import JobResult
from common.rq_internals import RESULT_DECODE_ERRORS, read_result_entry
from common.schemas import describe_validation_error
from common.text import as_text
from producer.redis_io import Call, Pipelined, Plan

IDLE_S = 1.0
"""Seconds without news after which a reader re-reads the log and the rq status (and a waiter the status)."""

Outcome = JobResult | TpqError
"""What a job of a batch came to: its :class:`JobResult`, or the error that says why there is none."""


class JobState(str, Enum):
    """A job's state, mapped from rq's status (:func:`job_state`)."""

    QUEUED = "queued"        # rq: queued (also created, deferred, scheduled)
    RUNNING = "running"      # rq: started
    FINISHED = "finished"    # rq: finished (a cancelled or past-deadline *running* job also finishes)
    FAILED = "failed"        # rq: failed, stopped
    CANCELLED = "cancelled"  # rq: canceled (cancelled while still queued)
    UNKNOWN = "unknown"      # no job hash: never submitted, or expired

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        """True when the job will not run again by itself."""
        return self in (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED, JobState.UNKNOWN)


_RQ_STATES = {
    "created": JobState.QUEUED,
    "queued": JobState.QUEUED,
    "deferred": JobState.QUEUED,
    "scheduled": JobState.QUEUED,
    "started": JobState.RUNNING,
    "finished": JobState.FINISHED,
    "failed": JobState.FAILED,
    "stopped": JobState.FAILED,
    "canceled": JobState.CANCELLED,
}


def job_state(rq_status: bytes | str | None) -> JobState:
    """The :class:`JobState` of an rq status as stored in the job hash (``None``: no job)."""
    if rq_status is None:
        return JobState.UNKNOWN
    return _RQ_STATES.get(as_text(rq_status), JobState.UNKNOWN)


def read_states(conn: Any, job_ids: list[str]) -> Plan[list[JobState]]:
    """The :class:`JobState` of each job, read in one round trip."""
    def queue(pipe: Any) -> None:
        for job_id in job_ids:
            pipe.hget(keys.rq_job_key(job_id), "status")
    raws = yield Pipelined(conn, queue)
    return [job_state(raw) for raw in raws]


def count_states(states: Iterable[JobState]) -> dict[JobState, int]:
    """How many of ``states`` are each :class:`JobState` (every state listed, zeros included)."""
    counts = dict.fromkeys(JobState, 0)
    for state in states:
        counts[state] += 1
    return counts


# ------------------------------------------------------------------ results


def job_failed(job_id: str, error: str | None) -> JobFailed:
    """A :class:`JobFailed` for ``job_id`` whose message is the last line of the worker's ``error``."""
    error = (error or "").strip()
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    summary = lines[-1] if lines else "the worker recorded no error message"
    if len(summary) > 500:
        summary = summary[:497] + "..."
    return JobFailed(f"job {job_id!r} failed: {summary}", job_id=job_id, error=error)


def decode_result_entry(job_id: str, entry_id: bytes | str, fields: dict[Any, Any]) -> JobResult | JobFailed | None:
    """One entry of rq's result stream ``rq:results:<job_id>`` as an outcome.

    A successful run gives its :class:`JobResult`; a failed or stopped run a
    :class:`JobFailed` with the worker's message; a ``RETRIED`` entry (the job
    runs again) gives None. An entry that cannot be decoded (not JSON: a
    pickle?) gives a :class:`JobFailed` that says so; nothing is unpickled.
    """
    try:
        entry = read_result_entry(job_id, entry_id, fields)
    except RESULT_DECODE_ERRORS as e:
        return JobFailed(f"job {job_id!r}: its rq result entry {as_text(entry_id)} cannot be read "
                         f"({type(e).__name__}); was it written by a tpqueue worker?",
                         job_id=job_id, error=f"{type(e).__name__}: {e}")
    if entry.type == Result.Type.RETRIED:
        return None
    if entry.type != Result.Type.SUCCESSFUL:
        if entry.type == Result.Type.MAX_RETRIES_EXCEEDED and not entry.exc_string:
            return job_failed(job_id, "it failed on every attempt (its retries are used up)")
        return job_failed(job_id, entry.exc_string)
    try:
        return JobResult.model_validate(entry.return_value)
    except ValidationError as e:
        return JobFailed(
            f"job {job_id!r} finished, but its result is not a tpqueue JobResult "
            f"({describe_validation_error(e)}); was it run by a tpqueue worker?",
            job_id=job_id, error=str(e),
        )


def failure_message(job_id: str, entries: list[Any]) -> str | None:
    """The worker's message in the latest failed entry of a job's rq results (XREVRANGE order)."""
    for entry_id, fields in entries:
        try:
            outcome = decode_result_entry(job_id, entry_id, fields)
        except Exception:  # noqa: BLE001 - an unreadable entry: no message, the status still says FAILED
            return None
        if isinstance(outcome, JobFailed):
            return outcome.error
    return None


class ResultWatch:
    """Waiting for one job's outcome, without I/O: feed it rq result entries and statuses.

    ``last_id`` is the id of the last result entry read (give it to XREAD).
    """

    __slots__ = ("job_id", "last_id", "_outcome")

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.last_id: bytes | str = "0-0"
        self._outcome: JobResult | JobFailed | None = None

    def feed(self, entries: Iterable[tuple[Any, dict[Any, Any]]]) -> None:
        """Take result-stream entries in stream order; the latest terminal one is the outcome."""
        for entry_id, fields in entries:
            self.last_id = entry_id
            outcome = decode_result_entry(self.job_id, entry_id, fields)
            if outcome is not None:
                self._outcome = outcome

    def feed_xread(self, response: Any) -> None:
        """Take an XREAD reply over this job's result stream."""
        for _key, entries in xread_items(response):
            self.feed(entries)

    def verdict(self, state: JobState | None = None) -> JobResult | TpqError | None:
        """The job's outcome given its rq state now (None: not read), or None while it may still change.

        A failed run counts unless rq shows the job queued or running again
        (requeued). Without any result entry: CANCELLED gives
        :class:`JobCancelled`, UNKNOWN :class:`JobNotFound`, FAILED a
        :class:`JobFailed` without message, FINISHED a :class:`JobNotFound`
        (its result expired).
        """
        outcome, job_id = self._outcome, self.job_id
        if isinstance(outcome, JobResult):
            return outcome
        if outcome is not None and state not in (JobState.QUEUED, JobState.RUNNING):
            return outcome
        if state is JobState.CANCELLED:
            return JobCancelled(f"job {job_id!r} was cancelled before a worker started it; it has no result",
                                job_id=job_id)
        if state is JobState.FAILED:
            return job_failed(job_id, None)
        if state is JobState.UNKNOWN:
            return JobNotFound(f"no job {job_id!r} in Redis: never submitted, or it expired "
                               "(TPQ_RESULT_TTL_S / TPQ_FAILURE_TTL_S)", job_id=job_id)
        if state is JobState.FINISHED:
            return JobNotFound(f"job {job_id!r} finished but its rq result is gone (expired?)", job_id=job_id)
        return None


def xread_items(response: Any) -> list[tuple[Any, list[Any]]]:
    """``(key, entries)`` pairs of an XREAD reply, whether RESP2 (a list) or RESP3 (a dict)."""
    if not response:
        return []
    if isinstance(response, dict):
        return [(key, value[0] if value and isinstance(value[0], list) else value) for key, value in response.items()]
    return [(key, entries) for key, entries in response]


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """``timeout`` as a float of seconds > 0, or None (wait forever); :class:`InvalidRequestError` otherwise."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or timeout == float("inf"):
        raise InvalidRequestError(f"{what} must be a finite number of seconds > 0, or None to wait forever; "
                                  f"got {timeout!r}")
    return float(timeout)


def result_timeout(job_id: str, state: JobState | str, timeout: float) -> ResultTimeout:
    """The :class:`ResultTimeout` of a job that has no result after ``timeout`` seconds."""
    status = state.value if isinstance(state, JobState) else state
    return ResultTimeout(
        f"job {job_id!r} has no result after {timeout:g} s (status: {status}); "
        "wait longer, check that a worker group serves its queue, or cancel it",
        job_id=job_id, status=status, waited_s=timeout,
    )


def wait_result(conn: Any, job_id: str, timeout: float | None,
                blocking_xread: Callable[..., Any] | None = None) -> Plan[JobResult]:
    """The plan of ``result()``: wait for ``job_id``'s :class:`JobResult` (``timeout`` seconds at most).

    Reads the status, then the result stream (one round trip: a FINISHED or
    FAILED status seen has its entry in the read after it); then waits up to
    :data:`IDLE_S` in a blocking XREAD and reads both again. Raises the
    verdict's error (:class:`JobFailed`, :class:`JobCancelled`,
    :class:`JobNotFound`) or :class:`ResultTimeout`. ``blocking_xread``
    carries out the blocking XREAD (default ``conn.xread``; an asyncio client
    gives its :class:`producer.result_waiter.ResultWaiter`'s).
    """
    timeout = check_timeout(timeout)
    xread = blocking_xread if blocking_xread is not None else conn.xread
    deadline = None if timeout is None else time.monotonic() + timeout
    watch = ResultWatch(job_id)
    result_key, job_key = keys.rq_result_key(job_id), keys.rq_job_key(job_id)

    def status_then_results(pipe: Any) -> None:
        pipe.hget(job_key, "status")  # before the read: a FINISHED/FAILED seen here has its entry below
        pipe.xread({result_key: watch.last_id})

    while True:
        raw_status, response = yield Pipelined(conn, status_then_results)
        watch.feed_xread(response)
        state = job_state(raw_status)
        verdict = watch.verdict(state)
        if isinstance(verdict, JobResult):
            return verdict
        if verdict is not None:
            raise verdict
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise result_timeout(job_id, state, timeout)  # type: ignore[arg-type]
        block_ms = max(1, int((IDLE_S if left is None else min(IDLE_S, left)) * 1000))
        watch.feed_xread((yield Call(lambda: xread({result_key: watch.last_id}, block=block_ms))))
        if isinstance(verdict := watch.verdict(), JobResult):
            return verdict
