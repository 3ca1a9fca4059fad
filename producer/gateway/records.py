"""What the gateway keeps in Redis about a completion, so that any replica can resume or fetch it.

A completion's id is the id of its first job; with more than one job (``n``
choices, or several prompts) job ``i`` is ``<id>-<i>`` (:func:`job_ids`), so
the ids follow from the completion id alone and a retried request (same
``Idempotency-Key`` or ``request_id``) names the same jobs. The
:class:`CompletionRecord` (``keys.completion``, a JSON string with the
result TTL) says how many jobs there are and how to render them. The
attach counter (``keys.stream_attach``) counts the HTTP streams that
attached to a completion: a stream whose client went away cancels the jobs
after the disconnect grace only if no stream attached since.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common import keys
from common.errors import InvalidRequestError
from producer.gateway.errors import bad_request
from producer.gateway.params import Completion, Kind

ID_PREFIXES: dict[str, str] = {"chat": "chatcmpl-", "text": "cmpl-"}


class CompletionRecord(BaseModel):
    """One completion as stored: kind (``chat``/``text``), model, Unix creation time, jobs, choices per prompt.

    How to render it: ``logprobs`` (the alternatives per token: chat's
    ``top_logprobs``, completions' ``logprobs``; None: no logprobs),
    ``echo`` (completions: the prompt comes first), ``prompt_only``
    (``max_tokens: 0`` with echo: the one token each job generated is not shown).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    kind: Kind
    model: str
    created: int
    num_jobs: int = Field(ge=1)
    n: int = Field(ge=1)
    include_usage: bool = False
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    prompt_only: bool = False

    @property
    def job_ids(self) -> list[str]:
        """The ids of the completion's jobs, choice ``i`` at index ``i``."""
        return job_ids(self.id, self.num_jobs)


def record_of(completion: Completion, cid: str, created: int) -> CompletionRecord:
    """The record of a new completion ``cid`` of ``completion``: its jobs and how to render them."""
    return CompletionRecord(id=cid, kind=completion.kind, model=completion.model, created=created,
                            num_jobs=completion.num_jobs, n=completion.n, include_usage=completion.include_usage,
                            logprobs=completion.logprobs, echo=completion.echo, prompt_only=completion.prompt_only)


def job_ids(completion_id: str, num_jobs: int) -> list[str]:
    """``[completion_id]`` for one job, else ``<completion_id>-<i>`` for ``i`` in ``0 .. num_jobs - 1``."""
    if num_jobs == 1:
        return [completion_id]
    return [keys.validate_job_id(f"{completion_id}-{i}") for i in range(num_jobs)]


def completion_id(kind: Kind, idempotency_key: str | None, request_id: str | None) -> str:
    """The id of a new completion: the ``Idempotency-Key`` header, else ``request_id``, else a fresh one.

    A header that is not a valid job id (letters, digits, ``_`` and ``-``,
    at most 128) is hashed into one, so any key works; a ``request_id`` in
    the body must be a valid job id itself (a 400 says so).
    """
    if idempotency_key:
        try:
            return keys.validate_job_id(idempotency_key)
        except InvalidRequestError:
            return "idem-" + hashlib.blake2b(idempotency_key.encode("utf-8", "surrogatepass"),
                                             digest_size=16).hexdigest()
    if request_id is not None:
        try:
            return keys.validate_job_id(request_id)
        except InvalidRequestError as e:
            raise bad_request(f"request_id: {e}", param="request_id") from None
    return ID_PREFIXES[kind] + uuid.uuid4().hex


async def save(conn: Any, record: CompletionRecord, ttl_s: int) -> CompletionRecord:
    """Store ``record`` unless one with its id exists; the stored one (a retried request keeps the first)."""
    key = keys.completion(record.id)
    if await conn.set(key, record.model_dump_json(), nx=True, ex=ttl_s):
        return record
    existing = await load(conn, record.id)
    return existing if existing is not None else record


async def load(conn: Any, cid: str) -> CompletionRecord | None:
    """The stored record of completion ``cid``; None if there is none (or it is unreadable, or ``cid`` is bad)."""
    try:
        raw = await conn.get(keys.completion(cid))
    except InvalidRequestError:
        return None
    if raw is None:
        return None
    try:
        return CompletionRecord.model_validate_json(raw)
    except ValidationError:
        return None


async def attach(conn: Any, cid: str, ttl_s: int) -> int:
    """Count one more stream attached to completion ``cid``; the count after it."""
    key = keys.stream_attach(cid)
    async with conn.pipeline(transaction=True) as pipe:
        pipe.incrby(key, 1)  # INCRBY: the least-privilege ACL user (README, "Security") has no INCR
        pipe.expire(key, ttl_s)
        count, _ = await pipe.execute()
    return int(count)


async def attached_count(conn: Any, cid: str) -> int:
    """How many streams have attached to completion ``cid`` so far."""
    raw = await conn.get(keys.stream_attach(cid))
    return int(raw or 0)


def now_s() -> int:
    """The Unix time in whole seconds, as OpenAI's ``created`` fields give it."""
    return int(time.time())
