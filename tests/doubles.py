"""Test doubles shared by several test modules: stand-ins for the parts of tpqueue a test does not run.

- :class:`StubEngineLoop`: the engine loop's inbox, for tests of the job pump
  (no model runs);
- :class:`ProtocolWorker`: the worker's side of the client protocol, for
  tests of the client (no model, no torch).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from common import keys
from common.jobs import encode_stream_message, request_from_job_kwargs
from common.results import FinishReason, JobResult, StreamEnd, Timings, TokenEvent, Usage
from common.schemas import GenerationRequest
from common.settings import Settings, get_settings
from common.token_log import queue_messages

PROTOCOL_GROUP = "proto-group"  # the group name in the results a ProtocolWorker writes


class StubEngineLoop:
    """The engine loop's inbox only: records the request id of every command the job pump submits, in order.

    No model runs, so an admitted job stays running until the test finishes it;
    a job admitted twice (a retry, a resumed run) appears twice.
    """

    def __init__(self) -> None:
        self.admitted: list[str] = []

    def submit(self, command: Any) -> None:
        self.admitted.append(command.request_id)


class Running:
    """A job this worker has started: rq's job, queue and execution, its request, its tokens so far."""

    def __init__(self, job: Job, queue: Queue, execution: Execution) -> None:
        self.job, self.queue, self.execution = job, queue, execution
        self.request: GenerationRequest = request_from_job_kwargs(job.kwargs)
        self.tokens: list[TokenEvent] = []

    @property
    def id(self) -> str:
        return self.job.id


class _LogOnly:
    """A pipeline stand-in that drops PUBLISH: the message reaches the log but no subscriber."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def xadd(self, *args: Any, **kwargs: Any) -> None:
        self._pipe.xadd(*args, **kwargs)

    def expire(self, *args: Any, **kwargs: Any) -> None:
        self._pipe.expire(*args, **kwargs)

    def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


class ProtocolWorker:
    """One rq worker identity that runs tpqueue jobs by hand: the worker's side of the client protocol.

    :class:`ProtocolWorker` does what a tpqueue worker does to a job, through
    rq and :mod:`common.token_log` only: it takes the job off its rq queue
    (``Queue.dequeue_any`` with ``JSONSerializer``), records it as started
    (``prepare_execution`` + ``prepare_job_execution``), writes its
    :class:`TokenEvent` s and one :class:`StreamEnd` with
    :func:`common.token_log.queue_messages` (XADD with explicit ids + PUBLISH),
    honours the cancel flag, and finishes the rq job with a :class:`JobResult`
    (``job._result`` + ``handle_job_success``) or fails it
    (``handle_job_failure`` with no retries left). Lower-level helpers let a
    test break the pub/sub side on purpose (log only, publish only, publish
    twice).
    """

    def __init__(self, url: str, settings: Settings | None = None, name: str = "proto") -> None:
        self.settings = settings if settings is not None else get_settings(redis_url=url)
        self.conn = redis.Redis.from_url(url)
        self.worker = SimpleWorker([], connection=self.conn, serializer=JSONSerializer, name=f"{name}-{id(self)}")
        self._lock = threading.Lock()  # rq's worker has one execution slot
        self.served: list[Running] = []  # every job run() finished, in order
        self.errors: list[BaseException] = []  # what run_in_thread's thread raised

    def close(self) -> None:
        self.conn.close()

    # -- taking and starting

    def take(self, queue_names: Sequence[str] = (keys.BATCH_QUEUE,), timeout: int | None = 5) -> Running:
        """Dequeue one job (waiting up to ``timeout`` s) and start it the way rq does."""
        return self.start(*self.dequeue(queue_names, timeout))

    def dequeue(self, queue_names: Sequence[str] = (keys.BATCH_QUEUE,), timeout: int | None = 5) -> tuple[Job, Queue]:
        """Only take a job off its queue (rq status stays ``queued`` until :meth:`start`)."""
        queues = [Queue(name, connection=self.conn, serializer=JSONSerializer) for name in queue_names]
        got = Queue.dequeue_any(queues, timeout, connection=self.conn, serializer=JSONSerializer)
        assert got is not None, f"no job on {list(queue_names)}"
        return got

    def start(self, job: Job, queue: Queue) -> Running:
        """Record a dequeued job as started by this worker (an Execution; status ``started``)."""
        with self._lock:
            execution = self.worker.prepare_execution(job)
            self.worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
            self.worker.execution = None
        return Running(job, queue, execution)

    def requeue(self, running: Running) -> None:
        """Put a started job back at the front of its queue (what recovery does after a worker died)."""
        job = running.job
        with self._lock, self.conn.pipeline() as pipe:
            pipe.multi()  # rq's enqueue_job(pipeline=) calls multi() itself unless the pipeline is already in it
            self.worker.execution = running.execution
            self.worker.cleanup_execution(job, pipeline=pipe)
            self.worker.execution = None
            job.set_status(JobStatus.QUEUED, pipeline=pipe)
            running.queue.enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()

    # -- the stream

    def tokens(self, running: Running, texts: Iterable[str]) -> list[TokenEvent]:
        """The next token events of ``running`` for ``texts`` (token ids 100, 101, ...), not yet written."""
        start = len(running.tokens)
        return [TokenEvent(request_id=running.id, index=start + i, token_id=100 + start + i, text=text)
                for i, text in enumerate(texts)]

    def write(self, messages: Sequence[TokenEvent | StreamEnd], *, publish: bool = True) -> None:
        """Write messages as the worker does: one pipeline, XADD (explicit ids) + PUBLISH each."""
        with self.conn.pipeline(transaction=False) as pipe:
            target = pipe if publish else _LogOnly(pipe)
            queue_messages(target, messages, self.settings.token_log_maxlen, self.settings.token_log_ttl_s)
            pipe.execute(raise_on_error=False)

    def publish_only(self, messages: Sequence[TokenEvent | StreamEnd]) -> None:
        """PUBLISH without logging: a duplicate (or stray) pub/sub delivery."""
        for message in messages:
            self.conn.publish(keys.token_channel(message.request_id), encode_stream_message(message))

    def emit(self, running: Running, texts: Iterable[str], *, publish: bool = True, delay_s: float = 0.0,
             sent_at: dict[int, float] | None = None) -> bool:
        """Write token events one pipeline each; False (and nothing more) once the job is flagged cancelled."""
        for event in self.tokens(running, texts):
            if self.cancel_requested(running):
                return False
            if sent_at is not None:
                sent_at[event.index] = time.perf_counter()
            self.write([event], publish=publish)
            running.tokens.append(event)
            if delay_s:
                time.sleep(delay_s)
        return True

    def cancel_requested(self, running: Running) -> bool:
        return bool(self.conn.exists(keys.cancel_flag(running.id)))

    def end(self, running: Running, finish_reason: FinishReason | str | None = FinishReason.STOP,
            error: str | None = None, *, publish: bool = True) -> StreamEnd:
        end = StreamEnd(request_id=running.id, num_tokens=len(running.tokens),
                        finish_reason=None if error else finish_reason, error=error)
        self.write([end], publish=publish)
        return end

    # -- finishing

    def result_of(self, running: Running, finish_reason: FinishReason | str) -> JobResult:
        return JobResult(
            request_id=running.id, text="".join(t.text for t in running.tokens),
            token_ids=[t.token_id for t in running.tokens], finish_reason=finish_reason,
            usage=Usage(prompt_tokens=3, cached_tokens=0, generated_tokens=len(running.tokens)),
            timings=Timings(queue_s=0.0, time_to_first_token_s=0.0, total_s=0.0), group=PROTOCOL_GROUP, attempt=1,
        )

    def succeed(self, running: Running, finish_reason: FinishReason | str = FinishReason.STOP) -> JobResult:
        """End the stream and finish the rq job with its :class:`JobResult`."""
        self.end(running, finish_reason)
        result = self.result_of(running, finish_reason)
        job = running.job
        job._result = result.model_dump(mode="json")  # rq private: what handle_job_success stores
        job.ended_at = now()
        with self._lock:
            self.worker.execution = running.execution  # rq private: the single execution slot
            self.worker.handle_job_success(job, running.queue, job.started_job_registry)
            self.worker.execution = None
        return result

    def fail(self, running: Running, message: str, *, write_end: bool = True) -> None:
        """End the stream with ``message`` (unless ``write_end`` is False) and fail the rq job for good."""
        if write_end:
            self.end(running, error=message)
        job = running.job
        job.retries_left = 0  # a job that would fail again: FAILED now, no retry
        job.ended_at = now()
        with self._lock:
            self.worker.execution = running.execution
            self.worker.handle_job_failure(job, running.queue, exc_string=message)
            self.worker.execution = None

    def run(self, texts: Sequence[str], queue_names: Sequence[str] = (keys.BATCH_QUEUE,), *,
            delay_s: float = 0.0, sent_at: dict[int, float] | None = None) -> JobResult:
        """Take one job, stream ``texts``, finish it (``cancelled`` if its flag shows up, else ``stop``)."""
        running = self.take(queue_names)
        finished = self.emit(running, texts, delay_s=delay_s, sent_at=sent_at)
        result = self.succeed(running, FinishReason.STOP if finished else FinishReason.CANCELLED)
        self.served.append(running)
        return result

    def run_in_thread(self, texts: Sequence[str], queue_names: Sequence[str] = (keys.BATCH_QUEUE,), *,
                      delay_s: float = 0.0, count: int = 1, sent_at: dict[int, float] | None = None) -> threading.Thread:
        """:meth:`run` ``count`` jobs on a background thread (join it); what it raises lands in ``errors``."""

        def serve() -> None:
            try:
                for _ in range(count):
                    self.run(texts, queue_names, delay_s=delay_s, sent_at=sent_at)
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.errors.append(e)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        return thread
