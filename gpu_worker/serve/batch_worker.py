"""Rank 0's rq identity: a worker with a batch of jobs in flight, kept in rq's own bookkeeping.

rq's one-job-at-a-time ``work()`` loop is replaced by a batch of jobs in
flight at once, each started, kept alive and finished through rq's own
bookkeeping so that ``rq info`` and rq-dashboard tell the truth. What that
needs of rq's private internals (the worker's single execution slot, a
job's result, the success writes, the failure write of an unreadable job)
comes from :mod:`common.rq_internals`. The claim script moves ids out of
rq's queues (``rq:queue:<name>``, a list of job ids) into the group's
claimed list; :func:`common.claims.return_claimed` puts back what a crashed
earlier run claimed but never started.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus

from common import keys
from common.claims import claimed_job_id
from common.errors import TpqError
from common.groups import FENCED_FIELD
from common.rq_internals import (
    NoClientList, execution_slot, listen_on, queue_job_success, queue_unreadable_failure, set_job_result,
)
from common.text import as_text
from gpu_worker.serve.allow_list import MAX_SHOWN_CHARS, AllowListedJob

log = logging.getLogger(__name__)


# KEYS[1]: the group's claimed list; KEYS[2]: the group's registration hash; KEYS[3..]: rq queue keys, most
# urgent first. ARGV: most ids to take, this incarnation (JSON-encoded, as registered), the fence field, the
# incarnation as written in the fence. Moves up to ARGV[1] job ids, front first, from the queues into the
# claimed list in one atomic step, so an id is always in a queue, in the claimed list, or (once started) in
# rq's StartedJobRegistry. An incarnation the supervisor has fenced (or that another incarnation replaced)
# takes nothing and gets {'fenced'}: it cannot take back jobs the supervisor has just requeued.
_CLAIM_SCRIPT = """
local current = redis.call('HGET', KEYS[2], 'incarnation')
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[4] or (current and current ~= ARGV[2]) then
  return {'fenced'}
end
local taken = {}
local limit = tonumber(ARGV[1])
for i = 3, #KEYS do
  while #taken < 2 * limit do
    local id = redis.call('LMOVE', KEYS[i], KEYS[1], 'LEFT', 'RIGHT')
    if not id then break end
    taken[#taken + 1] = KEYS[i]
    taken[#taken + 1] = id
  end
  if #taken >= 2 * limit then break end
end
return taken
"""


class ClaimRefused(TpqError):
    """This incarnation of the group was fenced (or replaced): Redis refused to hand it jobs."""


class Claimed:
    """A job taken off its queue: readable (``job`` set) or not (``error`` says why)."""

    __slots__ = ("job_id", "queue", "job", "error")

    def __init__(self, job_id: str, queue: Queue, job: Job | None, error: str | None) -> None:
        self.job_id, self.queue, self.job, self.error = job_id, queue, job, error


class Started:
    """A job rq knows as started by this worker: its queue, its execution and its attempt number."""

    __slots__ = ("job", "queue", "execution", "attempt")

    def __init__(self, job: Job, queue: Queue, execution: Execution, attempt: int) -> None:
        self.job, self.queue, self.execution, self.attempt = job, queue, execution, attempt


class BatchWorker(NoClientList, BaseWorker):
    """An rq worker with many jobs in flight, driven by the caller (its ``work()`` is never used).

    ``claim`` takes job ids off the queues into the group's claimed list,
    ``start`` makes rq record a job as started by this worker, ``keep_alive``
    refreshes every started job's registry entry (call it more often than
    ``job_ttl_s``), and ``succeed`` / ``fail`` / ``requeue`` finish a job.
    Not thread-safe: use it from one thread.
    """

    def __init__(self, connection: Any, group: str, incarnation: str, queue_names: list[str], job_ttl_s: int) -> None:
        self.group = keys.validate_group_name(group)
        self.incarnation = incarnation
        self.job_ttl_s = max(1, int(job_ttl_s))
        self.claimed_key = keys.claimed_jobs(group)
        super().__init__(
            [Queue(name, connection=connection, serializer=JSONSerializer) for name in queue_names or [keys.BATCH_QUEUE]],
            name=f"tpq-{group}-{incarnation}", connection=connection, serializer=JSONSerializer,
            job_class=AllowListedJob, worker_ttl=max(10, 3 * self.job_ttl_s),
        )
        self._claim = connection.register_script(_CLAIM_SCRIPT)
        self.started: dict[str, Started] = {}

    # -- identity ------------------------------------------------------------
    def execute_job(self, job: Job, queue: Queue) -> None:  # BaseWorker's abstract hook; work() is not used
        raise NotImplementedError("BatchWorker runs jobs in batches through start()/succeed(), not execute_job()")

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.job_ttl_s

    def set_queues(self, queue_names: list[str]) -> None:
        """Listen on ``queue_names`` from now on (rq's worker hash shows them)."""
        if [q.name for q in self.queues] == queue_names:
            return
        listen_on(self, [Queue(name, connection=self.connection, serializer=JSONSerializer) for name in queue_names])
        self.connection.hset(self.key, "queues", ",".join(queue_names))

    def register(self) -> None:
        """Announce this worker to rq (``rq info`` lists it) as idle."""
        self.register_birth()
        self.set_state(WorkerStatus.IDLE)

    def unregister(self) -> None:
        self.register_death()

    # -- taking jobs ---------------------------------------------------------
    def claim(self, queue_names: list[str], limit: int) -> list[Claimed]:
        """Move up to ``limit`` job ids off ``queue_names`` (in that order of urgency) and fetch their jobs.

        Two round trips: the claim script, then every claimed job's hash in one pipeline.
        """
        if limit <= 0 or not queue_names:
            return []
        flat = self._claim(keys=[self.claimed_key, keys.group_info(self.group), *map(keys.rq_queue_key, queue_names)],
                           args=[limit, json.dumps(self.incarnation), FENCED_FIELD, self.incarnation])
        if len(flat) == 1:
            raise ClaimRefused(f"group {self.group} incarnation {self.incarnation} is fenced: it may take no job")
        taken = []
        for i in range(0, len(flat), 2):
            queue_name, raw_id = as_text(flat[i])[len(keys.RQ_QUEUE_PREFIX):], flat[i + 1]
            job_id = claimed_job_id(raw_id)
            if job_id is None:  # nothing rq could finish or tell a client about: forget it
                self.connection.lrem(self.claimed_key, 1, raw_id)
                log.error("queue %s held %s, which is not a tpqueue job id; dropped it", queue_name,
                          repr(raw_id)[:MAX_SHOWN_CHARS])
                continue
            taken.append((job_id, queue_name))
        return self._fetch_all(taken)

    def _fetch_all(self, taken: list[tuple[str, str]]) -> list[Claimed]:
        """Each ``(job_id, queue_name)``'s job, read from its hash (one pipeline), or why it cannot be read."""
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id, _queue_name in taken:
                pipe.hgetall(keys.rq_job_key(job_id))
            hashes = pipe.execute(raise_on_error=False)  # one job's bad key (WRONGTYPE) fails that job only
        claimed = []
        for (job_id, queue_name), raw in zip(taken, hashes):
            queue = Queue(queue_name, connection=self.connection, serializer=JSONSerializer)
            job = AllowListedJob(job_id, connection=self.connection, serializer=JSONSerializer)
            try:
                if isinstance(raw, Exception):
                    raise raw
                if not raw:
                    raise NoSuchJobError(f"No such job: {job.key}")  # what rq's Job.fetch raises
                job.restore(raw)
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable job hash
                claimed.append(Claimed(job_id, queue, None, f"{type(exc).__name__}: {exc}"))
                continue
            claimed.append(Claimed(job_id, queue, job, None))
        return claimed

    def start_again(self, job: Job, queue: Queue, logged: int = 0) -> Started:
        """Record ``job``, which this worker still runs, as started anew; its earlier execution is dropped.

        For a job that came back through a queue while it runs here: rq's
        cleanup requeued it (its started entry expired while the group was
        slow), or a crashed Redis lost its hash and its client submitted it
        again. Either way Redis no longer says that this worker runs it, and
        a crash of the group would leave it in no queue and no registry.
        """
        old = self.started.pop(job.id, None)
        if old is not None:
            with self.connection.pipeline(transaction=True) as pipe, execution_slot(self, old.execution):
                pipe.multi()
                self.cleanup_execution(old.job, pipeline=pipe)
                pipe.execute()
        return self.start(job, queue, logged=logged)

    def drop_claim(self, job_id: str) -> None:
        """Forget a claimed id whose job hash is gone (nothing rq could finish)."""
        self.connection.lrem(self.claimed_key, 1, job_id)

    def fail_unreadable(self, job_id: str, queue: Queue, message: str, failure_ttl: int) -> bool:
        """End a claimed job whose hash rq cannot read as FAILED with ``message``; False (only dropped) if it has no hash.

        rq's own failure path needs a readable job, so this writes what it
        would (:func:`common.rq_internals.queue_unreadable_failure`).
        """
        exists = bool(self.connection.exists(keys.rq_job_key(job_id)))
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.lrem(self.claimed_key, 1, job_id)
            if exists:
                queue_unreadable_failure(pipe, self.connection, job_id, queue.name, message, failure_ttl, self.name)
            pipe.execute()
        return exists

    def start(self, job: Job, queue: Queue, logged: int = 0) -> Started:
        """Record ``job`` as started by this worker (status STARTED, an Execution in its StartedJobRegistry).

        ``logged``: the log position this attempt writes first (the messages
        an earlier attempt already logged), kept in the job hash so that
        whoever requeues the job after a crash can tell whether this attempt
        made progress: whether the log holds that position
        (:func:`common.token_log.attempt_made_progress`).
        """
        with execution_slot(self):
            execution = self.prepare_execution(job)  # rq: creates the Execution, sets the slot
            self.prepare_job_execution(job)  # rq: status STARTED, started_at, worker_name
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.lrem(self.claimed_key, 1, job.id)
            # The whole hash, not only the fields that changed: a Redis that crashed and came back without its
            # last second may have lost the job since we claimed it, and writing single fields would leave a
            # stub that neither rq nor a client can read. Written whole, the job exists again, as started here.
            job.save(pipeline=pipe, include_meta=False)
            pipe.hincrby(job.key, keys.JOB_ATTEMPTS_FIELD, 1)
            pipe.hset(job.key, keys.JOB_LOGGED_AT_START_FIELD, logged)
            _, _, attempt, _ = pipe.execute()
        started = self.started[job.id] = Started(job, queue, execution, int(attempt))
        return started

    # -- keeping them alive --------------------------------------------------
    def keep_alive(self) -> None:
        """Refresh the worker's and every started job's rq heartbeat in one pipeline."""
        with self.connection.pipeline(transaction=False) as pipe:
            self.heartbeat(self.worker_ttl, pipeline=pipe)
            for started in self.started.values():
                started.execution.heartbeat(started.job.started_job_registry, self.job_ttl_s, pipeline=pipe)
            pipe.execute()
        self.set_state(WorkerStatus.BUSY if self.started else WorkerStatus.IDLE)

    # -- finishing them ------------------------------------------------------
    def succeed(self, job_id: str, result: Any, *, watch: Sequence[str] = (),
                provided: Callable[[], bool] | None = None) -> bool:
        """Finish a started job with ``result`` (JSON-safe): FINISHED, result stored, registries updated.

        With ``provided``: only if it returns True, checked and completed in
        one transaction that WATCHes ``watch`` (the keys it reads). A change
        to them between the check and the completion (or a redis-py retry of
        the completion onto a Redis that restarted meanwhile) aborts the
        transaction, and the check runs again. Returns False, with nothing
        written and the job still started here, when ``provided`` fails.
        """
        started = self.started[job_id]
        job = started.job
        ended_before = job.ended_at
        set_job_result(job, result)
        job.ended_at = now()
        with self.connection.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*watch, job.dependents_key)
                    if provided is not None and not provided():
                        pipe.reset()
                        set_job_result(job, None)
                        job.ended_at = ended_before
                        return False
                    queue_job_success(self, job, started.queue, started.execution, pipe)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        del self.started[job_id]
        return True

    def fail(self, job: Job, queue: Queue, message: str, *, retry: bool) -> None:
        """Fail ``job`` (started or only claimed) with ``message``; with ``retry``, rq's Retry may requeue it.

        ``retry=False`` is for jobs that would fail again (a bad request, a
        forbidden function): they end FAILED at once.
        """
        started = self.started.pop(job.id, None)
        if not retry:
            job.retries_left = 0
        job.ended_at = now()
        if job.started_at is None:
            job.started_at = job.ended_at
        with execution_slot(self, started.execution if started else None):
            self.handle_job_failure(job, queue, exc_string=message)
        self.connection.lrem(self.claimed_key, 1, job.id)

    def requeue(self, job_id: str) -> None:
        """Put a started job back at the front of its queue without using up a retry (a clean shutdown)."""
        started = self.started.pop(job_id)
        with self.connection.pipeline(transaction=True) as pipe, execution_slot(self, started.execution):
            pipe.multi()  # rq's enqueue_job would otherwise try to WATCH after commands were queued
            self.cleanup_execution(started.job, pipeline=pipe)
            started.job.set_status(JobStatus.QUEUED, pipeline=pipe)
            started.queue.enqueue_job(started.job, pipeline=pipe, at_front=True)
            pipe.execute()
