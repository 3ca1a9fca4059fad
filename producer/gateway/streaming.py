"""A completion's jobs streamed as server-sent events that a client can drop and resume.

Each event's ``id:`` is the index of the last token sent, per job: ``"7"``
for a one-job completion, ``"7,3,-1"`` with three (``-1``: none of that job
yet). A client that reconnects with that id in ``Last-Event-ID``
(:func:`resume_points`) is sent everything after it, replayed from each
job's durable token log and then live (:meth:`producer.AsyncJobHandle.stream`
with ``start``), so it sees every token once. Token events with empty text
(a multi-byte character still incomplete) are not sent; the next event of
their job carries them (its id, and with logprobs their entries), so a
client that drops before it gets them again.

With ``echo`` (completions) each job's first event is its prompt (with
logprobs, the prompt's: they come with the job's result, so such a stream
waits for its job to finish before it sends anything of it); until that
event is sent the job's index in the id is ``-2``. A completions stream
with logprobs replays a resumed job's log from its start, to count the
``text_offset`` of the tokens it sends.

A client slower than generation holds the pumps back: each stream buffers
at most :data:`STREAM_BUFFER` events, then its pumps wait, their readers
stop taking pub/sub messages, the shared pub/sub hub drops what passes its
own bound (:data:`producer.pubsub_mux.MAX_BUFFERED`), and the readers read
those tokens from the durable log once the client catches up. Memory stays
bounded and the client still gets every token.

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
from common.results import JobResult, StreamEnd, TokenEvent, TokenLogprob
from producer.async_client import AsyncClient
from producer.gateway import records
from producer.gateway.errors import APIError, bad_request, from_tpq_error
from producer.gateway.logprobs import TextLogprobs, chat_logprobs, generated_offsets
from producer.gateway.records import CompletionRecord
from producer.gateway.responses import DONE, chunk, sse, usage_chunk
from producer.gateway.vocab import TextOffsets, Vocabulary
from producer.handles import AsyncJobHandle

log = logging.getLogger(__name__)

STREAM_BUFFER = 256
"""Events one HTTP stream holds for a client that reads slower than its jobs generate (its pumps then wait)."""
USAGE_RESULT_TIMEOUT_S = 30.0
"""Seconds to wait for the jobs' rq results (for the usage chunk) once their streams ended."""

Spawn = Callable[[Coroutine[Any, Any, None]], None]


def event_id(last: list[int]) -> str:
    """The ``id:`` of an event: the last token index sent of each job, comma-separated."""
    return ",".join(map(str, last))


def _last_sent(last_event_id: str | None, num_jobs: int) -> list[int]:
    """The index in ``last_event_id`` of each job (-2: not even its echo sent); all -2 for no id."""
    if last_event_id is None or not last_event_id.strip():
        return [-2] * num_jobs
    try:
        last = [int(part) for part in last_event_id.split(",")]
    except ValueError:
        last = []
    if len(last) != num_jobs or any(i < -2 for i in last):
        raise bad_request(f"Last-Event-ID must be the id of an event of this stream: {num_jobs} comma-separated "
                          "token indices >= -2", param="Last-Event-ID")
    return last


def resume_points(last_event_id: str | None, num_jobs: int) -> list[int]:
    """The first token index to send of each job, after the events up to ``last_event_id`` (None: all)."""
    return [max(i + 1, 0) for i in _last_sent(last_event_id, num_jobs)]


def echoes_sent(last_event_id: str | None, num_jobs: int) -> list[bool]:
    """Of each job, whether the events up to ``last_event_id`` include its echo (completions' ``echo``)."""
    return [i >= -1 for i in _last_sent(last_event_id, num_jobs)]


class _Echo:
    """The prompt event of a job: its text goes first; with logprobs, ``result`` holds the prompt's."""

    def __init__(self, result: JobResult | None) -> None:
        self.result = result


async def _pump(handle: AsyncJobHandle, start: int, choice: int, queue: asyncio.Queue, *, echo: bool = False,
                echo_waits: bool = False) -> None:
    """Put job ``choice``'s events from ``start`` on ``queue``, then its :class:`StreamEnd` (or the error).

    ``echo``: first an :class:`_Echo`, after the job's result when ``echo_waits``.
    """
    try:
        if echo:
            await queue.put((choice, _Echo(await handle.result() if echo_waits else None)))
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


class CompletionStream:
    """The events of one HTTP stream of a completion: iterate :meth:`events` once.

    ``handles``: the completion's jobs, choice ``i`` at ``i``; ``starts``:
    the first token index to send of each (0 for a new stream);
    ``grace_s``: how long the jobs outlive a lost client; ``spawn`` runs a
    background coroutine beyond this request (the delayed cancel).
    ``vocab``: the model's vocabulary, for a completion with logprobs;
    ``echoes``: each choice's prompt text, for one with echo, and
    ``echoed``: whether its echo was sent already (a resume past it).
    """

    def __init__(self, client: AsyncClient, record: CompletionRecord, handles: list[AsyncJobHandle],
                 starts: list[int], *, grace_s: float, spawn: Spawn, vocab: Vocabulary | None = None,
                 echoes: list[str] | None = None, echoed: list[bool] | None = None) -> None:
        self.client, self.record, self.handles, self.starts = client, record, handles, starts
        self.grace_s, self.spawn = grace_s, spawn
        self.ttl_s = client.settings.result_ttl_s
        self.vocab = vocab if record.logprobs is not None else None
        if record.logprobs is not None and vocab is None:
            raise ValueError(f"completion {record.id} asked for logprobs: streaming them needs its model's vocabulary")
        self.echoes = echoes if record.echo else None
        if record.echo and (echoes is None or len(echoes) != len(handles)):
            raise ValueError(f"completion {record.id} echoes its prompts: give one echo text per choice")
        sent = echoed or [False] * len(handles)
        self.echo_pending = [self.echoes is not None and not done for done in sent]
        self.pending: list[list[TokenLogprob]] = [[] for _ in handles]  # entries not sent yet (empty text)
        self.seen = [s - 1 for s in starts]  # the last token index received of each job
        self.offsets: list[TextOffsets | None] = [None] * len(handles)
        if self.vocab is not None and record.kind == "text":
            self.offsets = [generated_offsets(self.vocab, len(self.echoes[i]) if self.echoes else 0)
                            for i in range(len(handles))]

    def _pump_of(self, choice: int, queue: asyncio.Queue) -> Coroutine[Any, Any, None]:
        replay = self.offsets[choice] is not None and self.starts[choice] > 0  # to count the text before start
        return _pump(self.handles[choice], 0 if replay else self.starts[choice], choice, queue,
                     echo=self.echo_pending[choice], echo_waits=self.vocab is not None)

    async def events(self) -> AsyncIterator[bytes]:
        """The SSE bytes of :meth:`frames`."""
        frames = self.frames()
        try:
            async for data, last_id in frames:
                yield sse(data, last_id)
        finally:
            await frames.aclose()

    async def frames(self) -> AsyncIterator[tuple[dict[str, Any] | str, str]]:
        """``(data, event id)`` of each event: opening role deltas (chat, new stream), tokens, finishes, usage,
        ``[DONE]``; or, after an error, the error object last. Iterate once."""
        attached = await records.attach(self.client.redis, self.record.id, self.ttl_s)
        last = [-2 if echo else s - 1 for s, echo in zip(self.starts, self.echo_pending)]
        queue: asyncio.Queue = asyncio.Queue(maxsize=STREAM_BUFFER)
        pumps = [asyncio.create_task(self._pump_of(i, queue)) for i in range(len(self.handles))]
        HTTP_OPEN_STREAMS.inc()
        done = False
        try:
            if self.record.kind == "chat":
                for i, start in enumerate(self.starts):
                    if start == 0:
                        yield chunk(self.record, i, role=True), event_id(last)
            async for data in self._tokens_and_ends(queue, last):
                yield data
            if self.record.include_usage:
                yield usage_chunk(self.record, await self._results()), event_id(last)
            done = True
            yield DONE, event_id(last)
        except TpqError as e:
            done = True  # the job failed or is gone: nothing is left to cancel
            yield from_tpq_error(e).body(), event_id(last)
        except Exception as e:  # noqa: BLE001 - a fault of the gateway's: its client still hears of it
            log.exception("completion %s: its stream failed", self.record.id)
            yield APIError(500, f"internal error ({type(e).__name__})").body(), event_id(last)
        finally:
            for pump in pumps:
                pump.cancel()
            HTTP_OPEN_STREAMS.dec()
            if not done:
                self.spawn(self._cancel_unless_resumed(attached))

    async def _tokens_and_ends(self, queue: asyncio.Queue,
                               last: list[int]) -> AsyncIterator[tuple[dict[str, Any], str]]:
        ended = 0
        while ended < len(self.handles):
            choice, item = await queue.get()
            if isinstance(item, TokenEvent):
                if item.index < self.starts[choice]:  # replayed only to count the text before the resume point
                    if self.offsets[choice] is not None and not self.record.prompt_only:
                        self.offsets[choice].add(item.token_id)
                    continue
                self.seen[choice] = item.index
                if self.record.prompt_only:  # max_tokens 0: the one token the job generated is not shown
                    continue
                if self.vocab is not None:
                    self.pending[choice].append(item.token_logprob())
                if item.text:
                    last[choice] = self.seen[choice]
                    yield (chunk(self.record, choice, text=item.text, logprobs=self._take_logprobs(choice)),
                           event_id(last))
            elif isinstance(item, StreamEnd):
                ended += 1
                last[choice] = self.seen[choice]
                reason = item.finish_reason.value if item.finish_reason is not None else None
                logprobs = self._take_logprobs(choice) if self.pending[choice] else None
                yield chunk(self.record, choice, finish_reason=reason, logprobs=logprobs), event_id(last)
            elif isinstance(item, _Echo):
                last[choice] = -1
                yield self._echo_chunk(choice, item.result), event_id(last)
            else:
                raise item

    def _take_logprobs(self, choice: int) -> dict[str, Any] | None:
        """The logprobs of choice ``choice``'s tokens not sent yet (None without logprobs); they count as sent."""
        if self.vocab is None:
            return None
        entries, self.pending[choice] = self.pending[choice], []
        offsets = self.offsets[choice]
        if offsets is None:
            return chat_logprobs(self.vocab, entries)
        return TextLogprobs(self.vocab).extend(entries, offsets).body()

    def _echo_chunk(self, choice: int, result: JobResult | None) -> dict[str, Any]:
        """The first chunk of an echoed choice: its prompt, with the prompt's logprobs when asked."""
        assert self.echoes is not None
        logprobs = None
        if self.vocab is not None and result is not None:
            logprobs = TextLogprobs(self.vocab).extend(result.prompt_logprobs or [], TextOffsets(self.vocab)).body()
        return chunk(self.record, choice, text=self.echoes[choice], logprobs=logprobs)

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
