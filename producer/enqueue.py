"""The rq side of submitting: enqueue one job or a whole batch, wait for room, and read back existing jobs.

Jobs go on ``gen.<shard>`` for a session, ``batch`` without one, serialized
as JSON (never pickle), with explicit result/failure TTLs and a ``Retry``
that requeues at the front. Job ids are idempotency keys: an id that
already exists is never enqueued again.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.exceptions import WatchError
from rq import Queue
from rq.exceptions import DeserializationError, DuplicateJobError, NoSuchJobError
from rq.job import Job, Retry
from rq.serializers import JSONSerializer

from common import keys
from common.errors import InvalidRequestError, JobNotFound, QueueFull
from common.jobs import GENERATE_FUNC, job_kwargs, queue_for, request_from_job_kwargs
from common.schemas import GenerationRequest
from common.settings import Settings

log = logging.getLogger(__name__)

_WAIT_FIRST_S = 0.01
_WAIT_CAP_S = 0.5
_BATCH_WATCH_ATTEMPTS = 5
# WATCH costs O(n^2) in Redis (6.2: ~11 ms for 1k keys, ~0.7 s for 10k), so only
# batches up to this size are guarded by it; larger ones rely on the EXISTS check.
_WATCH_MAX_KEYS = 1000

UNREADABLE_JOB_ERRORS = (DeserializationError, NoSuchJobError, ValueError, TypeError)
"""What rq raises for a job hash it cannot read: data that is not JSON (a pickle?), a corrupt field, or no data
at all (NoSuchJobError "Unexpected job format": a few fields written into a hash that a crashed Redis lost)."""


class Enqueuer:
    """Writes checked requests into rq's queues on ``conn``, and reads back the jobs that already exist."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self._queues: dict[str, Queue] = {}

    def admit(self, request_id: str, queue_name: str, wait_s: float) -> bool:
        """False when job ``request_id`` exists (enqueue nothing); True once ``queue_name`` has room for it.

        The existence check comes first: resubmitting a known id never fails
        with :class:`QueueFull`.
        """
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.exists(keys.rq_job_key(request_id))
            pipe.llen(keys.rq_queue_key(queue_name))
            exists, depth = pipe.execute()
        if exists:
            return False
        if depth >= self.settings.max_queue_depth:
            self.wait_for_room({queue_name: 1}, wait_s)
        return True

    def enqueue(self, request: GenerationRequest, queue_name: str) -> bool:
        """Enqueue one job on ``queue_name``; False when its id turned out to exist already."""
        assert request.request_id is not None
        try:
            # unique=True: rq checks the job key and writes the job in one Lua script.
            self._queue(queue_name).enqueue_call(
                GENERATE_FUNC, kwargs=job_kwargs(request), job_id=request.request_id,
                description=_description(request), unique=True, **self._job_options(),
            )
        except DuplicateJobError:
            return False
        # rq's unique enqueue is a Lua script that takes no pipeline: count it right after (tpq_jobs_enqueued_total)
        self.conn.hincrby(keys.job_counter("enqueued"), queue_name, 1)
        log.debug("enqueued job %s on %s", request.request_id, queue_name)
        return True

    def enqueue_batch(self, batch: list[GenerationRequest], wait_s: float) -> list[str | None]:
        """Enqueue every request of ``batch`` whose id is new, in one transaction: each one's queue (None: it existed).

        Retries when a job id is created by another client meanwhile (WATCH);
        raises :class:`InvalidRequestError` after 5 such attempts.
        """
        started = time.monotonic()
        for _attempt in range(_BATCH_WATCH_ATTEMPTS):
            queues = self._try_batch(batch, max(0.0, wait_s - (time.monotonic() - started)))
            if queues is not None:
                return queues
        raise InvalidRequestError(
            f"the batch's job ids kept being created by another client ({_BATCH_WATCH_ATTEMPTS} attempts); "
            "submit it again (existing ids are skipped)"
        )

    def _try_batch(self, batch: list[GenerationRequest], wait_s: float) -> list[str | None] | None:
        """One WATCH/MULTI/EXEC attempt; None when a watched job key changed (try again)."""
        job_keys = [keys.rq_job_key(r.request_id) for r in batch]  # type: ignore[arg-type]
        with self.conn.pipeline(transaction=True) as pipe:
            if len(job_keys) <= _WATCH_MAX_KEYS:
                pipe.watch(*job_keys)  # a job created under us from here on aborts the EXEC
            with self.conn.pipeline(transaction=False) as check:
                for key in job_keys:
                    check.exists(key)
                exists = check.execute()
            by_queue: dict[str, list[GenerationRequest]] = {}
            for request, found in zip(batch, exists):
                if not found:
                    by_queue.setdefault(queue_for(request, self.settings.num_shards), []).append(request)
            self.wait_for_room({q: len(rs) for q, rs in by_queue.items()}, wait_s)
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
            except WatchError:
                return None
        queue_of = {r.request_id: q for q, rs in by_queue.items() for r in rs}
        log.debug("enqueued %d of %d batch jobs on %d queues", len(queue_of), len(batch), len(by_queue))
        return [queue_of.get(r.request_id) for r in batch]  # type: ignore[arg-type]

    def wait_for_room(self, needed: dict[str, int], wait_s: float) -> None:
        """Return once every queue has room for ``needed[queue]`` more jobs; else raise :class:`QueueFull`."""
        limit = self.settings.max_queue_depth
        deadline = time.monotonic() + wait_s
        pause = _WAIT_FIRST_S
        while True:
            with self.conn.pipeline(transaction=False) as pipe:
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

    # ------------------------------------------------------------ jobs that exist

    def fetch(self, job_id: str) -> tuple[str, GenerationRequest]:
        """The queue and request of existing job ``job_id``.

        Raises :class:`JobNotFound` if there is no such job (or it expired),
        :class:`InvalidRequestError` for a job that holds no tpqueue request.
        """
        try:
            job = Job.fetch_many([job_id], connection=self.conn, serializer=JSONSerializer)[0]
            request = None if job is None else request_from_job_kwargs(job.kwargs)
        except InvalidRequestError:
            raise
        except UNREADABLE_JOB_ERRORS as exc:
            raise InvalidRequestError(
                f"job {job_id!r} holds no readable tpqueue request ({type(exc).__name__}); "
                "it was not submitted by a tpqueue client"
            ) from None
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in Redis: never submitted, or it expired", job_id=job_id)
        return job.origin, request  # type: ignore[return-value]

    def existing(self, requests: list[GenerationRequest]) -> list[tuple[str, GenerationRequest]]:
        """The queue and request of each job that already exists: the stored ones where readable, else the submitted."""
        if not requests:
            return []
        ids = [r.request_id for r in requests]
        try:
            jobs = Job.fetch_many(ids, connection=self.conn, serializer=JSONSerializer)  # type: ignore[arg-type]
        except UNREADABLE_JOB_ERRORS:  # one hash rq cannot read spoils the lot: read them one by one
            jobs = [self._readable_job(job_id) for job_id in ids]  # type: ignore[arg-type]
        found = []
        for submitted, job in zip(requests, jobs):
            queue_name, request = queue_for(submitted, self.settings.num_shards), submitted
            if job is not None:
                queue_name = job.origin or queue_name
                try:
                    request = request_from_job_kwargs(job.kwargs)
                except Exception:  # noqa: BLE001 - a foreign or corrupt job: keep the submitted request
                    log.warning("job %s exists but holds no readable tpqueue request", job.id)
            found.append((queue_name, request))
        return found

    def _readable_job(self, job_id: str) -> Job | None:
        """The rq job ``job_id``, or None when it is gone or rq cannot read its hash (logged)."""
        try:
            return Job.fetch(job_id, connection=self.conn, serializer=JSONSerializer)
        except NoSuchJobError:
            return None
        except UNREADABLE_JOB_ERRORS as exc:
            log.warning("job %s exists but rq cannot read it (%s)", job_id, type(exc).__name__)
            return None

    # ------------------------------------------------------------ helpers

    def _queue(self, name: str) -> Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = Queue(name, connection=self.conn, serializer=JSONSerializer)
        return queue

    def _job_options(self) -> dict[str, Any]:
        return {
            "result_ttl": self.settings.result_ttl_s,
            "failure_ttl": self.settings.failure_ttl_s,
            "retry": Retry(max=self.settings.job_retries, enqueue_at_front=True),
        }


def _description(request: GenerationRequest) -> str:
    # Short on purpose: rq's default description repeats the whole prompt in the job hash.
    return f"tpq generate {request.request_id} ({request.priority}, {request.input_chars} chars)"
