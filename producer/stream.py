"""Reading one job's token stream: :class:`TokenStream` and its asyncio twin :class:`AsyncTokenStream`.

Both run the plans of :class:`producer.stream_core.ReaderCore` (whose
docstring tells how pub/sub and the durable token log are combined); they
differ only in how they wait.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio

from common.results import StreamEnd, TokenEvent
from producer.job_state import IDLE_S, check_timeout
from producer.redis_io import run, run_async
from producer.stream_core import FINISHED_GRACE_S, RECONNECT_GIVE_UP_S, ReaderCore


class _Reader:
    """The core and read-only view both readers share."""

    def __init__(self, conn: Any, job_id: str, pubsub_conn: Any, start: int, timeout: float | None,
                 idle_s: float, finished_grace_s: float, give_up_s: float) -> None:
        self._core = ReaderCore(conn, pubsub_conn if pubsub_conn is not None else conn, job_id, start, timeout,
                                idle_s, finished_grace_s, give_up_s)
        self.job_id = self._core.job_id

    @property
    def end(self) -> StreamEnd | None:
        """The job's end record, once the stream reached it."""
        return self._core.cursor.end

    @property
    def next_index(self) -> int:
        """The index of the next token (= tokens delivered, counting from ``start``'s 0)."""
        return self._core.delivered

    @property
    def timeout(self) -> float | None:
        """Seconds to wait for each next event (None: forever); settable."""
        return self._core.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._core.timeout = check_timeout(value)

    @property
    def subscribed(self) -> bool:
        """True while subscribed to the job's channel."""
        return self._core.pubsub is not None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(job={self.job_id!r}, next_index={self.next_index}, "
                f"ended={self.end is not None})")


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
    the end. Connection drops are survived (see :mod:`producer.stream_core`).

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

    def open(self) -> TokenStream:
        """Subscribe and replay the log now (iteration does it on demand). Returns self."""
        run(self._core.open())
        return self

    def close(self) -> None:
        """Unsubscribe and give the pub/sub connection back. Iterating later reconnects."""
        run(self._core.unsubscribe())

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> TokenEvent:
        event = run(self._core.next_event())
        if event is None:
            raise StopIteration
        return event


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
        await run_async(self._core.open())
        return self

    async def aclose(self) -> None:
        """Unsubscribe and give the pub/sub connection back."""
        await run_async(self._core.unsubscribe())

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        event = await run_async(self._core.next_event())
        if event is None:
            raise StopAsyncIteration
        return event
