"""The supervisor's rq bookkeeping: requeue a dead or hung worker's started jobs, and rq's own cleanups.

The rq internals it relies on (rq 2.12, pinned) come from
:mod:`common.rq_internals`: the layout of a StartedJobRegistry entry
(``<job_id>:<execution_id>``) and of the fields that name its worker, and
rq's failure record (``Job._handle_failure``).

Requeueing mirrors ``StartedJobRegistry.cleanup`` (rq's abandoned-job path)
for one execution at a time: a job with ``retries_left > 0`` goes through
``Job.retry`` (``retries_left`` decremented, enqueued at the front when the
job was enqueued with ``Retry(enqueue_at_front=True)``); otherwise it
becomes FAILED with a message saying why; a job whose abandoned attempt
streamed a token is requeued without using up a retry (see
:func:`_requeue_or_fail`). Unlike ``cleanup`` it works before
the execution's TTL runs out (a hung worker keeps refreshing it), gives a
clear reason, and claims each execution in a WATCH/MULTI transaction with
the requeue, so a job is requeued once even when rq's cleanup or the job's
worker touches it at the same moment, and never lost if this process dies.

Job callbacks never run here: :class:`SupervisorJob` skips failure callbacks,
since a supervisor must not import code named in a job hash.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp
from rq.worker_registration import clean_worker_registry

from common.rq_internals import (
    callback_names, execution_owners, failure_ttl_of, parse_execution_entry, queue_unreadable_failure, record_failure,
)
from common.text import as_text
from common.token_log import attempt_made_progress

log = logging.getLogger(__name__)

CLAIM_ATTEMPTS = 5
"""Times a requeue transaction is retried when a watched key changed under it."""


class SupervisorJob(Job):
    """An rq ``Job`` that never runs a callback: the supervisor imports no code a job hash names."""

    def execute_failure_callback(self, death_penalty_class: Any, *exc_info: Any) -> None:
        self._skip("failure callback")

    def execute_stopped_callback(self, death_penalty_class: Any) -> None:
        self._skip("stopped callback")

    def _skip(self, role: str) -> None:
        if name := callback_names(self)[role]:
            log.warning("job %s: not running its %s %r in the supervisor", self.id, role, name)


class Outcome(str, Enum):
    """What happened to one abandoned job."""

    REQUEUED = "requeued"
    FAILED = "failed"  # out of retries
    UNREADABLE = "unreadable"  # FAILED because its hash cannot be read (rq could not requeue it)
    GONE = "gone"  # someone else finished, requeued or deleted it first


MOVED = (Outcome.REQUEUED, Outcome.FAILED, Outcome.UNREADABLE)  # the outcomes that took the job off its worker


@dataclass(frozen=True)
class StartedEntry:
    """One execution in a queue's StartedJobRegistry, with the rq worker that runs it."""

    queue_name: str
    composite_key: str
    job_id: str
    execution_id: str
    worker_name: str
    enqueued_at: str


@dataclass
class RequeueReport:
    """The job ids a requeue pass requeued and failed (``unreadable``: those failed as unreadable), and their queues."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unreadable: set[str] = field(default_factory=set)
    queues: dict[str, str] = field(default_factory=dict)

    def add(self, job_id: str, outcome: Outcome | None, queue_name: str | None = None) -> None:
        if queue_name is not None and outcome in MOVED:
            self.queues[job_id] = queue_name
        if outcome is Outcome.REQUEUED:
            self.requeued.append(job_id)
        elif outcome in (Outcome.FAILED, Outcome.UNREADABLE):
            self.failed.append(job_id)
            if outcome is Outcome.UNREADABLE:
                self.unreadable.add(job_id)


def queue(conn: redis.Redis, name: str) -> Queue:
    """The rq queue ``name`` as the supervisor uses it: JSON serializer, :class:`SupervisorJob`."""
    return Queue(name, connection=conn, serializer=JSONSerializer, job_class=SupervisorJob)


def started_registry(conn: redis.Redis, name: str) -> StartedJobRegistry:
    """Queue ``name``'s StartedJobRegistry, with :class:`SupervisorJob` and the JSON serializer."""
    return StartedJobRegistry(name, connection=conn, job_class=SupervisorJob, serializer=JSONSerializer)


# ------------------------------------------------------------------ finding a worker's jobs


def started_entries(conn: redis.Redis, queue_names: Iterable[str]) -> list[StartedEntry]:
    """Every execution in the StartedJobRegistry of ``queue_names``, with its worker's name.

    Two round trips in all (see :func:`common.rq_internals.execution_owners`
    for where the worker name comes from).
    """
    names = list(queue_names)
    with conn.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.zrange(started_registry(conn, name).key, 0, -1)
        members = pipe.execute()
    found = [(name, as_text(m)) for name, ms in zip(names, members) for m in ms]
    parsed = [(name, ck, *parse_execution_entry(ck)) for name, ck in found]
    owners = execution_owners(conn, [(job_id, execution_id) for _name, _ck, job_id, execution_id in parsed])
    return [StartedEntry(name, ck, job_id, execution_id, worker, enqueued_at)
            for (name, ck, job_id, execution_id), (worker, enqueued_at) in zip(parsed, owners)]


def requeue_worker_jobs(
    conn: redis.Redis, queue_names: Iterable[str], worker_name: str, reason: str
) -> RequeueReport:
    """Requeue (or fail, when out of retries) every started job of rq worker ``worker_name`` now.

    Looks in the StartedJobRegistry of every queue in ``queue_names``.
    ``reason`` says why the worker's jobs are abandoned; it is logged and
    becomes part of the failure message of jobs with no retries left. Jobs
    of one queue are requeued newest first, so the oldest ends at the front.
    """
    report = RequeueReport()
    mine = [e for e in started_entries(conn, queue_names) if e.worker_name == worker_name]
    queues = {name: queue(conn, name) for name in {e.queue_name for e in mine}}
    for entry in sorted(mine, key=lambda e: e.enqueued_at, reverse=True):
        report.add(entry.job_id, abandon_execution(conn, entry, reason, queues[entry.queue_name]), entry.queue_name)
    return report


# ------------------------------------------------------------------ abandoning one job


def abandon_execution(
    conn: redis.Redis, entry: StartedEntry, reason: str, rq_queue: Queue | None = None
) -> Outcome | None:
    """Requeue or fail the job of one started execution, unless someone else already did (GONE).

    ``rq_queue`` is ``entry``'s queue (made with :func:`queue`) when the caller has it at hand.

    Returns None when the job kept changing under the transaction
    :data:`CLAIM_ATTEMPTS` times (a later pass tries again).
    """
    registry_key = started_registry(conn, entry.queue_name).key

    def still_held(pipe: Any) -> bool:
        return pipe.zscore(registry_key, entry.composite_key) is not None

    def release(pipe: Any, job: Job | None) -> None:
        pipe.zrem(registry_key, entry.composite_key)
        if job is not None:
            Execution(entry.execution_id, entry.job_id, conn).delete(job=job, pipeline=pipe)

    rq_queue = rq_queue if rq_queue is not None else queue(conn, entry.queue_name)
    return _abandon(conn, entry.job_id, rq_queue, reason, registry_key, still_held, release,
                    worker_name=entry.worker_name, execution_id=entry.execution_id)


def _abandon(
    conn: redis.Redis, job_id: str, rq_queue: Queue, reason: str, claim_key: str,
    still_held: Callable[[Any], bool], release: Callable[[Any, Job | None], None],
    *, worker_name: str = "", execution_id: str | None = None,
) -> Outcome | None:
    """Claim ``job_id`` (still held in ``claim_key``) and requeue or fail it, in one transaction."""
    for _ in range(CLAIM_ATTEMPTS):
        with conn.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(claim_key, Job.key_for(job_id))
                if not still_held(pipe):
                    return Outcome.GONE
                job, unreadable = _fetch(conn, job_id)
                failure_ttl_s = failure_ttl_of(conn, job_id) if unreadable else 0
                progressed = job is not None and attempt_made_progress(conn, job_id)
                pipe.multi()
                release(pipe, job)
                if unreadable:
                    message = f"the job cannot be read ({unreadable}); {reason}"
                    queue_unreadable_failure(pipe, conn, job_id, rq_queue.name, message, failure_ttl_s, worker_name)
                    pipe.execute()
                    return Outcome.UNREADABLE
                if job is None:
                    pipe.execute()
                    return Outcome.GONE
                outcome = _requeue_or_fail(job, rq_queue, pipe, reason, worker_name, execution_id, progressed)
                pipe.execute()
            except redis.WatchError:
                continue
        if outcome is Outcome.FAILED:
            rq_queue.enqueue_dependents(job)  # as rq's cleanup does (tpqueue jobs have none)
        return outcome
    log.warning("job %s: changed under %d requeue attempts; leaving it for the next pass", job_id, CLAIM_ATTEMPTS)
    return None


def _fetch(conn: redis.Redis, job_id: str) -> tuple[Job | None, str | None]:
    """``(job, None)``; ``(None, None)`` when it has no hash; ``(None, why)`` when its hash cannot be read."""
    try:
        return SupervisorJob.fetch(job_id, connection=conn, serializer=JSONSerializer), None
    except redis.RedisError:
        raise  # Redis trouble ends the pass; the entry stays for the next one
    except NoSuchJobError:
        log.warning("job %s: its hash is gone (expired or deleted); dropping its started entry", job_id)
        return None, None
    except Exception as exc:  # noqa: BLE001 - a corrupt or hostile field: rq cannot requeue it, so it fails
        why = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("job %s: cannot read it (%s); marking it FAILED", job_id, why)
        return None, why


def _requeue_or_fail(
    job: Job, rq_queue: Queue, pipe: Any, reason: str, worker_name: str, execution_id: str | None,
    progressed: bool,
) -> Outcome:
    """The writes of rq's abandoned-job path, into ``pipe`` (already in MULTI).

    A job whose abandoned attempt ``progressed`` (logged a token) is requeued
    without using up a retry: it was not what brought its group down, or not
    before making progress, which it can do only ``max_tokens`` times.
    """
    if progressed:
        job.retries_left = (job.retries_left or 0) + 1  # Job.retry takes one back: this requeue costs nothing
    if job.retries_left and job.retries_left > 0:
        job.retry(rq_queue, pipe)
        return Outcome.REQUEUED
    message = f"AbandonedJobError: {reason}; the job has no retries left, so it is FAILED instead of requeued"
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    record_failure(job, message, pipe, worker_name=worker_name, execution_id=execution_id)
    return Outcome.FAILED


# ------------------------------------------------------------------ rq's own cleanups


def cleanup_expired(conn: redis.Redis, queue_names: Iterable[str]) -> int:
    """Run rq's ``StartedJobRegistry.cleanup`` on each queue that has expired started jobs; how many there were.

    One round trip finds the queues with expired entries (score = last
    execution heartbeat + TTL, in the past); rq then requeues those with
    retries left and fails the rest with ``AbandonedJobError``.
    """
    names = list(queue_names)
    now = current_timestamp()
    with conn.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.zcount(started_registry(conn, name).key, 0, now)
        counts = pipe.execute()
    for name, count in zip(names, counts):
        if count:
            _fail_unreadable_expired(conn, name, now)
            started_registry(conn, name).cleanup(timestamp=now)
    return sum(counts)


def _fail_unreadable_expired(conn: redis.Redis, queue_name: str, now: float) -> None:
    """Fail the expired started jobs whose hash rq cannot read (a corrupt field), through :func:`_abandon`.

    rq's cleanup raises on the first such hash, which would end the pass
    (and the supervisor) and leave every other expired job of the queue behind.
    """
    key = started_registry(conn, queue_name).key
    for member in conn.zrangebyscore(key, 0, now):  # scored by expiry
        job_id, execution_id = parse_execution_entry(member)
        if conn.exists(Job.key_for(job_id)) and _fetch(conn, job_id)[1] is not None:
            entry = StartedEntry(queue_name, as_text(member), job_id, execution_id, worker_name="", enqueued_at="")
            abandon_execution(conn, entry, "its rq heartbeat expired (its worker died or hung)")


def clean_queues(conn: redis.Redis, queue_names: Iterable[str]) -> int:
    """rq's periodic maintenance for each queue whose maintenance lock is free; how many stuck jobs it moved.

    Per queue, under rq's own maintenance lock (the one workers take):
    ``rq.registry.clean_registries`` (expired finished, failed and started
    entries), ``clean_worker_registry`` (dead workers), and the
    intermediate-queue cleanup of :func:`clean_intermediate_queue`.
    """
    moved = 0
    for name in queue_names:
        rq_queue = queue(conn, name)
        if not rq_queue.acquire_maintenance_lock():
            continue
        try:
            clean_registries(rq_queue)
            clean_worker_registry(rq_queue)
            moved += clean_intermediate_queue(conn, name)
        finally:
            rq_queue.release_maintenance_lock()
    return moved


def clean_intermediate_queue(conn: redis.Redis, queue_name: str) -> int:
    """Requeue (or fail) jobs stuck over a minute in rq's intermediate list of ``queue_name``; how many.

    rq moves a job id there when a worker dequeues it from a single queue
    and removes it when the job starts; an id that stays, and is not in the
    StartedJobRegistry, belongs to a worker that died in between. rq's own
    ``IntermediateQueue.cleanup`` needs a worker object; this does the same
    with rq's ``IntermediateQueue`` first-seen bookkeeping and the
    abandoned-job path above.
    """
    rq_queue = queue(conn, queue_name)
    intermediate = IntermediateQueue(rq_queue.key, connection=conn)
    job_ids = intermediate.get_job_ids()
    if not job_ids:
        return 0
    started = set(started_registry(conn, queue_name).get_job_ids(cleanup=False))
    moved = 0
    for job_id in job_ids:
        if job_id in started or intermediate.set_first_seen(job_id) or not intermediate.should_be_cleaned_up(job_id):
            continue
        outcome = _abandon(
            conn, job_id, rq_queue, "the job was stuck in rq's intermediate queue for over a minute "
            "(its worker died between dequeueing and starting it)", intermediate.key,
            lambda pipe, j=job_id: j in {as_text(x) for x in pipe.lrange(intermediate.key, 0, -1)},
            lambda pipe, job, j=job_id: pipe.lrem(intermediate.key, 1, j),
        )
        moved += outcome in MOVED
    return moved

