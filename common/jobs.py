"""The wire protocol between client and worker, in one place.

A generation job is an rq job (``JSONSerializer``, never pickle) whose
function name is :data:`GENERATE_FUNC` and whose only keyword argument is
``request``: the :class:`GenerationRequest` as JSON-safe data
(``request.model_dump(mode="json")``), with ``request_id`` equal to the job
id. Token events travel as compact JSON bytes of :class:`TokenEvent`.

A job's stream is a sequence of messages: one :class:`TokenEvent` per
generated token (``index`` 0, 1, 2, ...), then one :class:`StreamEnd`. The
worker PUBLISHes each message on ``keys.token_channel(job_id)`` and appends
it to the durable log ``keys.token_log(job_id)``, a Redis stream whose entry
ids encode the position: token ``i`` is entry ``0-<i+1>`` and the end record
of a job with ``n`` tokens is ``0-<n+1>`` (:func:`log_entry_id`). Explicit
ids make the log free of duplicates by construction (Redis refuses an id
that is not above the last one) and let a client resume with
``XRANGE log 0-<next+1> +``. Each entry has one field, ``m``, holding the
same bytes as the pub/sub message. The job's result is the rq job result:
``JobResult.model_dump(mode="json")``.
"""
from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from common import keys
from common.errors import InvalidRequestError
from common.results import StreamEnd, TokenEvent
from common.schemas import GenerationRequest, parse_request, validate_or_raise

GENERATE_FUNC = "gpu_worker.serve.jobs.generate"
"""The one job function a tpqueue worker runs (its allow-list)."""

REQUEST_KWARG = "request"

LOG_FIELD = "m"
"""The one field of a token-log entry: the message bytes."""

StreamMessage = TokenEvent | StreamEnd
_STREAM_MESSAGE: TypeAdapter[TokenEvent | StreamEnd] = TypeAdapter(StreamMessage)


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


def encode_stream_message(message: TokenEvent | StreamEnd) -> bytes:
    """A token event or end record as compact UTF-8 JSON bytes (for PUBLISH and the token log)."""
    return message.model_dump_json().encode("utf-8")


def decode_stream_message(data: bytes | str) -> TokenEvent | StreamEnd:
    """The :class:`TokenEvent` or :class:`StreamEnd` in ``data``, validated.

    Raises :class:`InvalidRequestError` for anything that is neither.
    """
    if not isinstance(data, (bytes, str)):
        raise InvalidRequestError(f"a stream message must be bytes or str, got {type(data).__name__}")
    return validate_or_raise(_STREAM_MESSAGE.validate_json, data, "malformed stream message")


def log_entry_id(position: int) -> str:
    """The token-log entry id of message ``position`` (token index, or token count for the end): ``0-<position+1>``."""
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise InvalidRequestError(f"a stream position must be an int >= 0, got {position!r}")
    return f"0-{position + 1}"


def log_entry_position(entry_id: bytes | str) -> int:
    """Inverse of :func:`log_entry_id`: ``0-5`` -> 4. :class:`InvalidRequestError` for other ids."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, sep, seq = text.partition("-")
    if ms != "0" or not sep or not seq.isascii() or not seq.isdigit() or int(seq) < 1:
        raise InvalidRequestError(f"{text!r} is not a tpqueue token-log entry id (expected '0-<n>', n >= 1)")
    return int(seq) - 1
