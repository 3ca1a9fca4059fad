"""Recording a job FAILED when rq cannot read its hash (a corrupt field, a hostile payload).

rq's failure path (``Job._handle_failure``, ``Worker.handle_job_failure``)
needs a readable job. The worker (a claimed job it cannot read) and the
supervisor (an abandoned started job it cannot read) both end such a job
with what that path would write, so that clients, ``rq info`` and
rq-dashboard see a FAILED job with a clear message instead of one that stays
``started`` or ``queued`` forever.
"""
from __future__ import annotations

from typing import Any

import redis
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, utcformat

from common import keys

DEFAULT_FAILURE_TTL_S = 7 * 24 * 3600
"""The failure TTL of a job whose hash gives none that can be read (the default of ``TPQ_FAILURE_TTL_S``)."""


def failure_ttl_of(conn: redis.Redis, job_id: str, default: int = DEFAULT_FAILURE_TTL_S) -> int:
    """The ``failure_ttl`` field of ``job_id``'s hash (rq layout), or ``default`` when absent or not a number."""
    raw = conn.hget(keys.rq_job_key(job_id), "failure_ttl")
    try:
        ttl = int(raw) if raw is not None else default
    except ValueError:
        return default
    return ttl if ttl > 0 else default


def queue_unreadable_failure(pipe: Any, conn: redis.Redis, job_id: str, queue_name: str, message: str,
                             failure_ttl_s: int, worker_name: str) -> None:
    """Queue into ``pipe`` the writes that end ``job_id`` (its hash exists but cannot be read) as FAILED.

    Status ``failed`` and ``ended_at`` in the hash, the failure TTL on it, the
    id in ``queue_name``'s FailedJobRegistry, and a failure Result saying
    ``message`` (what clients read as the job's error).
    """
    job_key = keys.rq_job_key(job_id)
    pipe.hset(job_key, mapping={"status": JobStatus.FAILED.value, "ended_at": utcformat(now())})
    pipe.expire(job_key, failure_ttl_s)
    registry = FailedJobRegistry(queue_name, connection=conn, serializer=JSONSerializer)
    pipe.zadd(registry.key, {job_id: current_timestamp() + failure_ttl_s})
    bare = Job(job_id, connection=conn, serializer=JSONSerializer)  # Result.create_failure reads only its id
    Result.create_failure(bare, failure_ttl_s, exc_string=message, worker_name=worker_name, pipeline=pipe)
