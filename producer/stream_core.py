"""What a token-stream reader decides, without I/O: the plans the sync and asyncio readers both run.

The token stream (format in :mod:`common.jobs`) reaches a client two ways:
pub/sub on ``keys.token_channel(job_id)`` (fast, but a message can be
duplicated, or missed while a connection is down) and the durable log
``keys.token_log(job_id)`` (the truth). A reader combines them:

1. SUBSCRIBE to the channel and wait for Redis to confirm it;
2. replay the log from the next position (XRANGE), so everything written
   before the subscription took effect is read from the log; it is read in
   pages of :data:`LOG_PAGE` entries (XRANGE ... COUNT), the next page only
   once the reader handed out the last one's events, so a resumed 30k-token
   stream never arrives in one reply;
3. take pub/sub messages: a position already passed is dropped, a position
   beyond the next one means a gap, filled from the log (the worker XADDs a
   message before it PUBLISHes it, in one pipeline, so a published
   message's predecessors are already in the log);
4. when nothing new arrives for ``idle_s`` (1 s), re-read the log and the rq
   status (catches missed messages, FAILED jobs, vanished jobs);
5. on a dropped connection, reconnect with back-off, resubscribe and
   continue from the log at the next position.

:class:`ReaderCore` holds the reader's state (a :class:`StreamCursor`, the
events ready to hand out, its clocks) and its plans (:mod:`producer.redis_io`);
:class:`producer.TokenStream` and :class:`producer.AsyncTokenStream` only run them.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import keys
from common.errors import InvalidRequestError, JobCancelled, JobNotFound, ResultTimeout, StreamIncomplete
from common.jobs import StreamMessage, decode_stream_message, log_entry_id, log_entry_position
from common.redis_conn import RedisUnavailableError
from common.results import TokenEvent
from common.token_log import decode_log
from producer.job_state import JobState, check_timeout, failure_message, job_failed, job_state
from producer.redis_io import Call, Close, Pause, Pipelined, Plan
from producer.stream_cursor import StreamCursor

log = logging.getLogger(__name__)

FINISHED_GRACE_S = 5.0
"""Seconds a reader waits for the end record of a job rq already reports finished."""
RECONNECT_GIVE_UP_S = 30.0
"""Seconds of failing reconnects after which a reader raises :class:`RedisUnavailableError`."""
SUBSCRIBE_CONFIRM_S = 5.0
LOG_PAGE = 512
"""Token-log entries one XRANGE reads (a page); a full page means the log may hold more after it."""
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
# redis-py wraps socket errors in its own classes; builtin ConnectionError covers a reset socket.
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError)


class Backoff:
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


def _decode_pubsub(job_id: str, data: Any) -> StreamMessage | None:
    try:
        return decode_stream_message(data)
    except InvalidRequestError as e:
        log.warning("job %s: dropped a malformed pub/sub message (%s); the log will fill in", job_id, e)
        return None


class ReaderCore:
    """One reader's state (cursor, ready events, clocks, pub/sub) and the plans that advance it.

    ``conn`` reads the log and the status; ``pubsub_conn`` subscribes. Both
    are only handed to the plans' steps: the core itself does no I/O
    (making a pub/sub object connects nothing).
    """

    def __init__(self, conn: Any, pubsub_conn: Any, job_id: str, start: int, timeout: float | None, idle_s: float,
                 finished_grace_s: float, give_up_s: float) -> None:
        self.job_id = keys.validate_job_id(job_id)
        self.cursor = StreamCursor(job_id, start)
        self.ready: deque[TokenEvent] = deque()
        self.timeout = check_timeout(timeout)
        self.idle_s, self.finished_grace_s, self.give_up_s = idle_s, finished_grace_s, give_up_s
        self.deadline: float | None = None
        self.idle_since = time.monotonic()
        self.finished_since: float | None = None
        self.backoff = Backoff()
        self.exhausted = False
        self.pubsub: Any = None
        self.log_from: int | None = None  # after a full page: the position the next page of the log starts at
        self._conn, self._pubsub_conn = conn, pubsub_conn

    # -- the plans the readers run

    def next_event(self) -> Plan[TokenEvent | None]:
        """The next token event, or None once the stream ended (raises for an error end or status)."""
        if self.exhausted:
            return None
        self.start_wait()
        while not self.ready:
            if self.cursor.end is not None:
                yield from self.unsubscribe()
                self.finish()
                return None
            yield from self._step()
            if not self.ready and self.cursor.end is None and self.timed_out():
                yield from self._last_look()
        self.deadline = None
        return self.ready.popleft()

    def open(self) -> Plan[None]:
        """Subscribe and replay the log now, unless subscribed or ended."""
        if self.pubsub is None and self.cursor.end is None:
            yield from self._connect()

    def unsubscribe(self) -> Plan[None]:
        """Close the pub/sub, if any (the next step that needs it subscribes again)."""
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            yield Close(pubsub)

    def _step(self) -> Plan[None]:
        """One step of waiting: (re)connect, or take one pub/sub message, or the idle re-read."""
        try:
            if self.pubsub is None:
                yield from self._connect()
                return
            if self.log_from is not None:  # the log's next page before any wait: it is there already
                yield from self._read_page(self.log_from)
                return
            pubsub, timeout = self.pubsub, self.poll_s()
            message = yield Call(lambda: pubsub.get_message(timeout=timeout))
            if message is not None and message.get("type") == "message":
                yield from self._take_published(message["data"])
            elif message is None and self.idle_due():
                yield from self._refresh()
        except CONNECTION_ERRORS as e:
            yield from self.unsubscribe()
            yield Pause(self.connection_lost(e))

    def _connect(self) -> Plan[None]:
        pubsub = self.pubsub = self._pubsub_conn.pubsub()
        yield Call(lambda: pubsub.subscribe(keys.token_channel(self.job_id)))
        early = yield from self._await_confirmation(pubsub)
        yield from self._replay()
        for data in early:
            yield from self._take_published(data)
        self.backoff.reset()

    @staticmethod
    def _await_confirmation(pubsub: Any) -> Plan[list[Any]]:
        early: list[Any] = []
        give_up = time.monotonic() + SUBSCRIBE_CONFIRM_S
        while (left := give_up - time.monotonic()) > 0:
            message = yield Call(lambda: pubsub.get_message(timeout=left))
            if message is None:
                continue
            if message.get("type") == "subscribe":
                return early
            if message.get("type") == "message":
                early.append(message["data"])
        raise RedisTimeoutError(f"Redis did not confirm SUBSCRIBE within {SUBSCRIBE_CONFIRM_S:g} s")

    def _take_published(self, data: Any) -> Plan[None]:
        message = _decode_pubsub(self.job_id, data)
        if message is None:
            return
        self.take((message,), from_log=False)
        if self.cursor.waiting:
            yield from self._replay()

    def _replay(self) -> Plan[None]:
        """Read the log's first page from the next position (:meth:`_step` reads the pages after it)."""
        if self.cursor.end is None:
            yield from self._read_page(self.cursor.next_position)

    def _read_page(self, position: int) -> Plan[None]:
        """Read one page of the log, from ``position`` on."""
        log_key, first = keys.token_log(self.job_id), log_entry_id(position)
        entries = yield Call(lambda: self._conn.xrange(log_key, min=first, count=LOG_PAGE))
        self.take_page(entries)

    def _refresh(self) -> Plan[None]:
        """The idle re-read: rq status, then the log's first page from the next position (one round trip)."""
        job_key, log_key = keys.rq_job_key(self.job_id), keys.token_log(self.job_id)
        first = log_entry_id(self.cursor.next_position)

        def status_and_log(pipe: Any) -> None:
            pipe.hget(job_key, "status")
            pipe.xrange(log_key, min=first, count=LOG_PAGE)

        raw_status, entries = yield Pipelined(self._conn, status_and_log)
        self.take_page(entries)
        state, failure = job_state(raw_status), None
        if state is JobState.FAILED and self.cursor.end is None:
            results = yield Call(lambda: self._conn.xrevrange(keys.rq_result_key(self.job_id), count=3))
            failure = failure_message(self.job_id, results)
        self.judge_status(state, failure)

    def _last_look(self) -> Plan[None]:
        """At the deadline: one more read of the log, then :class:`ResultTimeout` if still nothing new."""
        try:
            yield from self._replay()
        except CONNECTION_ERRORS:
            pass
        if not self.ready and self.cursor.end is None:
            self.deadline = None  # iterating again waits anew
            raise self.timeout_error((yield from self._state_text()))

    def _state_text(self) -> Plan[str]:
        try:
            raw_status = yield Call(lambda: self._conn.hget(keys.rq_job_key(self.job_id), "status"))
        except CONNECTION_ERRORS:
            return "unknown (Redis unreachable)"
        return job_state(raw_status).value

    # -- decisions

    def take_page(self, entries: list[tuple[Any, Any]]) -> None:
        """Take one page of log entries (an XRANGE reply); after a full page, note where the next one starts.

        The next page starts just past this page's last entry (XRANGE's
        ``min`` is inclusive), not at the cursor's next position: entries held
        beyond a hole are not read again, and no position is skipped.
        """
        self.take(decode_log(entries), from_log=True)
        full = len(entries) >= LOG_PAGE and self.cursor.end is None
        self.log_from = log_entry_position(entries[-1][0]) + 1 if full else None

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
            f"{self.delivered} tokens so far); wait longer or check that a worker group serves it",
            job_id=self.job_id, status=state, waited_s=self.timeout or 0.0,
        )

    @property
    def delivered(self) -> int:
        """The index of the next token to hand out: those the cursor took, less those still ready."""
        return self.cursor.next_position - len(self.ready)

    def judge_status(self, state: JobState, failure: str | None) -> None:
        """After an idle re-read found no end: raise if rq's status says the stream can never end.

        Not while tokens the same re-read brought wait to be handed out, nor
        while the log has pages left to read (the end may be in one): the
        caller gets them first (and may resume at :attr:`delivered` after an
        error); the next idle re-read judges the status again.
        """
        self.idle_since = time.monotonic()
        if self.cursor.end is not None or self.ready or self.log_from is not None:
            return
        job_id, received = self.job_id, self.delivered
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
                f"({type(error).__name__}: {error}); {self.delivered} tokens were delivered: "
                f"call stream(start={self.delivered}) later to resume"
            ) from error
        log.info("job %s: stream connection lost (%s: %s); reconnecting in %.2f s",
                 self.job_id, type(error).__name__, error, pause)
        if self.deadline is not None:
            pause = min(pause, max(0.0, self.deadline - now))
        return pause
