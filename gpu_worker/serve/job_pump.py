"""Rank 0's job thread: everything between rq and the engine loop, on its own Redis connection.

Each pass it
1. finishes the jobs the publisher has written out (``rq`` FINISHED with a
   :class:`JobResult`, or FAILED for a request the engine refused);
2. every ``CONTROL_PERIOD_S``, turns cancel flags and passed deadlines of
   running jobs into engine aborts;
3. every heartbeat interval, refreshes rq's heartbeats of its started jobs,
   re-reads the shard map (which queues to listen on) and checks that its
   incarnation has not been fenced;
4. claims as many new jobs as the engine has room for, session shards
   before the shared ``batch`` queue, and carries out what
   :func:`gpu_worker.serve.admission.decide` makes of each: run it (resumed
   from its token log if an earlier run streamed part of it), complete it
   from its log, or fail it.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from enum import Enum

import redis

from common import keys
from common.claims import return_claimed
from common.errors import TpqError, refusal
from common.groups import is_fenced, read_shard_map, shards_of
from common.logs import job_event
from common.metrics import GroupMetrics
from common.redis_conn import connect, retries_for
from common.results import FinishReason, GenerationResult, StreamEnd, TokenEvent
from common.schemas import GenerationRequest
from common.settings import Settings
from common.token_log import attempt_made_progress, log_is_whole, logged_count, queue_messages
from gpu_worker.serve.admission import (
    Fail, FinishWithoutEngine, Generate, LogState, Resume, decide, read_log_states,
)
from gpu_worker.serve.batch_worker import BatchWorker, Claimed, ClaimRefused, Started
from gpu_worker.serve.engine_loop import Abort, Admit, EngineLoop, StepReport
from gpu_worker.serve.jobs import engine_job_result, engine_priority, prompt_token_ids, resumed_logprobs
from gpu_worker.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONTROL_PERIOD_S = 0.1
CLAIM_BATCH = 16
POLL_MIN_S, POLL_MAX_S = 0.002, 0.02
REDIS_OUTAGE_S = 120.0  # how long a Redis command of the pump keeps retrying before the group gives up
NO_MAP_WARNING_S = 10.0  # a supervisor starting beside the group writes the map within seconds
MAX_ERROR_CHARS = 1000  # of a failed job's message (its result, stream end and log line)
BATCH_RESERVE_FRACTION = 0.25  # of max_in_flight, kept free of batch jobs for interactive sessions


class Fenced(TpqError):
    """The supervisor fenced this incarnation: it must stop taking and finishing work."""


class ShutdownMode(str, Enum):
    """What a stopping job pump does with the jobs it has started."""

    REQUEUE = "requeue"  # a clean stop: back to the front of their queues, no retry used
    RETRY = "retry"  # the group failed: requeued free if the attempt made progress, else through rq's Retry
    ABANDON = "abandon"  # fenced: the supervisor has requeued them already


@dataclass
class RunningJob:
    """A job in the engine: what the result needs that the engine does not know."""

    started: Started
    request: GenerationRequest
    admitted_wall: float     # Unix time it entered the engine
    queued_before_s: float   # seconds from enqueue to admission
    resumed_tokens: int = 0  # tokens an earlier attempt streamed


class JobPump(threading.Thread):
    """Moves jobs from rq into ``loop`` and results from the publisher back into rq (see module doc)."""

    def __init__(self, settings: Settings, redis_url: str, group: str, incarnation: str,
                 loop: EngineLoop, tokenizer: Tokenizer, max_in_flight: int) -> None:
        super().__init__(name="tpq-job-pump", daemon=True)
        self.settings, self.group, self.incarnation = settings, group, incarnation
        self.loop, self.tokenizer, self.max_in_flight = loop, tokenizer, max_in_flight
        # Each command waits out a Redis restart (AOF reload included) instead of failing the pump, which
        # would restart the group for nothing: the engine keeps decoding and the publisher keeps its tokens.
        self.conn = connect(redis_url, client_name=f"tpq-jobs-{group}", retries=retries_for(REDIS_OUTAGE_S))
        self.worker = BatchWorker(self.conn, group, incarnation, [keys.BATCH_QUEUE],
                                  job_ttl_s=max(1, round(settings.heartbeat_ttl_s)))
        self.running: dict[str, RunningJob] = {}
        self._written: queue.SimpleQueue[StepReport] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop_event = threading.Event()
        self._shutdown_mode = ShutdownMode.REQUEUE
        self._shard_queues: list[str] = []
        self._epoch = -1
        self._next_control = self._next_keepalive = 0.0
        self._warned_no_map = False
        self._created = time.monotonic()
        self.error: BaseException | None = None
        self.finished_jobs = self.failed_jobs = 0
        self.metrics = GroupMetrics(group)

    # -- interface for other threads -------------------------------------------
    def on_written(self, report: StepReport) -> None:
        """The publisher stored ``report``'s messages: its finished jobs can complete in rq (any thread)."""
        if report.finished or report.rejected:
            self._written.put(report)
            self._wake.set()

    def stop(self, mode: ShutdownMode = ShutdownMode.REQUEUE) -> None:
        """Stop the thread, giving its started jobs back as ``mode`` says (see :class:`ShutdownMode`)."""
        self._shutdown_mode = ShutdownMode(mode)
        self._stop_event.set()
        self._wake.set()
        self.join(timeout=60)

    # -- the thread --------------------------------------------------------------
    def run(self) -> None:
        try:
            self.worker.register()
            returned = return_claimed(self.conn, self.group)
            if returned:
                log.info("put %d job(s) an earlier run of group %s had claimed back on their queues",
                         returned, self.group)
            pause = POLL_MIN_S
            while not self._stop_event.is_set():
                busy = self._pass()
                pause = POLL_MIN_S if busy else min(pause * 2, POLL_MAX_S)
                self._wait(pause)
            self._finish_written()
            self._release_running()
        except Fenced as exc:
            log.error("%s", exc)
            self.error = exc
        except BaseException as exc:  # noqa: BLE001 - reported to the group, which restarts
            log.exception("job pump of group %s failed", self.group)
            self.error = exc
        finally:
            try:
                self.worker.unregister()
            except redis.RedisError:
                pass
            self.conn.close()

    def _wait(self, pause: float) -> None:
        """Sleep up to ``pause`` seconds, waking early when the publisher hands over finished jobs."""
        self._wake.wait(pause)
        self._wake.clear()

    def _pass(self) -> bool:
        busy = self._finish_written()
        now = time.monotonic()
        if now >= self._next_control:
            self._next_control = now + CONTROL_PERIOD_S
            self._abort_cancelled_and_late()
            self._follow_shard_map()
        if now >= self._next_keepalive:
            self._next_keepalive = now + self.settings.heartbeat_interval_s
            self._keep_alive()
        return self._claim_and_admit() or busy

    # -- finishing -------------------------------------------------------------
    def _finish_written(self) -> bool:
        busy = False
        while True:
            try:
                report = self._written.get_nowait()
            except queue.Empty:
                return busy
            busy = True
            for result in report.finished:
                self._succeed(result)
            for job_id, why, retryable in report.rejected:
                job = self.running.pop(job_id, None)
                if job is not None:
                    message = f"the engine failed on the request: {why}" if retryable else refusal(why)
                    self._fail(job.started.job, job.started.queue, message,
                               retry=retryable and bool(job.started.job.retries_left), num_tokens=job.resumed_tokens)

    def _succeed(self, result: GenerationResult) -> None:
        job = self.running.pop(result.request_id, None)
        if job is None:
            return
        job_result = engine_job_result(result, job.queued_before_s, self.group, job.started.attempt)
        job_id, num_tokens = result.request_id, len(result.token_ids)
        if not self.worker.succeed(job_id, job_result.model_dump(mode="json"), watch=[keys.token_log(job_id)],
                                   provided=lambda: log_is_whole(self.conn, job_id, num_tokens)):
            # Redis crashed after the publisher wrote the job's last messages and came back without them
            # (before the check, or between it and the completion, which redis-py retried onto the Redis that
            # came back): completing would leave a finished job whose log ends short for good. Run it again
            # from what the log kept (free: it made progress); it writes the rest again and completes then.
            self.worker.requeue(job_id)
            self._log_lost(job)
            return
        self.finished_jobs += 1
        self.metrics.job_finished(result.finish_reason.value, job_result,
                                  first_token=result.usage.generated_tokens > job.resumed_tokens)
        job_event(log, _finish_event(result.finish_reason), result.request_id, queue=job.started.queue.name,
                  group=self.group, finish_reason=result.finish_reason.value,
                  tokens=result.usage.generated_tokens, attempt=job.started.attempt)

    def _log_lost(self, job: RunningJob) -> None:
        self.metrics.jobs_retried("log_lost")
        job_event(log, "requeued", job.started.job.id, queue=job.started.queue.name, group=self.group,
                  level=logging.WARNING, reason="log_lost", error="Redis lost the end of its token log after it "
                  "was written; running it again from what the log kept")

    def _fail(self, job, queue_, message: str, *, retry: bool, end_written: bool = False, num_tokens: int = 0) -> None:
        """Fail ``job``; with ``retry`` rq requeues it (its stream stays open), else its stream ends with the error."""
        message = _short(message)
        if not end_written and not retry:
            self._write_messages([StreamEnd(request_id=job.id, num_tokens=num_tokens, error=message)])
        self.worker.fail(job, queue_, message, retry=retry)
        if retry:  # rq put it back at the front of its queue
            self.metrics.jobs_retried("job_error")
            job_event(log, "requeued", job.id, queue=queue_.name, group=self.group, level=logging.WARNING,
                      reason="job_error", error=message)
            return
        self.failed_jobs += 1
        self.metrics.job_failed()
        job_event(log, "failed", job.id, queue=queue_.name, group=self.group, level=logging.WARNING, error=message)

    def _release_running(self) -> None:
        """On stop: give every started job back to rq as ``_shutdown_mode`` says."""
        mode = self._shutdown_mode
        for job_id in list(self.worker.started):
            started = self.worker.started[job_id]
            if mode is ShutdownMode.REQUEUE:
                self.worker.requeue(job_id)
                self.metrics.jobs_retried("shutdown")
            elif mode is ShutdownMode.RETRY and attempt_made_progress(self.conn, job_id):
                self.worker.requeue(job_id)  # not the job's fault, as far as anyone can tell: no retry used
                self.metrics.jobs_retried("group_failed")
            elif mode is ShutdownMode.RETRY:
                self.worker.fail(started.job, started.queue, "its worker group failed; retrying", retry=True)
                self.metrics.jobs_retried("group_failed")
            if mode is not ShutdownMode.ABANDON:
                job_event(log, "requeued", job_id, queue=started.queue.name, group=self.group,
                          reason="shutdown" if mode is ShutdownMode.REQUEUE else "group_failed")
            self.running.pop(job_id, None)
        if self.worker.started:
            log.info("%s %d running job(s) of group %s", mode.value, len(self.worker.started), self.group)

    # -- control ---------------------------------------------------------------
    def _abort_cancelled_and_late(self) -> None:
        if not self.running:
            return
        ids = list(self.running)
        flags = self.conn.mget([keys.cancel_flag(i) for i in ids])
        now = time.time()
        for job_id, flag in zip(ids, flags):
            request = self.running[job_id].request
            if flag is not None:
                self.loop.submit(Abort(job_id, FinishReason.CANCELLED))
            elif request.deadline_unix_s is not None and now >= request.deadline_unix_s:
                self.loop.submit(Abort(job_id, FinishReason.DEADLINE))

    def _keep_alive(self) -> None:
        if is_fenced(self.conn, self.group, self.incarnation):
            self._shutdown_mode = ShutdownMode.ABANDON
            self.worker.started.clear()
            raise Fenced(f"group {self.group} incarnation {self.incarnation} was fenced by the supervisor; stopping")
        self.worker.keep_alive()

    def _follow_shard_map(self) -> None:
        """Listen on the shards the map gives this group (one GET unless the epoch moved)."""
        if int(self.conn.get(keys.shard_map_epoch()) or 0) != self._epoch:
            epoch, shard_map = read_shard_map(self.conn)
            self._epoch = epoch
            owned = shards_of(shard_map, self.group)
            self._shard_queues = [keys.shard_queue_name(s) for s in owned]
            self.worker.set_queues(self._shard_queues + [keys.BATCH_QUEUE])
            log.info("group %s listens on %d shard queue(s) and 'batch' (shard map epoch %d)",
                     self.group, len(owned), epoch)
        if self._epoch == 0 and not self._warned_no_map and time.monotonic() - self._created > NO_MAP_WARNING_S:
            self._warned_no_map = True
            log.warning("no shard map in Redis yet: only the 'batch' queue is served until a supervisor "
                        "(tpq supervisor, or tpq up) assigns session shards")

    # -- admitting ---------------------------------------------------------------
    def _claim_and_admit(self) -> bool:
        room = self.max_in_flight - len(self.running)
        if room <= 0:
            return False
        queues = list(self._shard_queues)
        if room > self.max_in_flight * BATCH_RESERVE_FRACTION:
            queues.append(keys.BATCH_QUEUE)
        try:
            claimed = self.worker.claim(queues, min(room, CLAIM_BATCH))
        except ClaimRefused as exc:
            self._shutdown_mode = ShutdownMode.ABANDON
            self.worker.started.clear()
            raise Fenced(str(exc)) from None
        states = read_log_states(self.conn, [item.job_id for item in claimed
                                             if item.job is not None and item.job_id not in self.running])
        for item in claimed:
            job_event(log, "claimed", item.job_id, queue=item.queue.name, group=self.group)
            self._admit(item, states)
        return bool(claimed)

    def _admit(self, item: Claimed, states: dict[str, LogState]) -> None:
        """Carry out :func:`decide`'s verdict on ``item`` (``states``: the log states read for this batch)."""
        if item.job_id in self.running:
            # A job this group still runs came back through a queue (rq's cleanup requeued it after its started
            # entry expired while the group was slow, or a crashed Redis lost it and its client submitted it
            # again): the run in the engine serves it, recorded as started here again so that a crash of this
            # group requeues it instead of stranding it.
            if item.job is None:
                self.worker.drop_claim(item.job_id)
                return
            running = self.running[item.job_id]
            running.started = self.worker.start_again(item.job, item.queue, logged=logged_count(self.conn, item.job_id))
            log.warning("job %s was queued again while it runs here; recorded it as started here again (attempt %d)",
                        item.job_id, running.started.attempt)
            return
        if item.job is None:
            self._fail_unreadable(item)
            return
        job = item.job
        state = states.pop(job.id, None)
        if state is None:  # a second copy of an id in this batch, whose first copy did not start running
            state = read_log_states(self.conn, [job.id])[job.id]
        verdict = decide(job, state, time.time(), self.settings)
        if isinstance(verdict, Fail) and not verdict.end_written:  # an invalid job: failed as claimed
            self._fail(job, item.queue, verdict.message, retry=False)
            return
        started = self.worker.start(job, item.queue, logged=len(state.tokens))
        self.metrics.job_started()
        job_event(log, "started", job.id, queue=item.queue.name, group=self.group, attempt=started.attempt)
        if isinstance(verdict, Fail):
            self._fail(job, item.queue, verdict.message, retry=False, end_written=True)
        elif isinstance(verdict, FinishWithoutEngine):
            self._finish_without_engine(started, verdict)
        else:
            self._start_generating(started, verdict)

    def _fail_unreadable(self, item: Claimed) -> None:
        """A claimed job rq cannot read: FAILED if it has a hash (a corrupt field), else only dropped."""
        message = _short(f"the job cannot be read: {item.error}")
        if not self.worker.fail_unreadable(item.job_id, item.queue, message, self.settings.failure_ttl_s):
            log.error("job %s on %s has no job hash (%s); dropped the id", item.job_id, item.queue.name, item.error)
            return
        self._write_messages([StreamEnd(request_id=item.job_id, num_tokens=0, error=message)])
        self.failed_jobs += 1
        self.metrics.job_failed()
        job_event(log, "failed", item.job_id, queue=item.queue.name, group=self.group, level=logging.WARNING,
                  error=message)

    def _start_generating(self, started: Started, verdict: Generate | Resume) -> None:
        job, request = started.job, verdict.request
        tokens = verdict.tokens if isinstance(verdict, Resume) else ()
        try:
            prompt = prompt_token_ids(self.tokenizer, request)
        except (TpqError, ValueError) as exc:  # a prompt this model cannot take: a retry would fail the same way
            self._fail(job, started.queue, refusal(f"{type(exc).__name__}: {exc}"), retry=False,
                       num_tokens=len(tokens))
            return
        except Exception as exc:  # noqa: BLE001 - unexpected: fail this job (retried while it has retries), not the pump
            log.exception("job %s: preparing its prompt failed", job.id)
            self._fail(job, started.queue, f"{type(exc).__name__}: {exc}", retry=bool(job.retries_left),
                       num_tokens=len(tokens))
            return
        self.running[job.id] = RunningJob(started, request, time.time(), verdict.queued_before_s, len(tokens))
        self.loop.submit(Admit(job.id, prompt, request.sampling, engine_priority(request),
                               resume_token_ids=[t.token_id for t in tokens],
                               resume_logprobs=resumed_logprobs(request, tokens)))
        if tokens:
            self.metrics.job_resumed()
            job_event(log, "resumed", job.id, queue=started.queue.name, group=self.group, at_token=len(tokens),
                      attempt=started.attempt)

    def _finish_without_engine(self, started: Started, verdict: FinishWithoutEngine) -> None:
        """Complete a job the engine need not run: cancelled or late before it began, or already fully streamed."""
        job, tokens, reason = started.job, verdict.tokens, verdict.reason
        if not verdict.end_written:
            self._write_messages([StreamEnd(request_id=job.id, num_tokens=len(tokens), finish_reason=reason)])
        prompt_tokens = len(prompt_token_ids(self.tokenizer, verdict.request)) if tokens else 0
        result = verdict.job_result(job.id, prompt_tokens, self.group, started.attempt)
        self.worker.succeed(job.id, result.model_dump(mode="json"))
        self.finished_jobs += 1
        self.metrics.job_finished(reason.value)
        job_event(log, _finish_event(reason), job.id, queue=started.queue.name, group=self.group,
                  finish_reason=reason.value, tokens=len(tokens), attempt=started.attempt, ran=False)

    def _write_messages(self, messages: list[TokenEvent | StreamEnd]) -> None:
        with self.conn.pipeline(transaction=False) as pipe:
            queue_messages(pipe, messages, self.settings.token_log_maxlen, self.settings.token_log_ttl_s)
            pipe.execute(raise_on_error=False)


def _short(message: str) -> str:
    """``message`` cut to ``MAX_ERROR_CHARS``: an error about a hostile job must not copy its payload around."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}... ({len(message) - MAX_ERROR_CHARS} more characters)"


def _finish_event(reason: FinishReason) -> str:
    """The lifecycle event a job's end is logged as."""
    return {FinishReason.CANCELLED: "cancelled", FinishReason.DEADLINE: "expired"}.get(reason, "finished")
