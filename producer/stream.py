"""Reading what a job produces: its token stream, its rq status and its rq result.

The token stream (format in :mod:`common.jobs`) reaches a client two ways:
pub/sub on ``keys.token_channel(job_id)`` (fast, but a message can be
duplicated, or missed while a connection is down) and the durable log
``keys.token_log(job_id)`` (the truth). :class:`TokenStream` (and its asyncio
twin :class:`AsyncTokenStream`) combines them:

1. SUBSCRIBE to the channel and wait for Redis to confirm it;
2. replay the log from the next position (XRANGE), so everything written
   before the subscription took effect is read from the log;
3. take pub/sub messages: a position already passed is dropped, a position
   beyond the next one means a gap, filled from the log (the worker XADDs a
   message before it PUBLISHes it, in one pipeline, so a published
   message's predecessors are already in the log);
4. when nothing new arrives for ``idle_s`` (1 s), re-read the log and the rq
   status (catches missed messages, FAILED jobs, vanished jobs);
5. on a dropped connection, reconnect with back-off, resubscribe and
   continue from the log at the next position.

:class:`StreamCursor` is the torch- and Redis-free core that orders and
de-duplicates messages; :class:`ResultWatch` is the Redis-free core that
turns rq's result entries and status into an outcome.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import Any

import redis
import redis.asyncio
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.results import Result
from rq.serializers import JSONSerializer

from common import keys
from common.errors import (
    InvalidRequestError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    ResultTimeout,
    StreamIncomplete,
    TpqError,
)
from common.jobs import LOG_FIELD, StreamMessage, decode_stream_message, log_entry_id
from common.redis_conn import RedisUnavailableError
from common.results import JobResult, StreamEnd, TokenEvent
from common.schemas import describe_validation_error
from common.token_log import position_of

log = logging.getLogger(__name__)

IDLE_S = 1.0
"""Seconds without a new token after which a reader re-reads the log and the rq status."""
FINISHED_GRACE_S = 5.0
"""Seconds a reader waits for the end record of a job rq already reports finished."""
RECONNECT_GIVE_UP_S = 30.0
"""Seconds of failing reconnects after which a reader raises :class:`RedisUnavailableError`."""
SUBSCRIBE_CONFIRM_S = 5.0
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
MAX_EARLY = 4096
# redis-py wraps socket errors in its own classes; builtin ConnectionError covers a reset socket.
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError)
_LOG_FIELD_B = LOG_FIELD.encode()


# ------------------------------------------------------------------ job status


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
    text = rq_status.decode() if isinstance(rq_status, bytes) else rq_status
    return _RQ_STATES.get(text, JobState.UNKNOWN)


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
    text_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    try:
        value = _successful_return_value(fields)
        if value is not _NOT_SUCCESSFUL:
            return _job_result(job_id, value)
        result = Result.restore(job_id, text_id, fields, connection=None, serializer=JSONSerializer)  # type: ignore[arg-type]
    except (ValueError, TypeError, zlib.error) as e:  # ValueError includes bad base64, JSON and UTF-8
        return JobFailed(f"job {job_id!r}: its rq result entry {text_id} cannot be read ({type(e).__name__}); "
                         "was it written by a tpqueue worker?", job_id=job_id, error=f"{type(e).__name__}: {e}")
    if result.type == Result.Type.RETRIED:
        return None
    if result.type != Result.Type.SUCCESSFUL:
        if result.type == Result.Type.MAX_RETRIES_EXCEEDED and not result.exc_string:
            return job_failed(job_id, "it failed on every attempt (its retries are used up)")
        return job_failed(job_id, result.exc_string)
    return _job_result(job_id, result.return_value)


_NOT_SUCCESSFUL = object()
_SUCCESSFUL_TYPE = str(Result.Type.SUCCESSFUL.value).encode()


def _successful_return_value(fields: dict[Any, Any]) -> Any:
    """The decoded return value of a SUCCESSFUL entry, else ``_NOT_SUCCESSFUL``.

    rq 2.12 stores it as base64 of the serializer's bytes (``Result.serialize``);
    decoding it here skips ``Result.restore``'s per-entry serializer lookup,
    which made a 5,000-job batch read about twice as slow. Other entry types
    go through ``Result.restore``. A unit test pins this against rq's writer.
    """
    if fields.get(b"type") != _SUCCESSFUL_TYPE or b"return_value" not in fields:
        return _NOT_SUCCESSFUL
    return json.loads(base64.b64decode(fields[b"return_value"]))


def _job_result(job_id: str, value: Any) -> JobResult | JobFailed:
    try:
        return JobResult.model_validate(value)
    except ValidationError as e:
        return JobFailed(
            f"job {job_id!r} finished, but its result is not a tpqueue JobResult "
            f"({describe_validation_error(e)}); was it run by a tpqueue worker?",
            job_id=job_id, error=str(e),
        )


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


def result_timeout(job_id: str, state: JobState | str, timeout: float) -> ResultTimeout:
    """The :class:`ResultTimeout` of a job that has no result after ``timeout`` seconds."""
    status = state.value if isinstance(state, JobState) else state
    return ResultTimeout(
        f"job {job_id!r} has no result after {timeout:g} s (status: {status}); "
        "wait longer, check that a worker group serves its queue, or cancel it",
        job_id=job_id, status=status, waited_s=timeout,
    )


# ------------------------------------------------------------------ ordering


class StreamCursor:
    """Orders and de-duplicates one job's stream messages, from pub/sub and the log alike.

    :meth:`offer` returns the token events that became deliverable, in index
    order, each exactly once. A message at a position already delivered is
    dropped; one beyond the next position is held back (``waiting`` is then
    True: read the log from :attr:`next_position`). The first
    :class:`StreamEnd` at the next position ends the stream (:attr:`end`).
    """

    __slots__ = ("job_id", "_next", "_early", "_end")

    def __init__(self, job_id: str, start: int = 0) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InvalidRequestError(f"start must be a token index >= 0, got {start!r}")
        self.job_id = job_id
        self._next = start
        self._early: dict[int, StreamMessage] = {}
        self._end: StreamEnd | None = None

    @property
    def next_position(self) -> int:
        """The index of the next token to deliver (the number delivered so far, from 0)."""
        return self._next

    @property
    def end(self) -> StreamEnd | None:
        """The stream's end record once reached in order, else None."""
        return self._end

    @property
    def waiting(self) -> bool:
        """True when messages beyond a gap are held: the gap must be filled from the log."""
        return bool(self._early) and self._end is None

    def offer(self, message: StreamMessage, *, from_log: bool = False) -> list[TokenEvent]:
        """Take one message; return the token events now deliverable, in order."""
        if self._end is not None or message.request_id != self.job_id:
            return []
        position = position_of(message)
        if position < self._next:
            return []
        if position > self._next:
            if (from_log or position not in self._early) and len(self._early) < MAX_EARLY:
                self._early[position] = message  # the log's copy wins over pub/sub's
            return []
        return self._advance(message)

    def offer_all(self, messages: Iterable[StreamMessage], *, from_log: bool = False) -> list[TokenEvent]:
        """Take many messages; all token events that became deliverable, in order.

        With ``from_log`` every message replaces a pub/sub copy held for the
        same position before any is delivered: where the two differ (a
        fenced worker still publishing), the log's copy is the one delivered.
        """
        if not from_log:
            return [event for message in messages for event in self.offer(message)]
        if self._end is not None:
            return []
        for message in messages:
            position = position_of(message)
            if message.request_id == self.job_id and position >= self._next:
                self._early[position] = message
        return self._advance(self._early.pop(self._next, None))

    def _advance(self, message: StreamMessage | None) -> list[TokenEvent]:
        ready: list[TokenEvent] = []
        while message is not None:
            if isinstance(message, StreamEnd):
                self._end = message
                self._early.clear()
                break
            ready.append(message)
            self._next += 1
            message = self._early.pop(self._next, None)
        return ready


def _decode_log(entries: Iterable[tuple[Any, dict[Any, Any]]]) -> list[StreamMessage]:
    return [decode_stream_message(fields[_LOG_FIELD_B] if _LOG_FIELD_B in fields else fields[LOG_FIELD])
            for _entry_id, fields in entries]


def _decode_pubsub(job_id: str, data: Any) -> StreamMessage | None:
    try:
        return decode_stream_message(data)
    except InvalidRequestError as e:
        log.warning("job %s: dropped a malformed pub/sub message (%s); the log will fill in", job_id, e)
        return None


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """``timeout`` as a float of seconds > 0, or None (wait forever); :class:`InvalidRequestError` otherwise."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or timeout == float("inf"):
        raise InvalidRequestError(f"{what} must be a finite number of seconds > 0, or None to wait forever; "
                                  f"got {timeout!r}")
    return float(timeout)


class _Backoff:
    """Exponential back-off between reconnects, and the give-up clock."""

    __slots__ = ("failures", "since")

    def __init__(self) -> None:
        self.failures = 0
        self.since: float | None = None

    def next_pause(self, now: float) -> float:
        """0 after the first failure (a single drop reconnects at once), then 0.05 s doubling to 2 s."""
        if self.since is None:
            self.since = now
        self.failures += 1
        return 0.0 if self.failures == 1 else min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (self.failures - 2))

    def failing_for(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since

    def reset(self) -> None:
        self.failures, self.since = 0, None


# ------------------------------------------------------------------ the shared decision logic


class _ReaderState:
    """Everything a reader decides without I/O: cursor, ready events, clocks and the status verdict."""

    def __init__(self, job_id: str, start: int, timeout: float | None, idle_s: float,
                 finished_grace_s: float, give_up_s: float) -> None:
        self.job_id = keys.validate_job_id(job_id)
        self.cursor = StreamCursor(job_id, start)
        self.ready: deque[TokenEvent] = deque()
        self.timeout = check_timeout(timeout)
        self.idle_s, self.finished_grace_s, self.give_up_s = idle_s, finished_grace_s, give_up_s
        self.deadline: float | None = None
        self.idle_since = time.monotonic()
        self.finished_since: float | None = None
        self.backoff = _Backoff()
        self.exhausted = False

    def take(self, messages: Iterable[StreamMessage], *, from_log: bool) -> None:
        ready = self.cursor.offer_all(messages, from_log=from_log)
        if ready:
            self.ready.extend(ready)
            self.idle_since = time.monotonic()

    def start_wait(self) -> None:
        if self.deadline is None and self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout

    def poll_s(self) -> float:
        """How long the next pub/sub read may block: until the idle re-read or the deadline."""
        now = time.monotonic()
        wait = self.idle_since + self.idle_s - now
        if self.deadline is not None:
            wait = min(wait, self.deadline - now)
        return max(wait, 0.0)

    def idle_due(self) -> bool:
        return time.monotonic() - self.idle_since >= self.idle_s

    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def timeout_error(self, state: str) -> ResultTimeout:
        return ResultTimeout(
            f"no token event from job {self.job_id!r} within {self.timeout:g} s (status: {state}, "
            f"{self.cursor.next_position} tokens so far); wait longer or check that a worker group serves it",
            job_id=self.job_id, status=state, waited_s=self.timeout or 0.0,
        )

    def judge_status(self, state: JobState, failure: str | None) -> None:
        """After an idle re-read found no end: raise if rq's status says the stream can never end."""
        self.idle_since = time.monotonic()
        if self.cursor.end is not None:
            return
        job_id, received = self.job_id, self.cursor.next_position
        if state is JobState.FAILED:
            raise job_failed(job_id, failure)
        if state is JobState.CANCELLED:
            raise JobCancelled(f"job {job_id!r} was cancelled while queued", job_id=job_id)
        if state is JobState.UNKNOWN:
            raise JobNotFound(f"no job {job_id!r} in Redis and its token log has no end: never submitted, "
                              "or expired (TPQ_RESULT_TTL_S, TPQ_TOKEN_LOG_TTL_S)", job_id=job_id)
        if state is not JobState.FINISHED:
            self.finished_since = None
            return
        now = time.monotonic()
        self.finished_since = self.finished_since or now
        if now - self.finished_since >= self.finished_grace_s:
            raise StreamIncomplete(
                f"job {job_id!r} finished but its token log holds no end record after {received} tokens "
                f"(waited {self.finished_grace_s:g} s); the log expired or was trimmed (TPQ_TOKEN_LOG_TTL_S, "
                "TPQ_TOKEN_LOG_MAXLEN): read the whole output with result()",
                job_id=job_id, received=received,
            )

    def finish(self) -> None:
        """Called once the end was reached and every token handed out: raise for an error end."""
        self.exhausted = True
        end = self.cursor.end
        assert end is not None
        if end.error is not None:
            raise job_failed(self.job_id, end.error)

    def connection_lost(self, error: Exception) -> float:
        """The pause before reconnecting; raises :class:`RedisUnavailableError` when it is time to give up."""
        now = time.monotonic()
        pause = self.backoff.next_pause(now)
        failing = self.backoff.failing_for(now)
        if failing >= self.give_up_s:
            raise RedisUnavailableError(
                f"lost Redis while streaming job {self.job_id!r} and could not reconnect for {failing:.1f} s "
                f"({type(error).__name__}: {error}); {self.cursor.next_position} tokens were delivered: "
                f"call stream(start={self.cursor.next_position}) later to resume"
            ) from error
        log.info("job %s: stream connection lost (%s: %s); reconnecting in %.2f s",
                 self.job_id, type(error).__name__, error, pause)
        if self.deadline is not None:
            pause = min(pause, max(0.0, self.deadline - now))
        return pause


def _failure_message(job_id: str, entries: list[Any]) -> str | None:
    """The worker's message in the latest failed entry of a job's rq results (XREVRANGE order)."""
    for entry_id, fields in entries:
        try:
            outcome = decode_result_entry(job_id, entry_id, fields)
        except Exception:  # noqa: BLE001 - an unreadable entry: no message, the status still says FAILED
            return None
        if isinstance(outcome, JobFailed):
            return outcome.error
    return None


# ------------------------------------------------------------------ what both readers share


class _Reader:
    """The state and read-only view both readers share; they differ only in how they wait."""

    def __init__(self, conn: Any, job_id: str, pubsub_conn: Any, start: int, timeout: float | None,
                 idle_s: float, finished_grace_s: float, give_up_s: float) -> None:
        self._state = _ReaderState(job_id, start, timeout, idle_s, finished_grace_s, give_up_s)
        self.job_id = self._state.job_id
        self._conn = conn
        self._pubsub_conn = pubsub_conn if pubsub_conn is not None else conn
        self._pubsub: Any = None

    @property
    def end(self) -> StreamEnd | None:
        """The job's end record, once the stream reached it."""
        return self._state.cursor.end

    @property
    def next_index(self) -> int:
        """The index of the next token (= tokens delivered, counting from ``start``'s 0)."""
        return self._state.cursor.next_position

    @property
    def timeout(self) -> float | None:
        """Seconds to wait for each next event (None: forever); settable."""
        return self._state.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._state.timeout = check_timeout(value)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(job={self.job_id!r}, next_index={self.next_index}, "
                f"ended={self.end is not None})")


# ------------------------------------------------------------------ sync reader


class TokenStream(_Reader, Iterator[TokenEvent]):
    """Iterate one job's token events: every event exactly once, in index order.

    Built by :meth:`producer.JobHandle.stream`. Iteration ends after the
    job's :class:`StreamEnd` (then in :attr:`end`; a cancelled or
    past-deadline job ends normally with that ``finish_reason``), or raises:
    :class:`JobFailed` when the end carries an error or rq reports the job
    FAILED; :class:`JobCancelled` / :class:`JobNotFound` when rq says the
    job was cancelled without an end record, or is gone; :class:`ResultTimeout`
    when no event arrives within ``timeout`` seconds (iterating again waits
    anew); :class:`StreamIncomplete` when the job finished but its log lacks
    the end. Connection drops are survived (see the module docstring).

    ``conn`` reads the log and the status (it may retry by itself);
    ``pubsub_conn`` subscribes and should not retry silently (tpqueue's
    client gives it ``retries=0``) so that a drop is noticed at once.
    Correct whenever it is started, even after the job finished: the log
    replay delivers what pub/sub could not. Close it (or use ``with``) when
    you stop early.
    """

    def __init__(self, conn: redis.Redis, job_id: str, *, pubsub_conn: redis.Redis | None = None, start: int = 0,
                 timeout: float | None = None, idle_s: float = IDLE_S, finished_grace_s: float = FINISHED_GRACE_S,
                 give_up_s: float = RECONNECT_GIVE_UP_S) -> None:
        super().__init__(conn, job_id, pubsub_conn, start, timeout, idle_s, finished_grace_s, give_up_s)

    @property
    def subscribed(self) -> bool:
        """True while subscribed to the job's channel."""
        return self._pubsub is not None

    def open(self) -> TokenStream:
        """Subscribe and replay the log now (iteration does it on demand). Returns self."""
        if self._pubsub is None and self._state.cursor.end is None:
            self._connect()
        return self

    def close(self) -> None:
        """Unsubscribe and give the pub/sub connection back. Iterating later reconnects."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - closing a broken connection: nothing left to do
                pass

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> TokenEvent:
        state = self._state
        if state.exhausted:
            raise StopIteration
        state.start_wait()
        while not state.ready:
            if state.cursor.end is not None:
                self.close()
                state.finish()
                raise StopIteration
            self._step()
            if not state.ready and state.cursor.end is None and state.timed_out():
                self._last_look()
        state.deadline = None
        return state.ready.popleft()

    # -- one step of waiting

    def _step(self) -> None:
        state = self._state
        try:
            if self._pubsub is None:
                self._connect()
                return
            message = self._pubsub.get_message(timeout=state.poll_s())
            if message is not None and message.get("type") == "message":
                self._take_published(message["data"])
            elif message is None and state.idle_due():
                self._refresh()
        except _CONNECTION_ERRORS as e:
            self.close()
            time.sleep(state.connection_lost(e))

    def _connect(self) -> None:
        pubsub = self._pubsub_conn.pubsub()
        self._pubsub = pubsub
        pubsub.subscribe(keys.token_channel(self.job_id))
        early = self._await_confirmation(pubsub)
        self._replay()
        for data in early:
            self._take_published(data)
        self._state.backoff.reset()

    @staticmethod
    def _await_confirmation(pubsub: Any) -> list[Any]:
        early: list[Any] = []
        give_up = time.monotonic() + SUBSCRIBE_CONFIRM_S
        while (left := give_up - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message.get("type") == "subscribe":
                return early
            if message.get("type") == "message":
                early.append(message["data"])
        raise RedisTimeoutError(f"Redis did not confirm SUBSCRIBE within {SUBSCRIBE_CONFIRM_S:g} s")

    def _take_published(self, data: Any) -> None:
        message = _decode_pubsub(self.job_id, data)
        if message is None:
            return
        self._state.take((message,), from_log=False)
        if self._state.cursor.waiting:
            self._replay()

    def _replay(self) -> None:
        cursor = self._state.cursor
        if cursor.end is None:
            entries = self._conn.xrange(keys.token_log(self.job_id), min=log_entry_id(cursor.next_position))
            self._state.take(_decode_log(entries), from_log=True)

    def _refresh(self) -> None:
        """The idle re-read: rq status, then the log from the next position (one round trip)."""
        with self._conn.pipeline(transaction=False) as pipe:
            pipe.hget(keys.rq_job_key(self.job_id), "status")
            pipe.xrange(keys.token_log(self.job_id), min=log_entry_id(self._state.cursor.next_position))
            raw_status, entries = pipe.execute()
        self._state.take(_decode_log(entries), from_log=True)
        state, failure = job_state(raw_status), None
        if state is JobState.FAILED and self._state.cursor.end is None:
            failure = _failure_message(self.job_id, self._conn.xrevrange(keys.rq_result_key(self.job_id), count=3))
        self._state.judge_status(state, failure)

    def _last_look(self) -> None:
        """At the deadline: one more read of the log, then :class:`ResultTimeout` if still nothing new."""
        state = self._state
        try:
            self._replay()
        except _CONNECTION_ERRORS:
            pass
        if not state.ready and state.cursor.end is None:
            state.deadline = None  # iterating again waits anew
            raise state.timeout_error(self._state_text())

    def _state_text(self) -> str:
        try:
            return job_state(self._conn.hget(keys.rq_job_key(self.job_id), "status")).value
        except _CONNECTION_ERRORS:
            return "unknown (Redis unreachable)"


# ------------------------------------------------------------------ asyncio reader


class AsyncTokenStream(_Reader):
    """The asyncio twin of :class:`TokenStream`: ``async for event in stream`` (same rules and errors).

    Built by :meth:`producer.AsyncJobHandle.stream` on ``redis.asyncio``
    clients: ``conn`` for the log and status, ``pubsub_conn`` (no silent
    retries) for pub/sub. Close it with ``await stream.aclose()`` (or
    ``async with``) when you stop early.
    """

    def __init__(self, conn: redis.asyncio.Redis, job_id: str, *, pubsub_conn: redis.asyncio.Redis | None = None,
                 start: int = 0, timeout: float | None = None, idle_s: float = IDLE_S,
                 finished_grace_s: float = FINISHED_GRACE_S, give_up_s: float = RECONNECT_GIVE_UP_S) -> None:
        super().__init__(conn, job_id, pubsub_conn, start, timeout, idle_s, finished_grace_s, give_up_s)

    async def open(self) -> AsyncTokenStream:
        """Subscribe and replay the log now. Returns self."""
        if self._pubsub is None and self._state.cursor.end is None:
            await self._connect()
        return self

    async def aclose(self) -> None:
        """Unsubscribe and give the pub/sub connection back."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:  # noqa: BLE001 - closing a broken connection: nothing left to do
                pass

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        state = self._state
        if state.exhausted:
            raise StopAsyncIteration
        state.start_wait()
        while not state.ready:
            if state.cursor.end is not None:
                await self.aclose()
                state.finish()
                raise StopAsyncIteration
            await self._step()
            if not state.ready and state.cursor.end is None and state.timed_out():
                await self._last_look()
        state.deadline = None
        return state.ready.popleft()

    async def _step(self) -> None:
        state = self._state
        try:
            if self._pubsub is None:
                await self._connect()
                return
            message = await self._pubsub.get_message(timeout=state.poll_s())
            if message is not None and message.get("type") == "message":
                await self._take_published(message["data"])
            elif message is None and state.idle_due():
                await self._refresh()
        except _CONNECTION_ERRORS as e:
            await self.aclose()
            await asyncio.sleep(state.connection_lost(e))

    async def _connect(self) -> None:
        pubsub = self._pubsub_conn.pubsub()
        self._pubsub = pubsub
        await pubsub.subscribe(keys.token_channel(self.job_id))
        early = await self._await_confirmation(pubsub)
        await self._replay()
        for data in early:
            await self._take_published(data)
        self._state.backoff.reset()

    @staticmethod
    async def _await_confirmation(pubsub: Any) -> list[Any]:
        early: list[Any] = []
        give_up = time.monotonic() + SUBSCRIBE_CONFIRM_S
        while (left := give_up - time.monotonic()) > 0:
            message = await pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message.get("type") == "subscribe":
                return early
            if message.get("type") == "message":
                early.append(message["data"])
        raise RedisTimeoutError(f"Redis did not confirm SUBSCRIBE within {SUBSCRIBE_CONFIRM_S:g} s")

    async def _take_published(self, data: Any) -> None:
        message = _decode_pubsub(self.job_id, data)
        if message is None:
            return
        self._state.take((message,), from_log=False)
        if self._state.cursor.waiting:
            await self._replay()

    async def _replay(self) -> None:
        cursor = self._state.cursor
        if cursor.end is None:
            entries = await self._conn.xrange(keys.token_log(self.job_id), min=log_entry_id(cursor.next_position))
            self._state.take(_decode_log(entries), from_log=True)

    async def _refresh(self) -> None:
        """The idle re-read: rq status, then the log from the next position (one round trip)."""
        async with self._conn.pipeline(transaction=False) as pipe:
            pipe.hget(keys.rq_job_key(self.job_id), "status")
            pipe.xrange(keys.token_log(self.job_id), min=log_entry_id(self._state.cursor.next_position))
            raw_status, entries = await pipe.execute()
        self._state.take(_decode_log(entries), from_log=True)
        state, failure = job_state(raw_status), None
        if state is JobState.FAILED and self._state.cursor.end is None:
            results = await self._conn.xrevrange(keys.rq_result_key(self.job_id), count=3)
            failure = _failure_message(self.job_id, results)
        self._state.judge_status(state, failure)

    async def _last_look(self) -> None:
        """At the deadline: one more read of the log, then :class:`ResultTimeout` if still nothing new."""
        state = self._state
        try:
            await self._replay()
        except _CONNECTION_ERRORS:
            pass
        if not state.ready and state.cursor.end is None:
            state.deadline = None  # iterating again waits anew
            raise state.timeout_error(await self._state_text())

    async def _state_text(self) -> str:
        try:
            return job_state(await self._conn.hget(keys.rq_job_key(self.job_id), "status")).value
        except _CONNECTION_ERRORS:
            return "unknown (Redis unreachable)"
