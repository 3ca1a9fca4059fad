"""The job function on tpqueue's allow-list, and how a worker turns a job's request into prompt tokens
and the engine's result into the job's."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.errors import InvalidRequestError, TpqError
from common.results import GenerationResult, JobResult, Timings, TokenEvent, TokenLogprob
from common.schemas import GenerationRequest
from gpu_worker.engine.sequence import Priority
from gpu_worker.models.tokenizer import Tokenizer


class NotAWorkerGroup(TpqError, RuntimeError):
    """``generate`` was called by something other than a tpqueue worker group."""


def generate(request: dict[str, Any]) -> dict[str, Any]:
    """The function every tpqueue job names (``common.jobs.GENERATE_FUNC``).

    A worker group's rank 0 never calls it: it recognises the name, batches
    the job into its engine and finishes it through rq with a ``JobResult``.
    A stock ``rq worker`` that picked the job up would run this body, which
    refuses, so the job fails with a message that says where it belongs
    (and, with retries, goes back to its queue for a real worker).
    """
    raise NotAWorkerGroup(
        "tpqueue generation jobs run on a worker group (`tpq worker` or `tpq up`), which batches them "
        "into its model; a stock rq worker cannot run them"
    )


def prompt_token_ids(tokenizer: Tokenizer, request: GenerationRequest) -> list[int]:
    """The prompt of ``request`` as token ids: its text encoded, its chat rendered with the model's template,
    or its ``prompt_token_ids`` as they are (:class:`InvalidRequestError` for an id past the vocabulary)."""
    if request.prompt_token_ids is not None:
        ids = list(request.prompt_token_ids)
        unknown = sorted({i for i in ids if i >= tokenizer.vocab_size})
        if unknown:
            raise InvalidRequestError(f"prompt_token_ids holds ids outside this model's vocabulary [0, "
                                      f"{tokenizer.vocab_size}): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    elif request.prompt is not None:
        ids = tokenizer.encode(request.prompt)
    else:
        ids = tokenizer.encode_chat(list(request.messages or ()))
    if not ids:
        raise InvalidRequestError("the prompt encodes to no tokens; give at least one token of text")
    return ids


def engine_priority(request: GenerationRequest) -> Priority:
    """The scheduler priority of a request: interactive sessions before offline batch jobs."""
    return Priority.INTERACTIVE if request.priority == "interactive" else Priority.BATCH


def resumed_logprobs(request: GenerationRequest, tokens: Sequence[TokenEvent]) -> list[TokenLogprob] | None:
    """The log-probabilities of the tokens an earlier attempt logged, for a request that asked for them.

    An event logged without them (an older worker wrote it) gives an entry with ``logprob`` None.
    """
    if request.sampling.logprobs is None:
        return None
    return [t.token_logprob() for t in tokens]


def engine_job_result(result: GenerationResult, queued_before_s: float, group: str, attempt: int) -> JobResult:
    """The result rq stores for a job the engine ran: the engine's, its timings counted from the enqueue."""
    return JobResult(
        **result.model_dump(exclude={"timings"}),
        timings=Timings(queue_s=queued_before_s + result.timings.queue_s,
                        time_to_first_token_s=queued_before_s + result.timings.time_to_first_token_s,
                        total_s=queued_before_s + result.timings.total_s),
        group=group, attempt=attempt,
    )
