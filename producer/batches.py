"""Waiting for many jobs at once: :class:`BatchHandle`, its asyncio twin :class:`AsyncBatchHandle`, :class:`BatchWatch`.

A batch waits with multi-key XREAD over its jobs' rq result streams (500
keys per call) and checks every pending job's rq status about once a second
(cancelled or vanished jobs). :class:`BatchWatch` decides what to read and
what the replies mean; both handles run its plans and differ only in how
they wait.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from common import keys
from common.errors import ResultTimeout
from common.text import as_text
from producer.handles import AsyncJobHandle, JobHandle
from producer.job_state import (
    IDLE_S, JobState, Outcome, ResultWatch, check_timeout, count_states, job_state, read_states, xread_items,
)
from producer.redis_io import Call, Pause, Pipelined, Plan, run, run_async

_XREAD_KEYS = 500  # result streams per multi-key XREAD of a batch


class _Batch:
    """The jobs of one ``submit_batch`` call, in submission order: what both batch handles share."""

    __slots__ = ("handles",)

    def __init__(self, handles: Iterable[Any]) -> None:
        self.handles: tuple[Any, ...] = tuple(handles)

    @property
    def ids(self) -> list[str]:
        """The job ids, in submission order."""
        return [h.id for h in self.handles]

    def _in_submission_order(self, pairs: Iterable[tuple[Any, Outcome]]) -> list[tuple[Any, Outcome]]:
        outcomes = {id(handle): outcome for handle, outcome in pairs}
        return [(handle, outcomes[id(handle)]) for handle in self.handles]

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.handles)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.handles)} jobs)"


class BatchHandle(_Batch):
    """The jobs of one :meth:`Client.submit_batch` call, in submission order."""

    __slots__ = ()
    handles: tuple[JobHandle, ...]

    def __init__(self, handles: Iterable[JobHandle]) -> None:
        super().__init__(handles)

    def results(self, timeout: float | None = None) -> Iterator[tuple[JobHandle, Outcome]]:
        """Yield ``(handle, outcome)`` for every job as it completes (completion order).

        ``outcome`` is the :class:`JobResult`, or the exception that says why
        there is none (:class:`JobFailed`, :class:`JobCancelled`,
        :class:`JobNotFound`): it is yielded, not raised. Waits with
        multi-key XREAD over the jobs' rq result streams (500 keys per
        call), and checks every pending job's rq status about once a second
        (cancelled or vanished jobs). Raises :class:`ResultTimeout` when
        ``timeout`` seconds pass in all with jobs still pending.
        """
        if not self.handles:
            return
        conn = self.handles[0]._client.redis
        watch = BatchWatch(self.handles, timeout)
        while watch.pending:
            yield from run(watch.next_pass(conn))

    def wait(self, timeout: float | None = None) -> list[tuple[JobHandle, Outcome]]:
        """Wait for every job; ``(handle, outcome)`` pairs in submission order (see :meth:`results`)."""
        return self._in_submission_order(self.results(timeout))

    def progress(self) -> dict[JobState, int]:
        """How many of the jobs are in each :class:`JobState` now (every state listed, zeros included)."""
        if not self.handles:
            return count_states(())
        return count_states(run(read_states(self.handles[0]._client.redis, self.ids)))


class AsyncBatchHandle(_Batch):
    """The jobs of one :meth:`AsyncClient.submit_batch` call, in submission order."""

    __slots__ = ("_client",)
    handles: tuple[AsyncJobHandle, ...]

    def __init__(self, client: Any, handles: Iterable[AsyncJobHandle]) -> None:
        super().__init__(handles)
        self._client = client

    async def results(self, timeout: float | None = None) -> AsyncIterator[tuple[AsyncJobHandle, Outcome]]:
        """``async for handle, outcome in batch.results():`` in completion order (see :meth:`producer.BatchHandle.results`)."""
        watch = BatchWatch(self.handles, timeout)
        while watch.pending:
            for pair in await run_async(watch.next_pass(self._client.redis)):
                yield pair

    async def wait(self, timeout: float | None = None) -> list[tuple[AsyncJobHandle, Outcome]]:
        """Wait for every job; ``(handle, outcome)`` pairs in submission order."""
        return self._in_submission_order([pair async for pair in self.results(timeout)])

    async def progress(self) -> dict[JobState, int]:
        """How many of the jobs are in each :class:`JobState` now (zeros included)."""
        return count_states(await run_async(read_states(self._client.redis, self.ids)))


class BatchWatch:
    """Waiting for many jobs' outcomes, without I/O: which keys to XREAD, and what the replies mean.

    Shared by :class:`BatchHandle` and its asyncio twin. ``pending`` maps a
    job id to its handles (usually one).
    """

    def __init__(self, handles: Iterable[Any], timeout: float | None) -> None:
        self.pending: dict[str, list[Any]] = {}
        for handle in handles:
            self.pending.setdefault(handle.id, []).append(handle)
        self.watches = {job_id: ResultWatch(job_id) for job_id in self.pending}
        self.timeout = check_timeout(timeout)
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.next_status_at = time.monotonic()
        self.states: dict[str, JobState] = {}
        self._quiet_passes = 0

    def next_pass(self, conn: Any) -> Plan[list[tuple[Any, Outcome]]]:
        """One pass of waiting: the status pass when due, else a wait on the result streams; what it settled.

        Raises :meth:`timeout_error` when the time is up before a wait.
        """
        if self.status_due():
            return (yield from self._status_pass(conn))
        if self.timed_out():
            raise self.timeout_error()
        return (yield from self._wait_pass(conn))

    def _status_pass(self, conn: Any) -> Plan[list[tuple[Any, Outcome]]]:
        """Every pending job's status, then (in the same round trip) every result stream, without blocking."""
        ids, chunks = list(self.pending), self.chunks()

        def statuses_then_results(pipe: Any) -> None:
            for job_id in ids:
                pipe.hget(keys.rq_job_key(job_id), "status")  # before the reads, as in wait_result
            for chunk in chunks:
                pipe.xread(chunk)

        replies = yield Pipelined(conn, statuses_then_results)
        states = {job_id: job_state(raw) for job_id, raw in zip(ids, replies)}
        return self.feed_xread(replies[len(ids):], states)

    def _wait_pass(self, conn: Any) -> Plan[list[tuple[Any, Outcome]]]:
        """One blocking XREAD (one chunk), or a non-blocking one per chunk and a pause if nothing came."""
        chunks = self.chunks()
        if len(chunks) == 1:
            block_ms = self.block_ms()
            return self.feed_xread([(yield Call(lambda: conn.xread(chunks[0], block=block_ms)))])

        def every_chunk(pipe: Any) -> None:
            for chunk in chunks:
                pipe.xread(chunk)

        settled = self.feed_xread((yield Pipelined(conn, every_chunk)))
        if not settled:
            yield Pause(self.quiet_pause())
        return settled

    def chunks(self) -> list[dict[str, Any]]:
        """XREAD stream arguments ``{rq:results:<id>: last id}`` for the pending jobs, 500 keys each."""
        items = [(keys.rq_result_key(job_id), self.watches[job_id].last_id) for job_id in self.pending]
        return [dict(items[i:i + _XREAD_KEYS]) for i in range(0, len(items), _XREAD_KEYS)]

    def block_ms(self) -> int:
        """How long one blocking XREAD may wait: until the next status pass (or the deadline), >= 1 ms."""
        until = self.next_status_at if self.deadline is None else min(self.next_status_at, self.deadline)
        return max(1, int((until - time.monotonic()) * 1000))

    def quiet_pause(self) -> float:
        """Pause after a non-blocking pass over many chunks found nothing (grows to 0.25 s)."""
        self._quiet_passes += 1
        until = self.next_status_at if self.deadline is None else min(self.next_status_at, self.deadline)
        return max(0.0, min(0.01 * 2 ** min(self._quiet_passes, 5), 0.25, until - time.monotonic()))

    def status_due(self) -> bool:
        return time.monotonic() >= self.next_status_at

    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def feed_xread(self, responses: Iterable[Any], states: dict[str, JobState] | None = None) -> list[tuple[Any, Outcome]]:
        """Take XREAD replies (and, on a status pass, every pending job's state): the outcomes now settled.

        Jobs whose result entries arrived are settled in the order of their
        entries' ids (completion order); then jobs settled by state alone.
        """
        touched: dict[str, None] = {}  # ordered set
        for response in responses:
            for key, entries in xread_items(response):
                job_id = as_text(key)[len(keys.RQ_RESULT_PREFIX):]
                if job_id in self.watches and entries:
                    self.watches[job_id].feed(entries)
                    touched[job_id] = None
        if states is not None:
            self.states = states
            self.next_status_at = time.monotonic() + IDLE_S
            touched.update(dict.fromkeys(states))
        settled = []
        for job_id in touched:
            verdict = self.watches[job_id].verdict(states.get(job_id) if states is not None else None)
            if verdict is not None and job_id in self.pending:
                settled.append((_entry_order(self.watches[job_id].last_id), job_id, verdict))
        settled.sort(key=lambda item: item[0])
        if settled:
            self._quiet_passes = 0
        return [(handle, verdict) for _, job_id, verdict in settled for handle in self.pending.pop(job_id)]

    def timeout_error(self) -> ResultTimeout:
        """The :class:`ResultTimeout` naming how many jobs are pending and one of them."""
        job_id = next(iter(self.pending))
        state = self.states.get(job_id, JobState.UNKNOWN)
        total = len(self.watches)
        return ResultTimeout(
            f"{len(self.pending)} of {total} jobs have no result after {self.timeout:g} s (e.g. job {job_id!r}, "
            f"status: {state.value}); wait longer, check that worker groups serve their queues, or cancel them",
            job_id=job_id, status=state.value, waited_s=self.timeout or 0.0,
        )


def _entry_order(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = as_text(entry_id).partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() and (seq or "0").isdigit() else (0, 0)
