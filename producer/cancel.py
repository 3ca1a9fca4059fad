"""Cancelling a job from a client: flag it for its worker, and cancel it here if it is still in its queue."""
from __future__ import annotations

import logging
from typing import Any

import redis
from redis.exceptions import WatchError
from rq.job import Job
from rq.serializers import JSONSerializer

from common import keys
from common.errors import InvalidRequestError
from common.results import FinishReason, StreamEnd
from common.settings import Settings
from common.text import as_text
from common.token_log import decode_log, queue_messages
from producer.enqueue import UNREADABLE_JOB_ERRORS
from producer.job_state import JobState, job_state

log = logging.getLogger(__name__)

_CANCEL_ATTEMPTS = 10


def cancel_job(conn: redis.Redis, settings: Settings, job_id: str) -> bool:
    """Ask job ``job_id`` to stop; True if it was still queued or running, False if already over or unknown.

    Sets the job's cancel flag, which its worker (if one has it) sees and
    ends the job with ``finish_reason == "cancelled"``. A job still in its
    queue is cancelled here and now, in one transaction: rq's ``Job.cancel``,
    the expiry rq would not set, the ``cancelled`` end of its token stream.
    Raises :class:`InvalidRequestError` for a queued job whose hash is not a
    readable tpqueue job (written into Redis by something else).
    """
    job_key, log_key = keys.rq_job_key(job_id), keys.token_log(job_id)
    for _attempt in range(_CANCEL_ATTEMPTS):
        with conn.pipeline(transaction=True) as pipe:
            pipe.watch(job_key, log_key)
            raw_status, origin = pipe.hmget(job_key, "status", "origin")
            state = job_state(raw_status)
            if state.is_terminal:
                return False
            pipe.set(keys.cancel_flag(job_id), "1", ex=settings.result_ttl_s)
            if state is JobState.RUNNING or not _still_in_queue(pipe, job_id, raw_status, origin):
                return True  # a worker has it (or is taking it): it sees the flag and ends the job
            end = _cancel_end(job_id, pipe.xrevrange(log_key, count=1))
            try:
                job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
            except UNREADABLE_JOB_ERRORS as exc:
                raise InvalidRequestError(
                    f"job {job_id!r} holds no readable tpqueue request ({type(exc).__name__}), so rq cannot "
                    "cancel it; a worker that takes it fails it"
                ) from None
            pipe.multi()
            job.cancel(pipeline=pipe)  # status CANCELED, out of its queue, into rq's CanceledJobRegistry
            pipe.expire(job_key, settings.failure_ttl_s)  # rq would keep a cancelled job forever
            if origin is not None:  # counted for tpq_jobs_cancelled_queued_total
                pipe.hincrby(keys.job_counter("cancelled"), as_text(origin), 1)
            if end is not None:
                queue_messages(pipe, [end], settings.token_log_maxlen, settings.token_log_ttl_s)
            try:
                replies = pipe.execute(raise_on_error=False)
            except WatchError:
                continue  # a worker took it, or it changed: look again
            for reply in replies:
                if isinstance(reply, Exception):
                    log.warning("cancelling job %s: a write was refused: %s", job_id, reply)
            log.debug("cancelled queued job %s", job_id)
            return True
    log.info("job %s kept changing while being cancelled; its worker will stop it (cancel flag set)", job_id)
    return True


def _still_in_queue(pipe: Any, job_id: str, raw_status: bytes | None, origin: bytes | None) -> bool:
    """True if no worker can hold the job: in its rq queue (WATCHed from here), or deferred/scheduled."""
    if raw_status != b"queued":
        return True  # created, deferred or scheduled: in no queue a worker takes from
    if origin is None:
        return False
    queue_key = keys.rq_queue_key(as_text(origin))
    pipe.watch(queue_key)  # a worker moving the id out of the queue now aborts the transaction
    return pipe.lpos(queue_key, job_id) is not None


def _cancel_end(job_id: str, last: list[Any]) -> StreamEnd | None:
    """The end record a client writes for a job cancelled in its queue; None if its log already ended.

    ``num_tokens`` counts the tokens an earlier attempt already logged (a
    requeued job), so the end lands right after them.
    """
    num_tokens = 0
    if last:
        message = decode_log(last[:1])[0]
        if isinstance(message, StreamEnd):
            return None
        num_tokens = message.index + 1
    return StreamEnd(request_id=job_id, num_tokens=num_tokens, finish_reason=FinishReason.CANCELLED)
