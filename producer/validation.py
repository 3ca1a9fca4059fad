"""Checking what a client is asked to submit, before any Redis command: requests, batches, waits."""
from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from common.errors import InvalidRequestError
from common.schemas import GenerationRequest, check_limits, parse_request
from common.settings import Settings


def checked(request: GenerationRequest, settings: Settings, now: float | None = None) -> GenerationRequest:
    """``request`` ready to enqueue: with an id and (if sampled) a seed, within ``settings``' limits, not past due.

    Raises :class:`InvalidRequestError` for a request over a deployment
    limit or with a deadline already past (``now``: default the time now).
    """
    if request.request_id is None:
        request = request.model_copy(update={"request_id": uuid.uuid4().hex})
    if not request.sampling.greedy and request.sampling.seed is None:
        # Stored with the job, so a run after a crash (or a lost completion) draws the same tokens.
        seeded = request.sampling.model_copy(update={"seed": secrets.randbits(62)})
        request = request.model_copy(update={"sampling": seeded})
    request = check_limits(request, settings)
    deadline = request.deadline_unix_s
    if deadline is not None:
        now = time.time() if now is None else now
        if deadline <= now:
            raise InvalidRequestError(
                f"deadline_unix_s {deadline} is {now - deadline:.3f} s in the past; "
                "give a future Unix time (time.time() + seconds)"
            )
    return request


def checked_batch(requests: Iterable[GenerationRequest | Mapping[str, Any]], settings: Settings) -> list[GenerationRequest]:
    """Every request of a batch :func:`checked`; :class:`InvalidRequestError` names the first bad one's index.

    Refuses more than ``settings.max_batch_size`` requests and a request id
    that repeats within the batch.
    """
    if isinstance(requests, (str, bytes, Mapping, GenerationRequest)):
        raise InvalidRequestError("submit_batch takes an iterable of requests (a list of dicts or GenerationRequest)")
    limit = settings.max_batch_size
    batch: list[GenerationRequest] = []
    first_index: dict[str, int] = {}
    now = time.time()
    for i, item in enumerate(requests):
        if i >= limit:
            raise InvalidRequestError(
                f"a batch may hold at most {limit} requests (TPQ_MAX_BATCH_SIZE); split it"
            )
        data = dict(item) if isinstance(item, Mapping) else item
        try:
            request = checked(parse_request(data, what="request"), settings, now=now)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"batch request {i}: {e}") from None
        assert request.request_id is not None
        if request.request_id in first_index:
            raise InvalidRequestError(
                f"batch request {i}: request_id {request.request_id!r} repeats that of request "
                f"{first_index[request.request_id]}; ids must be unique within a batch"
            )
        first_index[request.request_id] = i
        batch.append(request)
    return batch


def listed(messages: Any) -> Any:
    """``messages`` as a list when it is a sequence of messages; anything else as is, for the schema to refuse."""
    if isinstance(messages, Iterable) and not isinstance(messages, (str, bytes, Mapping)):
        return list(messages)
    return messages


def check_wait(wait_s: float) -> float:
    """``wait_s`` as a float of seconds >= 0; :class:`InvalidRequestError` otherwise."""
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not math.isfinite(wait_s) or wait_s < 0:
        raise InvalidRequestError(f"wait_s must be a finite number of seconds >= 0, got {wait_s!r}")
    return float(wait_s)
