"""The one module where tpqueue touches rq internals: an allow-listing job class and the batch worker.

A stock rq worker imports whatever dotted name a job hash holds, for the job
function and for its success/failure/stopped callbacks (rq 2.12
``rq/job.py``: ``Job.func`` and the ``*_callback`` properties, all through
``rq.utils.import_attribute``), so anyone who can write to Redis can make it
run ``os.system``. :class:`AllowListedJob` refuses every name that is not in
:data:`ALLOWED_FUNCS` before anything is imported, and never sends the HTTP
webhooks (rq 2.12 ``Job.webhooks``) a job hash may name.
:func:`disable_pickle` (from :mod:`common.pickle_guard`, re-exported here)
makes unpickling raise in this process, so a pickle payload written into a
job hash can never run code here.

A tpqueue worker uses both::

    disable_pickle()  # once, at worker start
    Worker(queues, connection=conn, serializer=JSONSerializer, job_class=AllowListedJob)

:class:`BatchWorker` is rank 0's rq identity: rq's one-job-at-a-time
``work()`` loop is replaced by a batch of jobs in flight at once, each
started, kept alive and finished through rq's own bookkeeping so that
``rq info`` and rq-dashboard tell the truth. The rq internals it relies on
(rq 2.12; upstream is reworking them) are all here, each named where used:
``BaseWorker.execution`` (a single slot, set before each ``handle_*`` call),
``BaseWorker._set_ip_address`` (replaced: no CLIENT LIST),
``Job._result`` (read by ``handle_job_success``), ``Queue._enqueue_job`` is
not used (``enqueue_job`` is public), and rq's Redis layout of a queue
(``rq:queue:<name>``, a list of job ids, which the claim script moves ids
out of) and of a job hash (the extra field ``tpq_attempts``).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.utils import import_attribute, now
from rq.worker import BaseWorker, WorkerStatus

from common import keys
from common.errors import TpqError
from common.groups import FENCED_FIELD
from common.jobs import GENERATE_FUNC
from common.pickle_guard import (  # noqa: F401 - the worker's pickle guard, re-exported
    UnpicklingDisabled,
    disable_pickle,
    enable_pickle_for_tests,
    is_pickle_disabled,
    pickle_disabled,
)
from common.rq_failure import queue_unreadable_failure

log = logging.getLogger(__name__)

ALLOWED_FUNCS: frozenset[str] = frozenset({GENERATE_FUNC})
"""The dotted names a tpqueue worker resolves, as job function or callback. Nothing else is imported."""

_MAX_SHOWN_CHARS = 200


class ForbiddenJobFunction(TpqError):
    """A job names a function or callback that is not on :data:`ALLOWED_FUNCS`; nothing was imported."""

    def __init__(self, func_name: object, role: str = "function", reason: str = "is not on the allow-list") -> None:
        shown = repr(func_name)
        if len(shown) > _MAX_SHOWN_CHARS:
            shown = shown[:_MAX_SHOWN_CHARS] + "..."
        allowed = ", ".join(sorted(ALLOWED_FUNCS)) or "nothing"
        super().__init__(
            f"refusing job {role} {shown}: it {reason} (allowed: {allowed}); a tpqueue worker only runs "
            "jobs enqueued by producer.client.Client, so this job is foreign or corrupt"
        )
        self.func_name = func_name
        self.role = role


def check_allowed(func_name: object, role: str = "function") -> str:
    """``func_name`` if it is on :data:`ALLOWED_FUNCS`; else raise :class:`ForbiddenJobFunction`."""
    if not isinstance(func_name, str) or func_name not in ALLOWED_FUNCS:
        raise ForbiddenJobFunction(func_name, role)
    return func_name


class AllowListedJob(Job):
    """An rq ``Job`` that resolves only allow-listed functions and callbacks (pass it as ``job_class=``).

    ``func`` raises :class:`ForbiddenJobFunction`, before importing anything,
    when the function name is not on :data:`ALLOWED_FUNCS`, when the job is a
    bound method (a non-null ``instance``), or when any callback name is
    forbidden, so such a job fails before its body could run. The callback
    properties refuse the same way unless the callback is unset. A job whose
    ``data`` cannot be decoded fails with rq's ``DeserializationError``.
    """

    @property
    def func(self) -> Any:
        return import_attribute(self.allowed_func_name())

    def allowed_func_name(self) -> str:
        """The job's function name if the job may run; else raise :class:`ForbiddenJobFunction`. Imports nothing.

        A job may run when it names an allow-listed function, is not bound to
        an instance, and names no callback off the allow-list.
        """
        func_name = check_allowed(self.func_name)
        if self.instance is not None:
            raise ForbiddenJobFunction(
                func_name, reason=f"is bound to an instance of {type(self.instance).__name__}, not a module function"
            )
        for role, name in self._callback_names():
            if name:
                check_allowed(name, role)
        return func_name

    @property
    def success_callback(self) -> Any:
        return _resolve_callback(self._success_callback_name, "success callback")

    @property
    def failure_callback(self) -> Any:
        return _resolve_callback(self._failure_callback_name, "failure callback")

    @property
    def stopped_callback(self) -> Any:
        return _resolve_callback(self._stopped_callback_name, "stopped callback")

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        """Never sends: a webhook is an HTTP request to any URL a Redis writer chose, from the worker's network."""
        if self.webhooks:
            log.error("job %s: not sending its %d webhook(s): tpqueue jobs have none, so this job is foreign or "
                      "corrupt", self.id, len(self.webhooks))

    def execute_failure_callback(self, death_penalty_class: Any, *exc_info: Any) -> None:
        # rq's StartedJobRegistry.cleanup calls this outside any try; a raise there would stop the worker.
        if self._refused_callback(self._failure_callback_name, "failure callback"):
            return
        super().execute_failure_callback(death_penalty_class, *exc_info)

    def execute_stopped_callback(self, death_penalty_class: Any) -> None:
        if self._refused_callback(self._stopped_callback_name, "stopped callback"):
            return
        super().execute_stopped_callback(death_penalty_class)

    def _callback_names(self) -> list[tuple[str, str | None]]:
        return [
            ("success callback", self._success_callback_name),
            ("failure callback", self._failure_callback_name),
            ("stopped callback", self._stopped_callback_name),
        ]

    def _refused_callback(self, name: str | None, role: str) -> bool:
        """True (and logged) when ``name`` is set and forbidden: the caller skips the callback."""
        if not name:
            return False
        try:
            check_allowed(name, role)
        except ForbiddenJobFunction as e:
            log.error("job %s: not running its %s: %s", self.id, role, e)
            return True
        return False


def _resolve_callback(name: str | None, role: str) -> Any:
    if not name:
        return None
    return import_attribute(check_allowed(name, role))


# ------------------------------------------------------------------ the batch worker

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


class BatchWorker(BaseWorker):
    """An rq worker with many jobs in flight, driven by the caller (its ``work()`` is never used).

    ``claim`` takes job ids off the queues into the group's claimed list,
    ``start`` makes rq record a job as started by this worker, ``keep_alive``
    refreshes every started job's registry entry (call it more often than
    ``job_ttl_s``), and ``succeed`` / ``fail`` / ``requeue`` finish a job.
    ``return_claimed`` puts back what a crashed earlier run of the group
    claimed but never started. Not thread-safe: use it from one thread.
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
    def _set_ip_address(self, connection: Any) -> None:  # rq private: called by BaseWorker.__init__
        # rq looks its address up in CLIENT LIST, which shows every client of the server (addresses, users,
        # commands); tpqueue's Redis ACL user may not run it. The group's host is in tpq:group:<name> instead.
        connection.client_setname(self.name)
        self.ip_address = "unknown"

    def execute_job(self, job: Job, queue: Queue) -> None:  # BaseWorker's abstract hook; work() is not used
        raise NotImplementedError("BatchWorker runs jobs in batches through start()/succeed(), not execute_job()")

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.job_ttl_s

    def set_queues(self, queue_names: list[str]) -> None:
        """Listen on ``queue_names`` from now on (rq's worker hash shows them)."""
        if [q.name for q in self.queues] == queue_names:
            return
        self.queues = [Queue(name, connection=self.connection, serializer=JSONSerializer) for name in queue_names]
        self._ordered_queues = self.queues[:]
        self.connection.hset(self.key, "queues", ",".join(queue_names))

    def register(self) -> None:
        """Announce this worker to rq (``rq info`` lists it) as idle."""
        self.register_birth()
        self.set_state(WorkerStatus.IDLE)

    def unregister(self) -> None:
        self.register_death()

    # -- taking jobs ---------------------------------------------------------
    def claim(self, queue_names: list[str], limit: int) -> list[Claimed]:
        """Move up to ``limit`` job ids off ``queue_names`` (in that order of urgency) and fetch their jobs."""
        if limit <= 0 or not queue_names:
            return []
        flat = self._claim(keys=[self.claimed_key, keys.group_info(self.group), *map(keys.rq_queue_key, queue_names)],
                           args=[limit, json.dumps(self.incarnation), FENCED_FIELD, self.incarnation])
        if len(flat) == 1:
            raise ClaimRefused(f"group {self.group} incarnation {self.incarnation} is fenced: it may take no job")
        claimed = []
        for i in range(0, len(flat), 2):
            queue_name, raw_id = _text(flat[i])[len(keys.RQ_QUEUE_PREFIX):], flat[i + 1]
            job_id = _job_id_or_none(raw_id)
            if job_id is None:  # nothing rq could finish or tell a client about: forget it
                self.connection.lrem(self.claimed_key, 1, raw_id)
                log.error("queue %s held %s, which is not a tpqueue job id; dropped it", queue_name,
                          repr(raw_id)[:_MAX_SHOWN_CHARS])
                continue
            claimed.append(self._fetch(job_id, queue_name))
        return claimed

    def _fetch(self, job_id: str, queue_name: str) -> Claimed:
        queue = Queue(queue_name, connection=self.connection, serializer=JSONSerializer)
        try:
            job = AllowListedJob.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable job hash
            return Claimed(job_id, queue, None, f"{type(exc).__name__}: {exc}")
        return Claimed(job_id, queue, job, None)

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
            with self.connection.pipeline(transaction=True) as pipe:
                pipe.multi()
                self.execution = old.execution  # rq private: cleanup_execution deletes self.execution
                self.cleanup_execution(old.job, pipeline=pipe)
                pipe.execute()
            self.execution = None
        return self.start(job, queue, logged=logged)

    def drop_claim(self, job_id: str) -> None:
        """Forget a claimed id whose job hash is gone (nothing rq could finish)."""
        self.connection.lrem(self.claimed_key, 1, job_id)

    def fail_unreadable(self, job_id: str, queue: Queue, message: str, failure_ttl: int) -> bool:
        """End a claimed job whose hash rq cannot read as FAILED with ``message``; False (only dropped) if it has no hash.

        rq's own failure path needs a readable job, so this writes what it
        would (:func:`common.rq_failure.queue_unreadable_failure`).
        """
        exists = bool(self.connection.exists(keys.rq_job_key(job_id)))
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.lrem(self.claimed_key, 1, job_id)
            if exists:
                queue_unreadable_failure(pipe, self.connection, job_id, queue.name, message, failure_ttl, self.name)
            pipe.execute()
        return exists

    def return_claimed(self) -> int:
        """Put every id in the group's claimed list back at the front of its queue; how many."""
        count = 0
        while (raw := self.connection.lindex(self.claimed_key, -1)) is not None:
            job_id = _text(raw)
            origin = self.connection.hget(keys.rq_job_key(job_id), "origin") if _is_job_id(job_id) else None
            with self.connection.pipeline(transaction=True) as pipe:
                pipe.rpop(self.claimed_key)
                if origin is not None:
                    pipe.lpush(keys.rq_queue_key(_text(origin)), job_id)
                pipe.execute()
            count += origin is not None
        return count

    def start(self, job: Job, queue: Queue, logged: int = 0) -> Started:
        """Record ``job`` as started by this worker (status STARTED, an Execution in its StartedJobRegistry).

        ``logged``: the log position this attempt writes first (the messages
        an earlier attempt already logged), kept in the job hash so that
        whoever requeues the job after a crash can tell whether this attempt
        made progress: whether the log holds that position
        (:func:`common.token_log.attempt_made_progress`).
        """
        execution = self.prepare_execution(job)  # rq: creates the Execution, sets self.execution
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
        self.execution = None
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
    def succeed(self, job_id: str, result: Any) -> None:
        """Finish a started job with ``result`` (JSON-safe): FINISHED, result stored, registries updated."""
        started = self.started.pop(job_id)
        started.job._result = result  # rq private: handle_job_success stores job._result
        started.job.ended_at = now()
        self.execution = started.execution  # rq private: the single execution slot handle_* reads
        self.handle_job_success(started.job, started.queue, started.job.started_job_registry)
        self.execution = None

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
        self.execution = started.execution if started else None
        self.handle_job_failure(job, queue, exc_string=message)
        self.execution = None
        self.connection.lrem(self.claimed_key, 1, job.id)

    def requeue(self, job_id: str) -> None:
        """Put a started job back at the front of its queue without using up a retry (a clean shutdown)."""
        started = self.started.pop(job_id)
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.multi()  # rq's enqueue_job would otherwise try to WATCH after commands were queued
            self.execution = started.execution
            self.cleanup_execution(started.job, pipeline=pipe)
            started.job.set_status(JobStatus.QUEUED, pipeline=pipe)
            started.queue.enqueue_job(started.job, pipeline=pipe, at_front=True)
            pipe.execute()
        self.execution = None

    def requeue_finished(self, job: Job, queue: Queue) -> None:
        """Put ``job``, which this worker just finished, back at the front of its queue without using a retry.

        For a completion that reached a Redis which had lost what it rests on:
        Redis crashed after the end of the job's token log was written, and
        the completion, retried across the outage, landed after it came back.
        The job runs again from what its log kept; its result stays.
        """
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.multi()
            job.finished_job_registry.remove(job, pipeline=pipe)
            pipe.persist(job.key)  # rq set the finished job to expire after its result TTL
            job.set_status(JobStatus.QUEUED, pipeline=pipe)
            queue.enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _job_id_or_none(raw: bytes | str) -> str | None:
    """``raw`` (an id read from a queue) as a str if it is a valid tpqueue job id, else None."""
    try:
        return keys.validate_job_id(_text(raw))
    except (UnicodeDecodeError, TpqError):
        return None


def _is_job_id(value: str) -> bool:
    try:
        keys.validate_job_id(value)
    except TpqError:
        return False
    return True
