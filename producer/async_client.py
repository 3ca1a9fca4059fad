"""The asyncio tpqueue client: :class:`AsyncClient`, the twin of :class:`producer.Client`.

rq has no asyncio API, so everything that goes through rq (``submit``,
``submit_batch``, ``job``, ``cancel``) runs the synchronous client in a
worker thread with :func:`asyncio.to_thread`, on its own synchronous Redis
connection. Everything that only reads (token streams, results, statuses,
batch progress) runs on ``redis.asyncio``: pub/sub plus XRANGE for streams,
XREAD BLOCK for results. The asyncio handles and streams run the same
plans as the synchronous ones (:mod:`producer.redis_io`), so the rules,
errors and Redis commands are the same.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio

from common.redis_conn import async_connect
from common.results import ChatMessage
from common.schemas import GenerationRequest
from common.settings import Settings
from producer.batches import AsyncBatchHandle, BatchHandle
from producer.client import Client
from producer.handles import AsyncJobHandle
from producer.stream import AsyncTokenStream


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
