"""The synchronous tpqueue client: validate generation requests and enqueue them as rq jobs.

Every request is validated (schema and deployment limits) before Redis is
touched. Jobs go on ``gen.<shard>`` for a session, ``batch`` without one,
serialized as JSON (never pickle), with explicit result/failure TTLs and a
``Retry`` that requeues at the front. Job ids are idempotency keys:
submitting an id that already exists returns a handle to the existing job.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from redis.exceptions import WatchError as _WatchError
from rq import Queue
from rq.exceptions import DuplicateJobError
from rq.job import Job, Retry
from rq.serializers import JSONSerializer

from common import keys
from common.errors import InvalidConfigError, InvalidRequestError, QueueFull
from common.jobs import GENERATE_FUNC, job_kwargs, queue_for, request_from_job_kwargs
from common.redis_conn import connect, redact_url
from common.results import ChatMessage
from common.schemas import GenerationRequest, check_limits, parse_request
from common.settings import Settings, get_settings

log = logging.getLogger(__name__)

_WAIT_FIRST_S = 0.01
_WAIT_CAP_S = 0.5
_BATCH_WATCH_ATTEMPTS = 5
# WATCH costs O(n^2) in Redis (6.2: ~11 ms for 1k keys, ~0.7 s for 10k), so only
# batches up to this size are guarded by it; larger ones rely on the EXISTS check.
_WATCH_MAX_KEYS = 1000


class JobHandle:
    """A submitted generation job.

    ``id`` is the rq job id (= ``request.request_id``), ``queue_name`` the rq
    queue it went to, ``request`` the validated request, and ``created``
    False when the id already existed and nothing was enqueued (then
    ``request`` and ``queue_name`` are the existing job's where readable).
    """

    __slots__ = ("_client", "id", "queue_name", "request", "created")

    def __init__(
        self, client: Client, job_id: str, queue_name: str, request: GenerationRequest, created: bool = True
    ) -> None:
        self._client = client
        self.id = job_id
        self.queue_name = queue_name
        self.request = request
        self.created = created

    def status(self) -> str:
        """The rq job status (``"queued"``, ``"started"``, ``"finished"``, ...), or ``"unknown"`` if gone."""
        raw = self._client.redis.hget(keys.rq_job_key(self.id), "status")
        return raw.decode() if raw else "unknown"

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, queue={self.queue_name!r}, created={self.created})"


class BatchHandle:
    """The jobs of one :meth:`Client.submit_batch` call, in submission order."""

    __slots__ = ("handles",)

    def __init__(self, handles: Iterable[JobHandle]) -> None:
        self.handles: tuple[JobHandle, ...] = tuple(handles)

    @property
    def ids(self) -> list[str]:
        """The job ids, in submission order."""
        return [h.id for h in self.handles]

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[JobHandle]:
        return iter(self.handles)

    def __repr__(self) -> str:
        return f"BatchHandle({len(self.handles)} jobs)"


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
        self._queues: dict[str, Queue] = {}
        log.info("tpqueue client for %s (%d shards)", redact_url(url), self.settings.num_shards)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the Redis connections."""
        self.redis.close()

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
            "messages": list(messages) if messages is not None and not isinstance(messages, (str, bytes)) else messages,
            "session_id": session_id,
            "sampling": sampling,
            "priority": priority,
            "deadline_unix_s": deadline_unix_s,
        }
        return self._checked(parse_request(data))

    def _checked(self, request: GenerationRequest, now: float | None = None) -> GenerationRequest:
        if request.request_id is None:
            request = request.model_copy(update={"request_id": uuid.uuid4().hex})
        check_limits(request, self.settings)
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
        **sampling: Any,
    ) -> JobHandle:
        """Validate one request and enqueue it; return its :class:`JobHandle`.

        Give ``prompt`` (text) or ``messages`` (chat turns), not both. Extra
        keyword arguments are :class:`~common.sampling.SamplingParams` fields
        (``temperature``, ``max_tokens``, ...). ``request_id`` (default: a new
        uuid4 hex) is the job id and an idempotency key: if that job already
        exists, its handle is returned (``created=False``) and nothing is
        enqueued. If the target queue holds ``max_queue_depth`` jobs, waits up
        to ``wait_s`` seconds for room, then raises :class:`QueueFull`.
        Raises :class:`InvalidRequestError` for a bad request, before any
        Redis command.
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
        try:
            # unique=True: rq checks the job key and writes the job in one Lua script.
            self._queue(queue_name).enqueue_call(
                GENERATE_FUNC, kwargs=job_kwargs(request), job_id=request.request_id,
                description=_description(request), unique=True, **self._job_options(),
            )
        except DuplicateJobError:
            return self._existing_handles([request])[0]
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
        jobs = Job.fetch_many(ids, connection=self.redis, serializer=JSONSerializer)  # type: ignore[arg-type]
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


def _description(request: GenerationRequest) -> str:
    # Short on purpose: rq's default description repeats the whole prompt in the job hash.
    return f"tpq generate {request.request_id} ({request.priority}, {request.input_chars} chars)"


def _check_wait(wait_s: float) -> float:
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not math.isfinite(wait_s) or wait_s < 0:
        raise InvalidRequestError(f"wait_s must be a finite number of seconds >= 0, got {wait_s!r}")
    return float(wait_s)

