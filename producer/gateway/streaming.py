"""A completion's jobs streamed as server-sent events that a client can drop and resume.

Each event's ``id:`` is the index of the last token sent, per job: ``"7"``
for a one-job completion, ``"7,3,-1"`` with three (``-1``: none of that job
yet). A client that reconnects with that id in ``Last-Event-ID``
(:func:`resume_points`) is sent everything after it, replayed from each
job's durable token log and then live (:meth:`producer.AsyncJobHandle.stream`
with ``start``), so it sees every token once. Token events with empty text
(a multi-byte character still incomplete) are not sent; the next event's id
covers them.

A stream whose client went away (the task is cancelled) leaves its jobs
running for ``TPQ_HTTP_DISCONNECT_GRACE_S``; if no stream attached to the
completion since (a resume, on any replica: the count is in Redis,
:func:`producer.gateway.records.attach`), the jobs are cancelled.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from common.errors import JobNotFound, TpqError
from common.metrics import HTTP_OPEN_STREAMS
from common.results import JobResult, StreamEnd, TokenEvent
from producer.async_client import AsyncClient
from producer.gateway import records
from producer.gateway.errors import bad_request, from_tpq_error
from producer.gateway.records import CompletionRecord
from producer.gateway.responses import DONE, chunk, sse, usage_chunk
from producer.handles import AsyncJobHandle

log = logging.getLogger(__name__)

USAGE_RESULT_TIMEOUT_S = 30.0
"""Seconds to wait for the jobs' rq results (for the usage chunk) once their streams ended."""

Spawn = Callable[[Coroutine[Any, Any, None]], None]


def event_id(last: list[int]) -> str:
    """The ``id:`` of an event: the last token index sent of each job, comma-separated."""
    return ",".join(map(str, last))


def resume_points(last_event_id: str | None, num_jobs: int) -> list[int]:
    """The first token index to send of each job, after the events up to ``last_event_id`` (None: all)."""
    if last_event_id is None or not last_event_id.strip():
        return [0] * num_jobs
    try:
        last = [int(part) for part in last_event_id.split(",")]
    except ValueError:
        last = []
    if len(last) != num_jobs or any(i < -1 for i in last):
        raise bad_request(f"Last-Event-ID must be the id of an event of this stream: {num_jobs} comma-separated "
                          "token indices >= -1", param="Last-Event-ID")
    return [i + 1 for i in last]


async def _pump(handle: AsyncJobHandle, start: int, choice: int, queue: asyncio.Queue) -> None:
    """Put job ``choice``'s events from ``start`` on ``queue``, then its :class:`StreamEnd` (or the error)."""
    try:
        stream = handle.stream(start=start)
        try:
            async for event in stream:
                await queue.put((choice, event))
            await queue.put((choice, stream.end))
        finally:
            await stream.aclose()
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - handed to the stream, which reports it to its client
        await queue.put((choice, e))


def _error_event(error: TpqError, last_id: str) -> bytes:
    return sse(from_tpq_error(error).body(), last_id)


class CompletionStream:
    """The events of one HTTP stream of a completion: iterate :meth:`events` once.

    ``handles``: the completion's jobs, choice ``i`` at ``i``; ``starts``:
    the first token index to send of each (0 for a new stream);
    ``grace_s``: how long the jobs outlive a lost client; ``spawn`` runs a
    background coroutine beyond this request (the delayed cancel).
    """

    def __init__(self, client: AsyncClient, record: CompletionRecord, handles: list[AsyncJobHandle],
                 starts: list[int], *, grace_s: float, spawn: Spawn) -> None:
        self.client, self.record, self.handles, self.starts = client, record, handles, starts
        self.grace_s, self.spawn = grace_s, spawn
        self.ttl_s = client.settings.result_ttl_s

    async def events(self) -> AsyncIterator[bytes]:
        """The SSE bytes: opening role deltas (chat, new stream), tokens, finishes, usage, ``[DONE]``."""
        attached = await records.attach(self.client.redis, self.record.id, self.ttl_s)
        last = [s - 1 for s in self.starts]
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(h, s, i, queue)) for i, (h, s) in enumerate(zip(self.handles, self.starts))]
        HTTP_OPEN_STREAMS.inc()
        done = False
        try:
            if self.record.kind == "chat":
                for i, start in enumerate(self.starts):
                    if start == 0:
                        yield sse(chunk(self.record, i, role=True), event_id(last))
            async for data in self._tokens_and_ends(queue, last):
                yield data
            if self.record.include_usage:
                yield sse(usage_chunk(self.record, await self._results()), event_id(last))
            done = True
            yield sse(DONE, event_id(last))
        except TpqError as e:
            done = True  # the job failed or is gone: nothing is left to cancel
            yield _error_event(e, event_id(last))
        finally:
            for pump in pumps:
                pump.cancel()
            HTTP_OPEN_STREAMS.dec()
            if not done:
                self.spawn(self._cancel_unless_resumed(attached))

    async def _tokens_and_ends(self, queue: asyncio.Queue, last: list[int]) -> AsyncIterator[bytes]:
        ended = 0
        while ended < len(self.handles):
            choice, item = await queue.get()
            if isinstance(item, TokenEvent):
                last[choice] = item.index
                if item.text:
                    yield sse(chunk(self.record, choice, text=item.text), event_id(last))
            elif isinstance(item, StreamEnd):
                ended += 1
                reason = item.finish_reason.value if item.finish_reason is not None else None
                yield sse(chunk(self.record, choice, finish_reason=reason), event_id(last))
            else:
                raise item

    async def _results(self) -> list[JobResult]:
        return list(await asyncio.gather(*(h.result(timeout=USAGE_RESULT_TIMEOUT_S) for h in self.handles)))

    async def _cancel_unless_resumed(self, attached: int) -> None:
        """After the grace: cancel the jobs unless another stream attached since this one did."""
        if self.grace_s > 0:
            await asyncio.sleep(self.grace_s)
        if await records.attached_count(self.client.redis, self.record.id) != attached:
            return
        log.info("completion %s: its stream's client left %.1f s ago and did not resume; cancelling %d job(s)",
                 self.record.id, self.grace_s, len(self.handles))
        for handle in self.handles:
            try:
                await handle.cancel()
            except JobNotFound:
                pass
