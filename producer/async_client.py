"""The asyncio tpqueue client: :class:`AsyncClient`, the twin of :class:`producer.Client`.

rq has no asyncio API, so everything that goes through rq (``submit``,
``submit_batch``, ``job``, ``cancel``) runs the synchronous client in a
worker thread (its own few: :data:`SYNC_THREADS`), on its own synchronous Redis
connection. Everything that only reads (token streams, results, statuses,
batch progress) runs on ``redis.asyncio``: pub/sub plus XRANGE for streams,
XREAD BLOCK for results. The asyncio handles and streams run the same
plans as the synchronous ones (:mod:`producer.redis_io`), so the rules,
errors and Redis commands are the same.

Its connections are few and fixed, however many jobs it streams or awaits
(a gateway serves hundreds of streams on them): ``TPQ_CLIENT_POOL_SIZE``
(3) for commands, one pub/sub connection that every stream shares
(:class:`producer.pubsub_mux.PubSubHub`), one for every blocking result
wait (:class:`producer.result_waiter.ResultWaiter`), and
:data:`SYNC_POOL_SIZE` for the rq calls its threads make.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import redis.asyncio

from common.redis_conn import async_connect
from common.results import ChatMessage
from common.schemas import GenerationRequest
from common.settings import Settings
from producer.batches import AsyncBatchHandle, BatchHandle
from producer.client import Client
from producer.handles import AsyncJobHandle
from producer.pubsub_mux import PubSubHub
from producer.result_waiter import ResultWaiter
from producer.stream import AsyncTokenStream

T = TypeVar("T")

SYNC_THREADS = 2
"""Worker threads that run the client's rq calls (submit, job, cancel)."""
SYNC_POOL_SIZE = SYNC_THREADS + 1
"""Connections of the synchronous client those threads use. An enqueue holds two at once (a WATCH pipeline
and a read beside it), so one more than the threads means one of them can always go on: no deadlock."""


class AsyncClient:
    """Submit generation jobs and read their tokens and results from asyncio code.

    Same arguments and errors as :class:`producer.Client`. rq has no asyncio
    API: ``submit``, ``submit_batch``, ``job`` and ``cancel`` run rq's
    synchronous calls in one of its worker threads (:meth:`run_sync`) on a
    synchronous connection; streams and results use ``redis.asyncio``.
    Use ``async with AsyncClient(url) as client:`` or ``await client.aclose()``.
    ``name`` names its connections in CLIENT LIST: ``<name>`` (commands),
    ``<name>-stream``, ``<name>-results`` and ``<name>-rq``.
    """

    def __init__(self, url: str | None = None, settings: Settings | None = None, *,
                 name: str = "tpq-producer-async") -> None:
        self._sync = Client(url, settings, max_connections=SYNC_POOL_SIZE, name=f"{name}-rq")
        self.settings = self._sync.settings
        self.url = self._sync.url
        self.redis: redis.asyncio.Redis = async_connect(self.url, client_name=name,
                                                        max_connections=self.settings.client_pool_size)
        # No silent retries on the subscriber: a stream must notice a drop to replay the log.
        self._stream_redis = async_connect(self.url, client_name=f"{name}-stream", retries=0)
        self._streams = PubSubHub(self._stream_redis)
        self._results = ResultWaiter(async_connect(self.url, client_name=f"{name}-results"))
        self._closing: set[asyncio.Task] = set()
        self._threads = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix=f"{name}-rq")

    async def run_sync(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in one of the client's worker threads (the synchronous pool's users)."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, partial(function, *args, **kwargs))

    @property
    def sync_redis(self) -> redis.Redis:
        """The synchronous connection (a pool of :data:`SYNC_POOL_SIZE`) for work that must run in a thread."""
        return self._sync.redis

    async def aclose(self) -> None:
        """Close the Redis connections."""
        await self._streams.aclose()
        await self._results.aclose()
        await self.redis.aclose()
        await self._stream_redis.aclose()
        await self.run_sync(self._sync.close)
        self._threads.shutdown(wait=False)

    def _close_later(self, stream: AsyncTokenStream) -> None:
        """Close ``stream`` in the background (a handle let go of it where it cannot await)."""
        task = asyncio.get_running_loop().create_task(stream.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

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
            handle = await self.run_sync(
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
        batch: BatchHandle = await self.run_sync(self._sync.submit_batch, list(requests), wait_s=wait_s)
        return AsyncBatchHandle(self, (AsyncJobHandle(self, h) for h in batch.handles))

    async def job(self, job_id: str) -> AsyncJobHandle:
        """A handle to an existing job by id (see :meth:`producer.Client.job`)."""
        return AsyncJobHandle(self, await self.run_sync(self._sync.job, job_id))

    # ------------------------------------------------------------ reading

    def _open_stream(self, job_id: str, *, start: int = 0, timeout: float | None = None) -> AsyncTokenStream:
        return AsyncTokenStream(self.redis, job_id, pubsub_conn=self._streams, start=start, timeout=timeout)
