"""Handles to submitted jobs: :class:`JobHandle` and its asyncio twin :class:`AsyncJobHandle`.

A handle streams its job's tokens (:mod:`producer.stream`), waits for its
rq result (:func:`producer.job_state.wait_result`), reports its
:class:`JobState` and cancels it. Both run the same plans; they differ only
in how they wait.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common import keys
from common.results import JobResult
from common.schemas import GenerationRequest
from producer.job_state import JobState, job_state, wait_result
from producer.redis_io import run, run_async
from producer.stream import AsyncTokenStream, TokenStream

if TYPE_CHECKING:
    from producer.async_client import AsyncClient
    from producer.client import Client


class _Handle:
    """The fields both handles have, and the hand-over of a stream ``submit(subscribe=True)`` opened."""

    __slots__ = ("_client", "id", "queue_name", "request", "created", "_stream")

    def __init__(self, client: Any, job_id: str, queue_name: str, request: GenerationRequest, created: bool,
                 stream: Any) -> None:
        self._client = client
        self.id = job_id
        self.queue_name = queue_name
        self.request = request
        self.created = created
        self._stream = stream

    def _stream_from(self, timeout: float | None, start: int) -> Any:
        """The stream ``submit(subscribe=True)`` opened (handed out once, for ``start`` 0), else a new one."""
        opened, self._stream = self._stream, None
        if opened is not None and start == 0:
            opened.timeout = timeout
            return opened
        if opened is not None:
            self._discard(opened)
        return self._client._open_stream(self.id, start=start, timeout=timeout)

    def _discard(self, stream: Any) -> None:
        """Let go of an opened stream that :meth:`_stream_from` does not hand out."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, queue={self.queue_name!r}, created={self.created})"


class JobHandle(_Handle):
    """A submitted generation job.

    ``id`` is the rq job id (= ``request.request_id``), ``queue_name`` the rq
    queue it went to, ``request`` the validated request, and ``created``
    False when the id already existed and nothing was enqueued (then
    ``request`` and ``queue_name`` are the existing job's where readable).
    """

    __slots__ = ()

    def __init__(
        self, client: Client, job_id: str, queue_name: str, request: GenerationRequest, created: bool = True
    ) -> None:
        super().__init__(client, job_id, queue_name, request, created, None)

    def status(self) -> JobState:
        """The job's :class:`JobState` now (a ``str`` enum: ``"queued"``, ``"running"``, ...), from rq's status.

        A running job that is cancelled, or whose deadline passes, still ends
        ``finished`` (its result's ``finish_reason`` says why); ``cancelled``
        means cancelled while queued. ``unknown``: no such job (or expired).
        """
        return job_state(self._client.redis.hget(keys.rq_job_key(self.id), "status"))

    def stream(self, timeout: float | None = None, *, start: int = 0) -> TokenStream:
        """Iterate the job's :class:`TokenEvent` s: each exactly once, in index order, then stop.

        Works whenever it is called, even after the job finished (the token
        log is replayed first). ``timeout`` bounds the wait for each next
        event (:class:`ResultTimeout`); ``start`` skips the tokens before
        that index (resume). Raises :class:`JobFailed` when the job fails.
        The returned :class:`TokenStream` has ``end`` (the
        :class:`StreamEnd`, with ``finish_reason``) once exhausted; close it
        if you stop early. See :class:`producer.stream.TokenStream`.
        """
        return self._stream_from(timeout, start)

    def _discard(self, stream: TokenStream) -> None:
        stream.close()

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job's :class:`JobResult` (``timeout`` seconds at most; None: forever).

        Raises :class:`JobFailed` (with the worker's message) for a failed
        job, :class:`JobCancelled` for a job cancelled while still queued,
        :class:`JobNotFound` for a job that is gone, and
        :class:`ResultTimeout` (naming the job and its status) on timeout.
        A running job that was cancelled returns its partial result with
        ``finish_reason == "cancelled"``.
        """
        return run(wait_result(self._client.redis, self.id, timeout))

    def cancel(self) -> bool:
        """Ask for the job to stop; True if it was still queued or running, False if already over or unknown.

        A queued job is cancelled here and now (rq ``Job.cancel``, and its
        token stream gets a ``cancelled`` end); a running one is stopped by
        its worker, which ends its stream and result with ``finish_reason ==
        "cancelled"``. Either way the stream ends cancelled exactly once.
        Raises :class:`InvalidRequestError` for a queued job whose hash is not
        a readable tpqueue job (written into Redis by something else).
        """
        return self._client._cancel(self.id)


class AsyncJobHandle(_Handle):
    """A submitted job, for asyncio code: the fields of :class:`producer.JobHandle`, awaitable methods."""

    __slots__ = ("_sync",)

    def __init__(self, client: AsyncClient, sync_handle: JobHandle, stream: AsyncTokenStream | None = None) -> None:
        super().__init__(client, sync_handle.id, sync_handle.queue_name, sync_handle.request, sync_handle.created,
                         stream)
        self._sync = sync_handle

    async def status(self) -> JobState:
        """The job's :class:`JobState` now (see :meth:`producer.JobHandle.status`)."""
        return job_state(await self._client.redis.hget(keys.rq_job_key(self.id), "status"))

    def stream(self, timeout: float | None = None, *, start: int = 0) -> AsyncTokenStream:
        """``async for event in handle.stream():`` every token event once, in order (see :meth:`producer.JobHandle.stream`)."""
        return self._stream_from(timeout, start)

    def _discard(self, stream: AsyncTokenStream) -> None:
        self._client._close_later(stream)  # closing needs an await: the client runs it in the background

    async def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the :class:`JobResult` (see :meth:`producer.JobHandle.result` for the errors)."""
        client = self._client
        return await run_async(wait_result(client.redis, self.id, timeout, client._results.xread))

    async def cancel(self) -> bool:
        """Cancel the job (see :meth:`producer.JobHandle.cancel`); runs rq's ``Job.cancel`` in a thread."""
        return await self._client.run_sync(self._sync.cancel)
