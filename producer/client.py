"""The synchronous tpqueue client: enqueue generation requests as rq jobs, then read what they produce.

Every request is validated (schema and deployment limits) before Redis is
touched. Jobs go on ``gen.<shard>`` for a session, ``batch`` without one,
serialized as JSON (never pickle), with explicit result/failure TTLs and a
``Retry`` that requeues at the front. Job ids are idempotency keys:
submitting an id that already exists returns a handle to the existing job.

A :class:`JobHandle` streams the job's tokens (:mod:`producer.stream`:
pub/sub checked against the durable token log, so every token arrives once,
in order, whenever the stream is opened), waits for its rq result, reports
its :class:`JobState` and cancels it. A :class:`BatchHandle` waits for many
results at once with multi-key XREAD over rq's result streams.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import redis
from redis.exceptions import WatchError as _WatchError
from rq import Queue
from rq.exceptions import DeserializationError, DuplicateJobError, NoSuchJobError
from rq.job import Job, Retry
from rq.serializers import JSONSerializer

from common import keys
from common.errors import InvalidConfigError, InvalidRequestError, JobNotFound, QueueFull, ResultTimeout, TpqError
from common.jobs import GENERATE_FUNC, LOG_FIELD, decode_stream_message, job_kwargs, queue_for, request_from_job_kwargs
from common.redis_conn import connect, redact_url
from common.results import ChatMessage, FinishReason, JobResult, StreamEnd
from common.schemas import GenerationRequest, check_limits, parse_request
from common.settings import Settings, get_settings
from common.token_log import queue_messages
from producer.stream import (
    IDLE_S,
    JobState,
    ResultWatch,
    TokenStream,
    check_timeout,
    job_state,
    result_timeout,
    xread_items,
)

log = logging.getLogger(__name__)

_WAIT_FIRST_S = 0.01
_WAIT_CAP_S = 0.5
_BATCH_WATCH_ATTEMPTS = 5
# WATCH costs O(n^2) in Redis (6.2: ~11 ms for 1k keys, ~0.7 s for 10k), so only
# batches up to this size are guarded by it; larger ones rely on the EXISTS check.
_WATCH_MAX_KEYS = 1000
_XREAD_KEYS = 500  # result streams per multi-key XREAD of a batch
_CANCEL_ATTEMPTS = 10


class JobHandle:
    """A submitted generation job.

    ``id`` is the rq job id (= ``request.request_id``), ``queue_name`` the rq
    queue it went to, ``request`` the validated request, and ``created``
    False when the id already existed and nothing was enqueued (then
    ``request`` and ``queue_name`` are the existing job's where readable).
    """

    __slots__ = ("_client", "id", "queue_name", "request", "created", "_stream")

    def __init__(
        self, client: Client, job_id: str, queue_name: str, request: GenerationRequest, created: bool = True
    ) -> None:
        self._client = client
        self.id = job_id
        self.queue_name = queue_name
        self.request = request
        self.created = created
        self._stream: TokenStream | None = None

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
        opened, self._stream = self._stream, None
        if opened is not None and start == 0:
            opened.timeout = timeout
            return opened
        if opened is not None:
            opened.close()
        return self._client._open_stream(self.id, start=start, timeout=timeout)

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job's :class:`JobResult` (``timeout`` seconds at most; None: forever).

        Raises :class:`JobFailed` (with the worker's message) for a failed
        job, :class:`JobCancelled` for a job cancelled while still queued,
        :class:`JobNotFound` for a job that is gone, and
        :class:`ResultTimeout` (naming the job and its status) on timeout.
        A running job that was cancelled returns its partial result with
        ``finish_reason == "cancelled"``.
        """
        return self._client._wait_result(self.id, timeout)

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

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, queue={self.queue_name!r}, created={self.created})"


Outcome = JobResult | TpqError
"""What a job of a batch came to: its :class:`JobResult`, or the error that says why there is none."""


class BatchHandle:
    """The jobs of one :meth:`Client.submit_batch` call, in submission order."""

    __slots__ = ("handles",)

    def __init__(self, handles: Iterable[JobHandle]) -> None:
        self.handles: tuple[JobHandle, ...] = tuple(handles)

    @property
    def ids(self) -> list[str]:
        """The job ids, in submission order."""
        return [h.id for h in self.handles]

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
        client = self.handles[0]._client
        watch = BatchWatch(self.handles, timeout)
        while watch.pending:
            if watch.status_due():
                yield from client._batch_status_pass(watch)
                continue
            if watch.timed_out():
                raise watch.timeout_error()
            yield from client._batch_wait_pass(watch)

    def wait(self, timeout: float | None = None) -> list[tuple[JobHandle, Outcome]]:
        """Wait for every job; ``(handle, outcome)`` pairs in submission order (see :meth:`results`)."""
        outcomes = {id(handle): outcome for handle, outcome in self.results(timeout)}
        return [(handle, outcomes[id(handle)]) for handle in self.handles]

    def progress(self) -> dict[JobState, int]:
        """How many of the jobs are in each :class:`JobState` now (every state listed, zeros included)."""
        counts = dict.fromkeys(JobState, 0)
        if self.handles:
            for raw in self.handles[0]._client._raw_statuses(self.ids):
                counts[job_state(raw)] += 1
        return counts

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[JobHandle]:
        return iter(self.handles)

    def __repr__(self) -> str:
        return f"BatchHandle({len(self.handles)} jobs)"


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
                job_id = _text(key)[len(keys.RQ_RESULT_PREFIX):]
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
    ms, _, seq = _text(entry_id).partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() and (seq or "0").isdigit() else (0, 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Client:
    """Submit generation jobs to tpqueue's Redis queues.

    ``url`` defaults to ``settings.redis_url``; ``settings`` defaults to
    :func:`get_settings` (the ``TPQ_*`` environment). Raises
    :class:`InvalidConfigError` when no Redis URL is given either way. Use as
    a context manager, or call :meth:`close`.
    """

    def __init__(self, url: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else get_settings()
        url = url if url is not None else self.settings.redis_url
        if url is None:
            raise InvalidConfigError(
                "no Redis URL: pass Client(url=...) or set TPQ_REDIS_URL (e.g. redis://localhost:6379/0)"
            )
        self.url = url
        self.redis = connect(url, client_name="tpq-producer")
        self._stream_redis: redis.Redis | None = None
        self._queues: dict[str, Queue] = {}
        log.info("tpqueue client for %s (%d shards)", redact_url(url), self.settings.num_shards)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the Redis connections."""
        self.redis.close()
        if self._stream_redis is not None:
            self._stream_redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({redact_url(self.url)!r})"

    # ------------------------------------------------------------ requests

    def build_request(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[ChatMessage | Mapping[str, Any]] | None = None,
        session_id: str | None = None,
        request_id: str | None = None,
        priority: str | None = None,
        deadline_unix_s: float | None = None,
        **sampling: Any,
    ) -> GenerationRequest:
        """The validated request :meth:`submit` would enqueue (with a generated id if none given).

        Raises :class:`InvalidRequestError` for anything invalid; touches no Redis.
        """
        data: dict[str, Any] = {
            "request_id": request_id if request_id is not None else uuid.uuid4().hex,
            "prompt": prompt,
            "messages": _listed(messages),
            "session_id": session_id,
            "sampling": sampling,
            "priority": priority,
            "deadline_unix_s": deadline_unix_s,
        }
        return self._checked(parse_request(data))

    def _checked(self, request: GenerationRequest, now: float | None = None) -> GenerationRequest:
        if request.request_id is None:
            request = request.model_copy(update={"request_id": uuid.uuid4().hex})
        if not request.sampling.greedy and request.sampling.seed is None:
            # Stored with the job, so a run after a crash (or a lost completion) draws the same tokens.
            seeded = request.sampling.model_copy(update={"seed": secrets.randbits(62)})
            request = request.model_copy(update={"sampling": seeded})
        request = check_limits(request, self.settings)
        deadline = request.deadline_unix_s
        if deadline is not None:
            now = time.time() if now is None else now
            if deadline <= now:
                raise InvalidRequestError(
                    f"deadline_unix_s {deadline} is {now - deadline:.3f} s in the past; "
                    "give a future Unix time (time.time() + seconds)"
                )
        return request

    # ------------------------------------------------------------ submit

    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[ChatMessage | Mapping[str, Any]] | None = None,
        session_id: str | None = None,
        request_id: str | None = None,
        priority: str | None = None,
        deadline_unix_s: float | None = None,
        wait_s: float = 0.0,
        subscribe: bool = False,
        **sampling: Any,
    ) -> JobHandle:
        """Validate one request and enqueue it; return its :class:`JobHandle`.

        Give ``prompt`` (text) or ``messages`` (chat turns), not both. Extra
        keyword arguments are :class:`~common.sampling.SamplingParams` fields
        (``temperature``, ``max_tokens``, ...); a sampled request without a
        ``seed`` gets a random one, stored with the job, so that a run after
        a crash draws the same tokens. ``request_id`` (default: a new
        uuid4 hex) is the job id and an idempotency key: if that job already
        exists, its handle is returned (``created=False``) and nothing is
        enqueued. If the target queue holds ``max_queue_depth`` jobs, waits up
        to ``wait_s`` seconds for room, then raises :class:`QueueFull`.
        Raises :class:`InvalidRequestError` for a bad request, before any
        Redis command.

        ``subscribe=True`` subscribes to the job's token channel *before* the
        job is enqueued, so no worker can start it before the subscription
        holds; the next ``handle.stream()`` uses that subscription. This is
        an optimisation, not needed for correctness: ``stream()`` replays
        the job's durable token log first, so a stream opened later (even
        after the job finished) still yields every token once, in order.
        """
        request = self.build_request(
            prompt, messages=messages, session_id=session_id, request_id=request_id,
            priority=priority, deadline_unix_s=deadline_unix_s, **sampling,
        )
        wait_s = _check_wait(wait_s)
        assert request.request_id is not None
        queue_name = queue_for(request, self.settings.num_shards)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.rq_job_key(request.request_id))
            pipe.llen(keys.rq_queue_key(queue_name))
            exists, depth = pipe.execute()
        if exists:  # before the depth check: resubmitting a known id never fails with QueueFull
            return self._existing_handles([request])[0]
        if depth >= self.settings.max_queue_depth:
            self._wait_for_room({queue_name: 1}, wait_s)
        stream = self._open_stream(request.request_id).open() if subscribe else None
        try:
            handle = self._enqueue(request, queue_name)
        except BaseException:
            if stream is not None:
                stream.close()
            raise
        handle._stream = stream
        return handle

    def _enqueue(self, request: GenerationRequest, queue_name: str) -> JobHandle:
        assert request.request_id is not None
        try:
            # unique=True: rq checks the job key and writes the job in one Lua script.
            self._queue(queue_name).enqueue_call(
                GENERATE_FUNC, kwargs=job_kwargs(request), job_id=request.request_id,
                description=_description(request), unique=True, **self._job_options(),
            )
        except DuplicateJobError:
            return self._existing_handles([request])[0]
        # rq's unique enqueue is a Lua script that takes no pipeline: count it right after (tpq_jobs_enqueued_total)
        self.redis.hincrby(keys.job_counter("enqueued"), queue_name, 1)
        log.debug("enqueued job %s on %s", request.request_id, queue_name)
        return JobHandle(self, request.request_id, queue_name, request)

    def submit_batch(
        self, requests: Iterable[GenerationRequest | Mapping[str, Any]], *, wait_s: float = 0.0
    ) -> BatchHandle:
        """Validate every request, then enqueue them all in one Redis transaction.

        Each item is a :class:`GenerationRequest` or a mapping of its fields
        (``{"prompt": ..., "session_id": ..., "sampling": {...}}``). Nothing is
        enqueued unless all are valid; an :class:`InvalidRequestError` names
        the index of the first bad one. Refuses more than
        ``settings.max_batch_size`` requests and repeated request ids. Ids that
        already exist as jobs are skipped (their handles have
        ``created=False``). Raises :class:`QueueFull` (after waiting up to
        ``wait_s``) if a target queue lacks room for its share of the batch.
        """
        wait_s = _check_wait(wait_s)
        batch = self._validate_batch(requests)
        if not batch:
            return BatchHandle(())
        started = time.monotonic()
        for _attempt in range(_BATCH_WATCH_ATTEMPTS):
            remaining = max(0.0, wait_s - (time.monotonic() - started))
            handles = self._try_enqueue_batch(batch, remaining)
            if handles is not None:
                return BatchHandle(handles)
        raise InvalidRequestError(
            f"the batch's job ids kept being created by another client ({_BATCH_WATCH_ATTEMPTS} attempts); "
            "submit it again (existing ids are skipped)"
        )

    def _validate_batch(self, requests: Iterable[GenerationRequest | Mapping[str, Any]]) -> list[GenerationRequest]:
        if isinstance(requests, (str, bytes, Mapping, GenerationRequest)):
            raise InvalidRequestError("submit_batch takes an iterable of requests (a list of dicts or GenerationRequest)")
        limit = self.settings.max_batch_size
        batch: list[GenerationRequest] = []
        first_index: dict[str, int] = {}
        now = time.time()
        for i, item in enumerate(requests):
            if i >= limit:
                raise InvalidRequestError(
                    f"a batch may hold at most {limit} requests (TPQ_MAX_BATCH_SIZE); split it"
                )
            data = dict(item) if isinstance(item, Mapping) else item
            try:
                request = self._checked(parse_request(data, what="request"), now=now)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"batch request {i}: {e}") from None
            assert request.request_id is not None
            if request.request_id in first_index:
                raise InvalidRequestError(
                    f"batch request {i}: request_id {request.request_id!r} repeats that of request "
                    f"{first_index[request.request_id]}; ids must be unique within a batch"
                )
            first_index[request.request_id] = i
            batch.append(request)
        return batch

    def _try_enqueue_batch(self, batch: list[GenerationRequest], wait_s: float) -> list[JobHandle] | None:
        """One WATCH/MULTI/EXEC attempt; None when a watched job key changed (try again)."""
        ids = [r.request_id for r in batch]
        job_keys = [keys.rq_job_key(i) for i in ids]  # type: ignore[arg-type]
        with self.redis.pipeline(transaction=True) as pipe:
            if len(job_keys) <= _WATCH_MAX_KEYS:
                pipe.watch(*job_keys)  # a job created under us from here on aborts the EXEC
            with self.redis.pipeline(transaction=False) as check:
                for key in job_keys:
                    check.exists(key)
                exists = check.execute()
            new = [r for r, found in zip(batch, exists) if not found]
            by_queue: dict[str, list[GenerationRequest]] = {}
            for request in new:
                by_queue.setdefault(queue_for(request, self.settings.num_shards), []).append(request)
            self._wait_for_room({q: len(rs) for q, rs in by_queue.items()}, wait_s)
            pipe.multi()
            options = self._job_options()
            for queue_name, requests in by_queue.items():
                datas = [
                    Queue.prepare_data(
                        GENERATE_FUNC, kwargs=job_kwargs(r), job_id=r.request_id,
                        description=_description(r), **options,
                    )
                    for r in requests
                ]
                self._queue(queue_name).enqueue_many(datas, pipeline=pipe)
                pipe.hincrby(keys.job_counter("enqueued"), queue_name, len(datas))
            try:
                pipe.execute()
            except _WatchError:
                return None
        queue_of = {r.request_id: q for q, rs in by_queue.items() for r in rs}
        existing = iter(self._existing_handles([r for r, found in zip(batch, exists) if found]))
        log.debug("enqueued %d of %d batch jobs on %d queues", len(new), len(batch), len(by_queue))
        return [
            JobHandle(self, r.request_id, queue_of[r.request_id], r) if r.request_id in queue_of else next(existing)  # type: ignore[arg-type]
            for r in batch
        ]

    # ------------------------------------------------------------ jobs

    def job(self, job_id: str) -> JobHandle:
        """A handle to an existing job by id (submitted by any client or process).

        Raises :class:`JobNotFound` if there is no such job (or it expired),
        :class:`InvalidRequestError` for a malformed id or a job that holds
        no tpqueue request.
        """
        keys.validate_job_id(job_id)
        try:
            job = Job.fetch_many([job_id], connection=self.redis, serializer=JSONSerializer)[0]
            request = None if job is None else request_from_job_kwargs(job.kwargs)
        except InvalidRequestError:
            raise
        except _UNREADABLE as exc:
            raise InvalidRequestError(
                f"job {job_id!r} holds no readable tpqueue request ({type(exc).__name__}); "
                "it was not submitted by a tpqueue client"
            ) from None
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in Redis: never submitted, or it expired", job_id=job_id)
        return JobHandle(self, job_id, job.origin, request, created=False)

    def _open_stream(self, job_id: str, *, start: int = 0, timeout: float | None = None) -> TokenStream:
        if self._stream_redis is None:
            # No silent retries on the subscriber: the stream must notice a drop to replay the log.
            self._stream_redis = connect(self.url, client_name="tpq-stream", retries=0)
        return TokenStream(self.redis, job_id, pubsub_conn=self._stream_redis, start=start, timeout=timeout)

    def _wait_result(self, job_id: str, timeout: float | None) -> JobResult:
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = ResultWatch(job_id)
        result_key, job_key = keys.rq_result_key(job_id), keys.rq_job_key(job_id)
        while True:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(job_key, "status")  # before the read: a FINISHED/FAILED seen here has its entry below
                pipe.xread({result_key: watch.last_id})
                raw_status, response = pipe.execute()
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
            _feed(watch, self.redis.xread({result_key: watch.last_id}, block=max(1, int(wait_s * 1000))))
            if isinstance(verdict := watch.verdict(), JobResult):
                return verdict

    def _cancel(self, job_id: str) -> bool:
        """See :meth:`JobHandle.cancel`: flag it; cancel it here if it is still in its queue."""
        job_key, log_key = keys.rq_job_key(job_id), keys.token_log(job_id)
        for _attempt in range(_CANCEL_ATTEMPTS):
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.watch(job_key, log_key)
                raw_status, origin = pipe.hmget(job_key, "status", "origin")
                state = job_state(raw_status)
                if state.is_terminal:
                    return False
                pipe.set(keys.cancel_flag(job_id), "1", ex=self.settings.result_ttl_s)
                if state is JobState.RUNNING or not self._still_in_queue(pipe, job_id, raw_status, origin):
                    return True  # a worker has it (or is taking it): it sees the flag and ends the job
                end = _cancel_end(job_id, pipe.xrevrange(log_key, count=1))
                try:
                    job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
                except _UNREADABLE as exc:
                    raise InvalidRequestError(
                        f"job {job_id!r} holds no readable tpqueue request ({type(exc).__name__}), so rq cannot "
                        "cancel it; a worker that takes it fails it"
                    ) from None
                pipe.multi()
                job.cancel(pipeline=pipe)  # status CANCELED, out of its queue, into rq's CanceledJobRegistry
                pipe.expire(job_key, self.settings.failure_ttl_s)  # rq would keep a cancelled job forever
                if origin is not None:  # counted for tpq_jobs_cancelled_queued_total
                    pipe.hincrby(keys.job_counter("cancelled"), _text(origin), 1)
                if end is not None:
                    queue_messages(pipe, [end], self.settings.token_log_maxlen, self.settings.token_log_ttl_s)
                try:
                    replies = pipe.execute(raise_on_error=False)
                except _WatchError:
                    continue  # a worker took it, or it changed: look again
                for reply in replies:
                    if isinstance(reply, Exception):
                        log.warning("cancelling job %s: a write was refused: %s", job_id, reply)
                log.debug("cancelled queued job %s", job_id)
                return True
        log.info("job %s kept changing while being cancelled; its worker will stop it (cancel flag set)", job_id)
        return True

    @staticmethod
    def _still_in_queue(pipe: Any, job_id: str, raw_status: bytes | None, origin: bytes | None) -> bool:
        """True if no worker can hold the job: in its rq queue (WATCHed from here), or deferred/scheduled."""
        if raw_status != b"queued":
            return True  # created, deferred or scheduled: in no queue a worker takes from
        if origin is None:
            return False
        queue_key = keys.rq_queue_key(origin.decode())
        pipe.watch(queue_key)  # a worker moving the id out of the queue now aborts the transaction
        return pipe.lpos(queue_key, job_id) is not None

    def _batch_status_pass(self, watch: BatchWatch) -> list[tuple[JobHandle, Outcome]]:
        ids = list(watch.pending)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.rq_job_key(job_id), "status")  # before the reads, as in _wait_result
            for chunk in watch.chunks():
                pipe.xread(chunk)
            replies = pipe.execute()
        states = {job_id: job_state(raw) for job_id, raw in zip(ids, replies)}
        return watch.feed_xread(replies[len(ids):], states)

    def _batch_wait_pass(self, watch: BatchWatch) -> list[tuple[JobHandle, Outcome]]:
        chunks = watch.chunks()
        if len(chunks) == 1:
            return watch.feed_xread([self.redis.xread(chunks[0], block=watch.block_ms())])
        with self.redis.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                pipe.xread(chunk)
            settled = watch.feed_xread(pipe.execute())
        if not settled:
            time.sleep(watch.quiet_pause())
        return settled

    def _raw_statuses(self, job_ids: list[str]) -> list[bytes | None]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.rq_job_key(job_id), "status")
            return pipe.execute()

    # ------------------------------------------------------------ helpers

    def _queue(self, name: str) -> Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = Queue(name, connection=self.redis, serializer=JSONSerializer)
        return queue

    def _job_options(self) -> dict[str, Any]:
        return {
            "result_ttl": self.settings.result_ttl_s,
            "failure_ttl": self.settings.failure_ttl_s,
            "retry": Retry(max=self.settings.job_retries, enqueue_at_front=True),
        }

    def _wait_for_room(self, needed: dict[str, int], wait_s: float) -> None:
        """Return once every queue has room for ``needed[queue]`` more jobs; else raise :class:`QueueFull`."""
        limit = self.settings.max_queue_depth
        deadline = time.monotonic() + wait_s
        pause = _WAIT_FIRST_S
        while True:
            with self.redis.pipeline(transaction=False) as pipe:
                for name in needed:
                    pipe.llen(keys.rq_queue_key(name))
                depths = dict(zip(needed, pipe.execute()))
            full = [(q, depths[q]) for q, n in needed.items() if depths[q] + n > limit]
            if not full:
                return
            left = deadline - time.monotonic()
            hopeless = any(needed[q] > limit for q, _ in full)
            if left <= 0 or hopeless:
                queue_name, depth = full[0]
                adding = f", adding {needed[queue_name]}" if needed[queue_name] > 1 else ""
                waited = f" after waiting {wait_s:g} s" if wait_s > 0 and not hopeless else ""
                raise QueueFull(
                    f"queue {queue_name!r} is full{waited}: {depth} jobs queued{adding}, limit "
                    f"{limit} (TPQ_MAX_QUEUE_DEPTH); retry later, pass wait_s=, or add workers",
                    queue_name=queue_name, depth=depth, limit=limit,
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, _WAIT_CAP_S)

    def _existing_handles(self, requests: list[GenerationRequest]) -> list[JobHandle]:
        """Handles of jobs that already exist: their stored queue and request where readable."""
        if not requests:
            return []
        ids = [r.request_id for r in requests]
        try:
            jobs = Job.fetch_many(ids, connection=self.redis, serializer=JSONSerializer)  # type: ignore[arg-type]
        except _UNREADABLE:  # one hash rq cannot read spoils the lot: read them one by one
            jobs = [self._readable_job(job_id) for job_id in ids]  # type: ignore[arg-type]
        handles = []
        for submitted, job in zip(requests, jobs):
            queue_name, request = queue_for(submitted, self.settings.num_shards), submitted
            if job is not None:
                queue_name = job.origin or queue_name
                try:
                    request = request_from_job_kwargs(job.kwargs)
                except Exception:  # noqa: BLE001 - a foreign or corrupt job: keep the submitted request
                    log.warning("job %s exists but holds no readable tpqueue request", job.id)
            handles.append(JobHandle(self, submitted.request_id, queue_name, request, created=False))  # type: ignore[arg-type]
        return handles

    def _readable_job(self, job_id: str) -> Job | None:
        """The rq job ``job_id``, or None when it is gone or rq cannot read its hash (logged)."""
        try:
            return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None
        except _UNREADABLE as exc:
            log.warning("job %s exists but rq cannot read it (%s)", job_id, type(exc).__name__)
            return None


# What rq raises for a job hash it cannot read: data that is not JSON (a pickle?), a corrupt field, or no data
# at all (NoSuchJobError "Unexpected job format": a few fields written into a hash that a crashed Redis lost).
_UNREADABLE = (DeserializationError, NoSuchJobError, ValueError, TypeError)


def _feed(watch: ResultWatch, response: Any) -> None:
    for _key, entries in xread_items(response):
        watch.feed(entries)


def _cancel_end(job_id: str, last: list[Any]) -> StreamEnd | None:
    """The end record a client writes for a job cancelled in its queue; None if its log already ended.

    ``num_tokens`` counts the tokens an earlier attempt already logged (a
    requeued job), so the end lands right after them.
    """
    num_tokens = 0
    if last:
        message = decode_stream_message(last[0][1][LOG_FIELD.encode()])
        if isinstance(message, StreamEnd):
            return None
        num_tokens = message.index + 1
    return StreamEnd(request_id=job_id, num_tokens=num_tokens, finish_reason=FinishReason.CANCELLED)


def _description(request: GenerationRequest) -> str:
    # Short on purpose: rq's default description repeats the whole prompt in the job hash.
    return f"tpq generate {request.request_id} ({request.priority}, {request.input_chars} chars)"


def _listed(messages: Any) -> Any:
    """``messages`` as a list when it is a sequence of messages; anything else as is, for the schema to refuse."""
    if isinstance(messages, Iterable) and not isinstance(messages, (str, bytes, Mapping)):
        return list(messages)
    return messages


def _check_wait(wait_s: float) -> float:
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not math.isfinite(wait_s) or wait_s < 0:
        raise InvalidRequestError(f"wait_s must be a finite number of seconds >= 0, got {wait_s!r}")
    return float(wait_s)

