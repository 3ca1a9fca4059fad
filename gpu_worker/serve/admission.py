"""Admission: what rank 0 does with a claimed job, decided without side effects.

:func:`decide` takes the job as rq read it, what Redis says of its token
log and cancel flag (:class:`LogState`, read for a whole batch of claimed
jobs in one round trip by :func:`read_log_states`) and the wall clock, and
returns a verdict; the job pump carries it out. A job is validated again here (never
trusting the queue): its function is on the allow-list, it takes only the
keyword argument ``request``, that request is valid within the limits, and
its id is the job's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import redis

from common import keys
from common.errors import InvalidRequestError, TpqError
from common.jobs import request_from_job_kwargs
from common.results import FinishReason, JobResult, StreamEnd, Timings, TokenEvent, Usage
from common.schemas import GenerationRequest, check_limits
from common.settings import Settings
from common.token_log import queue_resume_read, resume_point_from
from gpu_worker.serve.allow_list import AllowListedJob, ForbiddenJobFunction


@dataclass(frozen=True)
class LogState:
    """What Redis holds for a job at admission: the gap-free start of its token log, its end record, its cancel flag."""

    tokens: tuple[TokenEvent, ...] = ()
    end: StreamEnd | None = None
    cancelled: bool = False


@dataclass(frozen=True)
class Generate:
    """Run the job in the engine from its prompt (nothing was streamed yet)."""

    request: GenerationRequest
    queued_before_s: float  # seconds from enqueue to admission


@dataclass(frozen=True)
class Resume:
    """Run the job in the engine after the tokens an earlier attempt streamed (prefilled, not streamed again)."""

    request: GenerationRequest
    queued_before_s: float
    tokens: tuple[TokenEvent, ...]


@dataclass(frozen=True)
class FinishWithoutEngine:
    """Complete the job from what its log holds: cancelled or late before it ran, or already streamed to its end.

    ``end_written``: the log already holds the end record (an earlier attempt wrote it).
    """

    request: GenerationRequest
    tokens: tuple[TokenEvent, ...]
    reason: FinishReason
    end_written: bool = False

    def job_result(self, job_id: str, prompt_tokens: int, group: str, attempt: int) -> JobResult:
        """The job's result: what its log holds, with no engine time."""
        return JobResult(
            request_id=job_id, text="".join(t.text for t in self.tokens), token_ids=[t.token_id for t in self.tokens],
            finish_reason=self.reason,
            usage=Usage(prompt_tokens=prompt_tokens, cached_tokens=0, generated_tokens=len(self.tokens)),
            timings=Timings(queue_s=0.0, time_to_first_token_s=0.0, total_s=0.0),
            group=group, attempt=attempt,
            logprobs=None if self.request.sampling.logprobs is None else [t.token_logprob() for t in self.tokens],
        )


@dataclass(frozen=True)
class Fail:
    """End the job FAILED with ``message``, without a retry (it would fail the same way again).

    ``end_written``: the job is valid and its log already ends with this
    error (an earlier attempt wrote it), so it is started like any valid job
    before it fails. Otherwise the job itself is invalid: it fails as
    claimed, never started, and its stream ends with the error.
    """

    message: str
    end_written: bool = False


Verdict = Union[Generate, Resume, FinishWithoutEngine, Fail]


def read_log_states(conn: redis.Redis, job_ids: list[str]) -> dict[str, LogState]:
    """Each job's :class:`LogState`: its token log's resume point and its cancel flag, read in one pipeline."""
    if not job_ids:
        return {}
    with conn.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            queue_resume_read(pipe, job_id)
            pipe.exists(keys.cancel_flag(job_id))
        replies = pipe.execute()
    states = {}
    for i, job_id in enumerate(job_ids):
        tokens, end = resume_point_from(replies[2 * i])
        states[job_id] = LogState(tuple(tokens), end, bool(replies[2 * i + 1]))
    return states


def validate(job: AllowListedJob, settings: Settings) -> GenerationRequest:
    """The request of ``job`` if the job may run here; else raise (the message says what is wrong).

    Raises :class:`ForbiddenJobFunction` or :class:`InvalidRequestError` (or
    ``ValueError``) for a job that is not a valid tpqueue job, and whatever
    rq raises for data it cannot decode.
    """
    job.allowed_func_name()
    if job.args:
        raise InvalidRequestError(f"a tpqueue job takes no positional arguments (got {len(job.args)}); "
                                  "its only argument is the keyword argument 'request'")
    request = check_limits(request_from_job_kwargs(job.kwargs), settings)
    if request.request_id != job.id:
        raise InvalidRequestError(f"the request id {request.request_id!r} differs from the job id {job.id!r}")
    return request


def decide(job: AllowListedJob, log: LogState, now: float, settings: Settings) -> Verdict:
    """What to do with claimed ``job``, given its :class:`LogState` at Unix time ``now``. No side effects."""
    try:
        request = validate(job, settings)
    except (ForbiddenJobFunction, TpqError, ValueError) as exc:
        return Fail(f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - undecodable data, a hostile payload: fail, never crash
        return Fail(f"the job's data cannot be read: {type(exc).__name__}: {exc}")
    tokens = log.tokens
    if log.cancelled:
        return FinishWithoutEngine(request, tokens, FinishReason.CANCELLED)
    if log.end is not None:
        if log.end.error is not None:
            return Fail(log.end.error, end_written=True)
        return FinishWithoutEngine(request, tokens, log.end.finish_reason, end_written=True)
    if tokens and tokens[-1].finish_reason is not None:
        return FinishWithoutEngine(request, tokens, tokens[-1].finish_reason)
    if request.deadline_unix_s is not None and now >= request.deadline_unix_s:
        return FinishWithoutEngine(request, tokens, FinishReason.DEADLINE)
    queued_before_s = max(0.0, now - job.enqueued_at.timestamp()) if job.enqueued_at else 0.0
    if tokens:
        return Resume(request, queued_before_s, tokens)
    return Generate(request, queued_before_s)
