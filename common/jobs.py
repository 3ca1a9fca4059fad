"""The wire protocol between client and worker, in one place.

A generation job is an rq job (``JSONSerializer``, never pickle) whose
function name is :data:`GENERATE_FUNC` and whose only keyword argument is
``request``: the :class:`GenerationRequest` as JSON-safe data
(``request.model_dump(mode="json")``), with ``request_id`` equal to the job
id. Token events travel as compact JSON bytes of :class:`TokenEvent`.
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from common import keys
from common.errors import InvalidRequestError
from common.results import TokenEvent
from common.schemas import GenerationRequest, describe_validation_error, parse_request

GENERATE_FUNC = "gpu_worker.jobs.generate"
"""The one job function a tpqueue worker runs (its allow-list)."""

REQUEST_KWARG = "request"


def job_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """The rq job kwargs carrying ``request``: ``{"request": <JSON-safe dict>}``."""
    return {REQUEST_KWARG: request.model_dump(mode="json")}


def request_from_job_kwargs(kwargs: Any) -> GenerationRequest:
    """The :class:`GenerationRequest` inside a job's kwargs, validated.

    Raises :class:`InvalidRequestError` naming what is malformed: kwargs that
    are not a mapping, a missing or extra key, or an invalid request.
    """
    if not isinstance(kwargs, dict):
        raise InvalidRequestError(f"job kwargs must be a mapping, got {type(kwargs).__name__}")
    if set(kwargs) != {REQUEST_KWARG}:
        names = ", ".join(sorted(map(str, kwargs))) or "none"
        raise InvalidRequestError(f"job kwargs must be exactly {{'{REQUEST_KWARG}': ...}}; got keys: {names}")
    return parse_request(kwargs[REQUEST_KWARG], what="job request")


def queue_for(request: GenerationRequest, num_shards: int) -> str:
    """The rq queue a request goes to: its session's ``gen.<shard>``, or ``batch`` without a session."""
    if request.session_id is None:
        return keys.BATCH_QUEUE
    return keys.shard_queue_name(keys.shard_for_session(request.session_id, num_shards))


def encode_token_event(event: TokenEvent) -> bytes:
    """``event`` as compact UTF-8 JSON bytes, for PUBLISH and the token log."""
    return event.model_dump_json().encode("utf-8")


def decode_token_event(data: bytes | str) -> TokenEvent:
    """The :class:`TokenEvent` in ``data`` (bytes or str from Redis), validated.

    Raises :class:`InvalidRequestError` for anything that is not a valid event.
    """
    if not isinstance(data, (bytes, str)):
        raise InvalidRequestError(f"a token event must be bytes or str, got {type(data).__name__}")
    try:
        return TokenEvent.model_validate_json(data)
    except ValidationError as e:
        raise InvalidRequestError(f"malformed token event: {describe_validation_error(e)}") from None
