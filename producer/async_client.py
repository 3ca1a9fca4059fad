"""The asyncio tpqueue client: :class:`AsyncClient`, the twin of :class:`producer.Client`.

rq has no asyncio API, so everything that goes through rq (``submit``,
``submit_batch``, ``job``, ``cancel``) runs the synchronous client in a
worker thread with :func:`asyncio.to_thread`, on its own synchronous Redis
connection. Everything that only reads (token streams, results, statuses,
batch progress) runs on ``redis.asyncio``: pub/sub plus XRANGE for streams,
XREAD BLOCK for results. The rules, errors and Redis commands are the same
as the synchronous client's.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import redis.asyncio

from common import keys
from common.redis_conn import async_connect
from common.results import ChatMessage, JobResult
from common.schemas import GenerationRequest
from common.settings import Settings
from producer.client import BatchHandle, BatchWatch, Client, JobHandle, Outcome, _feed
from producer.stream import IDLE_S, AsyncTokenStream, JobState, ResultWatch, check_timeout, job_state, result_timeout


class AsyncJobHandle:
    """A submitted job, for asyncio code: same fields as :class:`producer.JobHandle`, awaitable methods."""

    __slots__ = ("_client", "_sync", "_stream")

    def __init__(self, client: AsyncClient, sync_handle: JobHandle, stream: AsyncTokenStream | None = None) -> None:
        self._client = client
        self._sync = sync_handle
        self._stream = stream

    @property
    def id(self) -> str:
        """The rq job id (= the request id)."""
        return self._sync.id

    @property
    def queue_name(self) -> str:
        """The rq queue the job went to."""
        return self._sync.queue_name

    @property
    def request(self) -> GenerationRequest:
        """The validated request (the existing job's when ``created`` is False)."""
        return self._sync.request

    @property
    def created(self) -> bool:
        """False when the id already existed and nothing was enqueued."""
        return self._sync.created

    async def status(self) -> JobState:
        """The job's :class:`JobState` now (see :meth:`producer.JobHandle.status`)."""
        return job_state(await self._client.redis.hget(keys.rq_job_key(self.id), "status"))

    def stream(self, timeout: float | None = None, *, start: int = 0) -> AsyncTokenStream:
        """``async for event in handle.stream():`` every token event once, in order (see :meth:`producer.JobHandle.stream`)."""
        opened, self._stream = self._stream, None
        if opened is not None and start == 0:
            opened.timeout = timeout
            return opened
        return self._client._open_stream(self.id, start=start, timeout=timeout)

    async def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the :class:`JobResult` (see :meth:`producer.JobHandle.result` for the errors)."""
        return await self._client._wait_result(self.id, timeout)

    async def cancel(self) -> bool:
        """Cancel the job (see :meth:`producer.JobHandle.cancel`); runs rq's ``Job.cancel`` in a thread."""
        return await asyncio.to_thread(self._sync.cancel)

    def __repr__(self) -> str:
        return f"AsyncJobHandle(id={self.id!r}, queue={self.queue_name!r}, created={self.created})"


class AsyncBatchHandle:
    """The jobs of one :meth:`AsyncClient.submit_batch` call, in submission order."""

    __slots__ = ("_client", "handles")

    def __init__(self, client: AsyncClient, handles: Iterable[AsyncJobHandle]) -> None:
        self._client = client
        self.handles: tuple[AsyncJobHandle, ...] = tuple(handles)

    @property
    def ids(self) -> list[str]:
        """The job ids, in submission order."""
        return [h.id for h in self.handles]

    async def results(self, timeout: float | None = None) -> AsyncIterator[tuple[AsyncJobHandle, Outcome]]:
        """``async for handle, outcome in batch.results():`` in completion order (see :meth:`producer.BatchHandle.results`)."""
        watch = BatchWatch(self.handles, timeout)
        while watch.pending:
            if watch.status_due():
                settled = await self._client._batch_status_pass(watch)
            elif watch.timed_out():
                raise watch.timeout_error()
            else:
                settled = await self._client._batch_wait_pass(watch)
            for pair in settled:
                yield pair

    async def wait(self, timeout: float | None = None) -> list[tuple[AsyncJobHandle, Outcome]]:
        """Wait for every job; ``(handle, outcome)`` pairs in submission order."""
        outcomes = {id(handle): outcome async for handle, outcome in self.results(timeout)}
        return [(handle, outcomes[id(handle)]) for handle in self.handles]

    async def progress(self) -> dict[JobState, int]:
        """How many of the jobs are in each :class:`JobState` now (zeros included)."""
        counts = dict.fromkeys(JobState, 0)
        for raw in await self._client._raw_statuses(self.ids):
            counts[job_state(raw)] += 1
        return counts

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[AsyncJobHandle]:
        return iter(self.handles)

    def __repr__(self) -> str:
        return f"AsyncBatchHandle({len(self.handles)} jobs)"


class AsyncClient:
    """Submit generation jobs and read their tokens and results from asyncio code.

    Same arguments and errors as :class:`producer.Client`. rq has no asyncio
    API: ``submit``, ``submit_batch``, ``job`` and ``cancel`` run rq's
    synchronous calls in a worker thread (:func:`asyncio.to_thread`) on a
    synchronous connection; streams and results use ``redis.asyncio``.
    Use ``async with AsyncClient(url) as client:`` or ``await client.aclose()``.
    """

    def __init__(self, url: str | None = None, settings: Settings | None = None) -> None:
        self._sync = Client(url, settings)
        self.settings = self._sync.settings
        self.url = self._sync.url
        self.redis: redis.asyncio.Redis = async_connect(self.url, client_name="tpq-producer-async")
        self._stream_redis: redis.asyncio.Redis | None = None

    async def aclose(self) -> None:
        """Close the Redis connections."""
        await self.redis.aclose()
        if self._stream_redis is not None:
            await self._stream_redis.aclose()
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"Async{self._sync!r}"

    def build_request(self, prompt: str | None = None, **fields: Any) -> GenerationRequest:
        """The validated request :meth:`submit` would enqueue (no I/O); see :meth:`producer.Client.build_request`."""
        return self._sync.build_request(prompt, **fields)

    async def submit(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[ChatMessage | Mapping[str, Any]] | None = None,
        request_id: str | None = None,
        subscribe: bool = False,
        **fields: Any,
    ) -> AsyncJobHandle:
        """Validate and enqueue one request (see :meth:`producer.Client.submit`); rq runs in a thread.

        ``subscribe=True`` subscribes (on ``redis.asyncio``) before the job
        is enqueued; as with the synchronous client it is an optimisation,
        since a stream replays the token log first.
        """
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        stream = await self._open_stream(request_id).open() if subscribe else None
        try:
            handle = await asyncio.to_thread(
                self._sync.submit, prompt, messages=messages, request_id=request_id, **fields
            )
        except BaseException:
            if stream is not None:
                await stream.aclose()
            raise
        return AsyncJobHandle(self, handle, stream)

    async def submit_batch(
        self, requests: Iterable[GenerationRequest | Mapping[str, Any]], *, wait_s: float = 0.0
    ) -> AsyncBatchHandle:
        """Validate and enqueue many requests in one transaction (see :meth:`producer.Client.submit_batch`)."""
        batch: BatchHandle = await asyncio.to_thread(self._sync.submit_batch, list(requests), wait_s=wait_s)
        return AsyncBatchHandle(self, (AsyncJobHandle(self, h) for h in batch.handles))

    async def job(self, job_id: str) -> AsyncJobHandle:
        """A handle to an existing job by id (see :meth:`producer.Client.job`)."""
        return AsyncJobHandle(self, await asyncio.to_thread(self._sync.job, job_id))

    # ------------------------------------------------------------ reading

    def _open_stream(self, job_id: str, *, start: int = 0, timeout: float | None = None) -> AsyncTokenStream:
        if self._stream_redis is None:
            self._stream_redis = async_connect(self.url, client_name="tpq-stream", retries=0)
        return AsyncTokenStream(self.redis, job_id, pubsub_conn=self._stream_redis, start=start, timeout=timeout)

    async def _wait_result(self, job_id: str, timeout: float | None) -> JobResult:
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = ResultWatch(job_id)
        result_key, job_key = keys.rq_result_key(job_id), keys.rq_job_key(job_id)
        while True:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(job_key, "status")
                pipe.xread({result_key: watch.last_id})
                raw_status, response = await pipe.execute()
            _feed(watch, response)
            state = job_state(raw_status)
            verdict = watch.verdict(state)
            if isinstance(verdict, JobResult):
                return verdict
            if verdict is not None:
                raise verdict
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise result_timeout(job_id, state, timeout)  # type: ignore[arg-type]
            wait_s = IDLE_S if left is None else min(IDLE_S, left)
            _feed(watch, await self.redis.xread({result_key: watch.last_id}, block=max(1, int(wait_s * 1000))))
            if isinstance(verdict := watch.verdict(), JobResult):
                return verdict

    async def _batch_status_pass(self, watch: BatchWatch) -> list[tuple[Any, Outcome]]:
        ids = list(watch.pending)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.rq_job_key(job_id), "status")
            for chunk in watch.chunks():
                pipe.xread(chunk)
            replies = await pipe.execute()
        states = {job_id: job_state(raw) for job_id, raw in zip(ids, replies)}
        return watch.feed_xread(replies[len(ids):], states)

    async def _batch_wait_pass(self, watch: BatchWatch) -> list[tuple[Any, Outcome]]:
        chunks = watch.chunks()
        if len(chunks) == 1:
            return watch.feed_xread([await self.redis.xread(chunks[0], block=watch.block_ms())])
        async with self.redis.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                pipe.xread(chunk)
            settled = watch.feed_xread(await pipe.execute())
        if not settled:
            await asyncio.sleep(watch.quiet_pause())
        return settled

    async def _raw_statuses(self, job_ids: list[str]) -> list[bytes | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.rq_job_key(job_id), "status")
            return await pipe.execute()
