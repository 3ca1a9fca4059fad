"""Every place tpqueue relies on rq's private internals (rq 2.12, pinned in pyproject.toml).

rq's public API covers one job per worker; tpqueue's worker runs many at once,
its supervisor requeues a dead worker's jobs before their TTL runs out, and
its client reads results without rq's per-entry serializer lookup. What that
needs of rq's internals lives here, each item named where it is used, and
``tests/unit/test_rq_internals.py`` pins the rq version and each reliance
against rq itself, so an rq upgrade fails there first.
"""
from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.repeat import Repeat
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, parse_composite_key, utcformat
from rq.worker import BaseWorker

from common import keys
from common.text import as_optional_text, as_text

# ------------------------------------------------------------------ the worker's execution slot and job results

class NoClientList:
    """A mixin for an rq ``BaseWorker`` (put it first) that names its connection but never runs CLIENT LIST.

    rq's ``BaseWorker.__init__`` calls the private ``_set_ip_address``, which
    looks the worker's address up in CLIENT LIST: every client of the server
    (addresses, users, commands), which tpqueue's Redis ACL user may not see.
    The worker's ``ip_address`` shows ``unknown``; a group's host is in
    ``tpq:group:<name>`` instead.
    """

    name: str
    ip_address: str

    def _set_ip_address(self, connection: Any) -> None:  # rq private: called by BaseWorker.__init__
        connection.client_setname(self.name)
        self.ip_address = "unknown"


@contextmanager
def execution_slot(worker: BaseWorker, execution: Execution | None = None) -> Iterator[None]:
    """Hold ``execution`` in ``worker``'s single execution slot for the block; empty it after.

    rq's ``BaseWorker.execution`` is the one execution a stock worker runs:
    ``prepare_execution`` fills it, and ``handle_job_success``,
    ``handle_job_failure`` and ``cleanup_execution`` read it (the latter
    deletes it). A worker with many jobs in flight sets it around each such call.
    """
    worker.execution = execution  # rq private
    try:
        yield
    finally:
        worker.execution = None


def set_job_result(job: Job, result: Any) -> None:
    """Give ``job`` the return value rq's success path stores as its result (rq private ``Job._result``)."""
    job._result = result


def queue_job_success(worker: BaseWorker, job: Job, queue: Queue, execution: Execution, pipeline: Any) -> None:
    """Queue into ``pipeline`` the writes of rq's ``BaseWorker.handle_job_success`` for ``job``; calls MULTI.

    rq's own method opens its pipeline itself and retries its transaction
    on a WatchError, so a caller cannot make the completion depend on
    other keys. This writes the same (dependents enqueued, the worker's
    counters, status FINISHED, the result with ``execution``'s id, the
    FinishedJobRegistry entry, the job's expiry, the execution deleted)
    into a pipeline the caller has WATCHed: put ``job.dependents_key``
    among the watched keys, set the result with :func:`set_job_result` and
    ``job.ended_at`` first, and call ``pipeline.execute()`` after.
    """
    queue.enqueue_dependents(job, pipeline=pipeline)  # reads while watching; may call MULTI itself
    if not pipeline.explicit_transaction:
        pipeline.multi()
    worker.increment_successful_job_count(pipeline=pipeline)
    worker.increment_total_working_time(job.ended_at - job.started_at, pipeline)
    result_ttl = job.get_result_ttl(worker.default_result_ttl)
    if result_ttl != 0:
        job._handle_success(result_ttl, pipeline=pipeline, worker_name=worker.name,  # rq private
                            execution_id=execution.id, execution_started_at=execution.created_at,
                            execution_ended_at=job.ended_at)
    if job.repeats_left is not None and job.repeats_left > 0:
        Repeat.schedule(job, queue, pipeline=pipeline)
    else:
        job.cleanup(result_ttl, pipeline=pipeline, remove_from_queue=False)
    with execution_slot(worker, execution):
        worker.cleanup_execution(job, pipeline=pipeline)


def listen_on(worker: BaseWorker, queues: list[Queue]) -> None:
    """Make ``worker`` listen on ``queues``: rq keeps a private reordered copy (``_ordered_queues``) beside ``queues``."""
    worker.queues = queues
    worker._ordered_queues = queues[:]  # rq private


def callback_names(job: Job) -> dict[str, str | None]:
    """The callback names ``job``'s hash gives (rq private attributes), by role: success, failure, stopped."""
    return {
        "success callback": job._success_callback_name,
        "failure callback": job._failure_callback_name,
        "stopped callback": job._stopped_callback_name,
    }


# ------------------------------------------------------------------ rq's Redis layout of queues and registries

def job_origins(conn: redis.Redis, job_ids: Iterable[str]) -> list[str | None]:
    """The queue each job was enqueued on (the ``origin`` field of its hash), None where it has none. One round trip."""
    with conn.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.rq_job_key(job_id), "origin")  # rq layout
        return [as_optional_text(origin) for origin in pipe.execute()]


def parse_execution_entry(member: bytes | str) -> tuple[str, str]:
    """``(job_id, execution_id)`` of a StartedJobRegistry member (rq layout: ``<job_id>:<execution_id>``)."""
    return parse_composite_key(as_text(member))


def execution_owners(conn: redis.Redis, executions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(worker_name, enqueued_at)`` of each ``(job_id, execution_id)``; ``""`` where unknown. One round trip.

    The worker name is the ``worker_name`` field of the execution hash
    (``Execution.key``), or of the job hash when the execution hash has
    expired (rq gives it the same TTL as the registry entry, so a dead
    worker's may be gone); ``enqueued_at`` is the job hash's. Read with
    HGET/HMGET instead of one fetch per job.
    """
    with conn.pipeline(transaction=False) as pipe:
        for job_id, execution_id in executions:
            pipe.hget(Execution(execution_id, job_id, conn).key, "worker_name")  # rq layout
            pipe.hmget(Job.key_for(job_id), ["worker_name", "enqueued_at"])  # rq layout
        fields = pipe.execute()
    owners = []
    for i in range(len(executions)):
        from_execution, (from_job, enqueued_at) = fields[2 * i], fields[2 * i + 1]
        worker = from_execution if from_execution is not None else from_job
        owners.append((as_optional_text(worker) or "", as_optional_text(enqueued_at) or ""))
    return owners


# ------------------------------------------------------------------ failure writes

DEFAULT_FAILURE_TTL_S = 7 * 24 * 3600
"""The failure TTL of a job whose hash gives none that can be read (the default of ``TPQ_FAILURE_TTL_S``)."""


def record_failure(job: Job, message: str, pipeline: Any, *, worker_name: str, execution_id: str | None) -> None:
    """Queue rq's failure record of ``job`` into ``pipeline``: its FailedJobRegistry entry and a failure Result.

    What rq's ``StartedJobRegistry.cleanup`` writes for an abandoned job
    (rq private ``Job._handle_failure``); the caller sets the status.
    """
    job._handle_failure(message, pipeline, worker_name=worker_name, execution_id=execution_id)


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

    rq's failure path (``Job._handle_failure``, ``Worker.handle_job_failure``)
    needs a readable job. The worker (a claimed job it cannot read) and the
    supervisor (an abandoned started job it cannot read) both end such a job
    with what that path would write, so that clients, ``rq info`` and
    rq-dashboard see a FAILED job with a clear message instead of one that
    stays ``started`` or ``queued`` forever: status ``failed`` and
    ``ended_at`` in the hash, the failure TTL on it, the id in
    ``queue_name``'s FailedJobRegistry, and a failure Result saying
    ``message`` (what clients read as the job's error).
    """
    job_key = keys.rq_job_key(job_id)
    pipe.hset(job_key, mapping={"status": JobStatus.FAILED.value, "ended_at": utcformat(now())})  # rq layout
    pipe.expire(job_key, failure_ttl_s)
    registry = FailedJobRegistry(queue_name, connection=conn, serializer=JSONSerializer)
    pipe.zadd(registry.key, {job_id: current_timestamp() + failure_ttl_s})  # rq layout: scored by expiry
    bare = Job(job_id, connection=conn, serializer=JSONSerializer)  # Result.create_failure reads only its id
    Result.create_failure(bare, failure_ttl_s, exc_string=message, worker_name=worker_name, pipeline=pipe)


# ------------------------------------------------------------------ result encoding (read by the client)

RESULT_DECODE_ERRORS = (ValueError, TypeError, zlib.error)
"""What :func:`read_result_entry` raises for an entry it cannot decode (ValueError: bad base64, JSON or UTF-8)."""

_SUCCESSFUL_TYPE = str(Result.Type.SUCCESSFUL.value).encode()


@dataclass(frozen=True, slots=True)
class ResultEntry:
    """One entry of rq's result stream ``rq:results:<job_id>``, decoded: its type, return value and error text."""

    type: Result.Type
    return_value: Any = None
    exc_string: str | None = None


def read_result_entry(job_id: str, entry_id: bytes | str, fields: dict[Any, Any]) -> ResultEntry:
    """Decode one entry of ``job_id``'s rq result stream, written with rq's JSON serializer; nothing is unpickled.

    A SUCCESSFUL entry's return value is base64 of the serializer's bytes
    (rq ``Result.serialize``); it is decoded here directly, which skips
    ``Result.restore``'s per-entry serializer lookup (that made a 5,000-job
    batch read about twice as slow). Other entry types go through
    ``Result.restore``. Raises one of :data:`RESULT_DECODE_ERRORS` for an
    entry that cannot be decoded (not JSON: a pickle?).
    """
    if fields.get(b"type") == _SUCCESSFUL_TYPE and b"return_value" in fields:  # rq layout
        return ResultEntry(Result.Type.SUCCESSFUL, json.loads(base64.b64decode(fields[b"return_value"])))
    result = Result.restore(job_id, as_text(entry_id), fields, connection=None,  # type: ignore[arg-type]
                            serializer=JSONSerializer)
    return ResultEntry(result.type, result.return_value, result.exc_string)
