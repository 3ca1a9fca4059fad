"""The synchronous tpqueue client: enqueue generation requests as rq jobs, then read what they produce.

Every request is validated (schema and deployment limits,
:mod:`producer.validation`) before Redis is touched; :mod:`producer.enqueue`
writes it into rq's queues. Job ids are idempotency keys: submitting an id
that already exists returns a handle to the existing job.

A :class:`~producer.handles.JobHandle` streams the job's tokens
(:mod:`producer.stream`: pub/sub checked against the durable token log, so
every token arrives once, in order, whenever the stream is opened), waits
for its rq result, reports its :class:`JobState` and cancels it. A
:class:`~producer.batches.BatchHandle` waits for many results at once with
multi-key XREAD over rq's result streams.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from common import keys
from common.errors import InvalidConfigError
from common.jobs import queue_for
from common.redis_conn import connect, redact_url
from common.results import ChatMessage
from common.schemas import GenerationRequest, parse_request
from common.settings import Settings, get_settings
from producer.batches import BatchHandle
from producer.cancel import cancel_job
from producer.enqueue import Enqueuer
from producer.handles import JobHandle
from producer.stream import TokenStream
from producer.validation import check_wait, checked, checked_batch, listed

log = logging.getLogger(__name__)


class Client:
    """Submit generation jobs to tpqueue's Redis queues.

    ``url`` defaults to ``settings.redis_url``; ``settings`` defaults to
    :func:`get_settings` (the ``TPQ_*`` environment). Raises
    :class:`InvalidConfigError` when no Redis URL is given either way. Use as
    a context manager, or call :meth:`close`. ``max_connections`` bounds
    its command connections (None: one per concurrent command; threads then
    wait for a free one); ``name`` names them in CLIENT LIST.
    """

    def __init__(self, url: str | None = None, settings: Settings | None = None, *,
                 max_connections: int | None = None, name: str = "tpq-producer") -> None:
        self.settings = settings if settings is not None else get_settings()
        url = url if url is not None else self.settings.redis_url
        if url is None:
            raise InvalidConfigError(
                "no Redis URL: pass Client(url=...) or set TPQ_REDIS_URL (e.g. redis://localhost:6379/0)"
            )
        self.url = url
        self.redis = connect(url, client_name=name, max_connections=max_connections)
        self._stream_redis: redis.Redis | None = None
        self._enqueuer = Enqueuer(self.redis, self.settings)
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

    # ------------------------------------------------------------ submitting

    def build_request(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[ChatMessage | Mapping[str, Any]] | None = None,
        session_id: str | None = None,
        request_id: str | None = None,
        priority: str | None = None,
        deadline_unix_s: float | None = None,
        prompt_token_ids: Iterable[int] | None = None,
        **sampling: Any,
    ) -> GenerationRequest:
        """The validated request :meth:`submit` would enqueue (with a generated id if none given).

        Give one of ``prompt`` (text), ``messages`` (chat turns) and
        ``prompt_token_ids`` (the model's token ids, used as they are). Extra
        keyword arguments are :class:`~common.sampling.SamplingParams` fields
        (``temperature``, ``max_tokens``, ...); a sampled request without a
        ``seed`` gets a random one, stored with the job, so that a run after
        a crash draws the same tokens. Raises :class:`InvalidRequestError`
        for anything invalid; touches no Redis.
        """
        data: dict[str, Any] = {
            "request_id": request_id if request_id is not None else uuid.uuid4().hex,
            "prompt": prompt,
            "messages": listed(messages),
            "session_id": session_id,
            "sampling": sampling,
            "priority": priority,
            "deadline_unix_s": deadline_unix_s,
        }
        if prompt_token_ids is not None:
            data["prompt_token_ids"] = listed(prompt_token_ids)
        return checked(parse_request(data), self.settings)

    def submit(self, prompt: str | None = None, *, wait_s: float = 0.0, subscribe: bool = False,
               **fields: Any) -> JobHandle:
        """Validate one request and enqueue it; return its :class:`JobHandle`.

        ``prompt`` and ``fields`` are those of :meth:`build_request`:
        ``messages``, ``session_id``, ``request_id``, ``priority``,
        ``deadline_unix_s`` and sampling fields (``temperature``,
        ``max_tokens``, ...). ``request_id`` (default: a new uuid4 hex) is
        the job id and an idempotency key: if that job already exists, its
        handle is returned (``created=False``) and nothing is enqueued. If
        the target queue holds ``max_queue_depth`` jobs, waits up to
        ``wait_s`` seconds for room, then raises :class:`QueueFull`. Raises
        :class:`InvalidRequestError` for a bad request, before any Redis
        command.

        ``subscribe=True`` subscribes to the job's token channel *before* the
        job is enqueued, so no worker can start it before the subscription
        holds; the next ``handle.stream()`` uses that subscription. This is
        an optimisation, not needed for correctness: ``stream()`` replays
        the job's durable token log first, so a stream opened later (even
        after the job finished) still yields every token once, in order.
        """
        request = self.build_request(prompt, **fields)
        wait_s = check_wait(wait_s)
        job_id = request.request_id
        assert job_id is not None
        queue_name = queue_for(request, self.settings.num_shards)
        if not self._enqueuer.admit(job_id, queue_name, wait_s):
            return self._existing_handles([request])[0]
        stream = self._open_stream(job_id).open() if subscribe else None
        try:
            created = self._enqueuer.enqueue(request, queue_name)
        except BaseException:
            if stream is not None:
                stream.close()
            raise
        handle = JobHandle(self, job_id, queue_name, request) if created else self._existing_handles([request])[0]
        handle._stream = stream
        return handle

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
        wait_s = check_wait(wait_s)
        batch = checked_batch(requests, self.settings)
        if not batch:
            return BatchHandle(())
        queues = self._enqueuer.enqueue_batch(batch, wait_s)
        existing = iter(self._existing_handles([r for r, queue in zip(batch, queues) if queue is None]))
        return BatchHandle(
            JobHandle(self, r.request_id, queue, r) if queue is not None else next(existing)  # type: ignore[arg-type]
            for r, queue in zip(batch, queues)
        )

    # ------------------------------------------------------------ jobs

    def job(self, job_id: str) -> JobHandle:
        """A handle to an existing job by id (submitted by any client or process).

        Raises :class:`JobNotFound` if there is no such job (or it expired),
        :class:`InvalidRequestError` for a malformed id or a job that holds
        no tpqueue request.
        """
        keys.validate_job_id(job_id)
        queue_name, request = self._enqueuer.fetch(job_id)
        return JobHandle(self, job_id, queue_name, request, created=False)

    def _existing_handles(self, requests: list[GenerationRequest]) -> list[JobHandle]:
        """Handles of jobs that already exist: their stored queue and request where readable."""
        return [JobHandle(self, submitted.request_id, queue_name, request, created=False)  # type: ignore[arg-type]
                for submitted, (queue_name, request) in zip(requests, self._enqueuer.existing(requests))]

    def _open_stream(self, job_id: str, *, start: int = 0, timeout: float | None = None) -> TokenStream:
        if self._stream_redis is None:
            # No silent retries on the subscriber: the stream must notice a drop to replay the log.
            self._stream_redis = connect(self.url, client_name="tpq-stream", retries=0)
        return TokenStream(self.redis, job_id, pubsub_conn=self._stream_redis, start=start, timeout=timeout)

    def _cancel(self, job_id: str) -> bool:
        """See :meth:`JobHandle.cancel`."""
        return cancel_job(self.redis, self.settings, job_id)
