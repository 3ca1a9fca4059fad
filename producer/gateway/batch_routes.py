"""The Batch API's ``/v1/batches`` routes: create (checking every input line first), retrieve, cancel, list.

``POST /v1/batches`` reads the input file, checks every line
(:func:`producer.gateway.batch_lines.parse_lines`, then the client's own
:meth:`~producer.AsyncClient.build_request` on each job, then each line
against its model's vocabulary,
:func:`~producer.gateway.batch_lines.vocabulary_error`: token-id prompts
within it, and one published for lines asking for logprobs or echoing
token ids; with none published a plain token-id prompt is left to the
worker's check when it runs) and stores the
batch: ``failed`` with per-line ``errors`` when any line is refused
(nothing is enqueued), else ``in_progress`` with its checked lines, which
the :class:`~producer.gateway.batch_keeper.BatchKeeper` of some replica
then enqueues and harvests. Cancel moves the batch to ``cancelling``; the
keeper cancels its jobs and ends it ``cancelled`` with what finished.
"""
from __future__ import annotations

import asyncio

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from common import keys
from common.errors import InvalidRequestError
from common.settings import Settings
from producer.gateway.batch_lines import ENDPOINTS, BatchLine, LineError, capped, parse_lines, vocabulary_error
from producer.gateway import batch_store as store
from producer.gateway.batch_keeper import base_id
from producer.gateway.errors import APIError, bad_request
from producer.gateway.files import file_content, list_body, list_limit, page
from producer.gateway.records import now_s
from producer.gateway.vocab import Vocabulary

LIST_DEFAULT_LIMIT = 20
"""Batches ``GET /v1/batches`` lists without a ``limit`` (OpenAI's default)."""
MAX_LIST_LIMIT = 100
"""The largest ``limit`` ``GET /v1/batches`` takes (OpenAI's bound)."""
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY_CHARS
            and len(v) <= MAX_METADATA_VALUE_CHARS for k, v in metadata.items()):
        raise bad_request(f"metadata must be an object of at most {MAX_METADATA_PAIRS} string pairs (keys up to "
                          f"{MAX_METADATA_KEY_CHARS} characters, values up to {MAX_METADATA_VALUE_CHARS})",
                          param="metadata")
    return metadata


def _check_create(body: Any) -> tuple[str, str, dict[str, str] | None]:
    """``input_file_id``, ``endpoint`` and ``metadata`` of a create body; 400 for anything refused."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise bad_request("input_file_id is required (the id of a file uploaded with purpose batch)",
                          param="input_file_id")
    if endpoint not in ENDPOINTS:
        raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
    if body.get("completion_window") != "24h":
        raise bad_request(f"completion_window must be \"24h\", got {body.get('completion_window')!r}",
                          param="completion_window")
    return input_file_id, endpoint, _check_metadata(body.get("metadata"))


def _build_errors(lines: list[BatchLine], build: Callable[..., Any], batch_id: str) -> list[LineError]:
    """The lines the client itself refuses (its limits), checked as the keeper will build them."""
    errors = []
    for line in lines:
        try:
            line.requests(build, base_id(batch_id, line))
        except InvalidRequestError as e:
            errors.append(LineError("invalid_request", f"line {line.number}: {e}", line.number, "body"))
    return capped(errors)


def _checked_lines(content: bytes, endpoint: str, models: set[str], build: Callable[..., Any],
                   batch_id: str) -> tuple[list[BatchLine], list[LineError]]:
    """The input file's lines and what is wrong with them (the parse's errors, else the client's)."""
    lines, errors = parse_lines(content, endpoint, models, rendering=True)
    if not errors:
        errors = _build_errors(lines, build, batch_id)
    return lines, errors


async def _vocabulary_errors(completions: Any, lines: list[BatchLine]) -> list[LineError]:
    """The lines their models' vocabularies refuse (:func:`~producer.gateway.batch_lines.vocabulary_error`),
    each model's read once."""
    vocabs: dict[str, Vocabulary | APIError] = {}
    errors = []
    for line in lines:
        if not line.reads_vocabulary:
            continue
        model = line.completion.model
        if model not in vocabs:
            try:
                vocabs[model] = await completions.vocabulary(model)
            except APIError as e:  # none published: vocabulary_error decides what that means for the line
                vocabs[model] = e
        error = vocabulary_error(line, vocabs[model])
        if error is not None:
            errors.append(error)
    return capped(errors)


def router(settings: Settings, read_json: Callable[[Request, int], Awaitable[Any]]) -> APIRouter:
    """``POST/GET /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``."""
    routes = APIRouter()

    def completions_of(request: Request) -> Any:
        return request.app.state.completions

    @routes.post("/v1/batches")
    async def create_batch(request: Request) -> JSONResponse:
        input_file_id, endpoint, metadata = _check_create(await read_json(request, settings.http_max_body_bytes))
        completions = completions_of(request)
        conn = completions.client.redis
        content = await file_content(conn, input_file_id)
        deployment = await completions.deployment()
        reason = deployment.unavailable_reason()
        if reason is not None:
            raise APIError(503, reason, code="no_live_group")
        batch_id = "batch_" + uuid.uuid4().hex
        # 50,000 lines take seconds to parse and check: on a thread, so the other requests keep being served
        lines, errors = await asyncio.to_thread(_checked_lines, content, endpoint, set(deployment.models),
                                                completions.client.build_request, batch_id)
        if not errors:
            errors = await _vocabulary_errors(completions, lines)
        stored = [] if errors else await asyncio.to_thread(lambda: [line.as_json() for line in lines])
        spec = store.new_spec(batch_id, endpoint, input_file_id, metadata, now_s())
        state = await store.create(conn, spec, lines=stored, errors=[e.as_dict() for e in errors] or None)
        request.app.state.batch_keeper.wake()
        return JSONResponse(state.as_object())

    @routes.get("/v1/batches")
    async def list_batches(request: Request) -> JSONResponse:
        conn = completions_of(request).client.redis
        ids, has_more = await page(conn, keys.api_batches(), request.query_params.get("after"),
                                   list_limit(request, LIST_DEFAULT_LIMIT, MAX_LIST_LIMIT))
        states = [await store.load(conn, batch_id) for batch_id in ids]
        return JSONResponse(list_body([s.as_object() for s in states if s is not None], has_more))

    @routes.get("/v1/batches/{batch_id}")
    async def retrieve_batch(request: Request, batch_id: str) -> JSONResponse:
        state = await store.load_or_404(completions_of(request).client.redis, batch_id)
        return JSONResponse(state.as_object())

    @routes.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> JSONResponse:
        conn = completions_of(request).client.redis
        state = await store.load_or_404(conn, batch_id)
        if not await store.move(conn, batch_id, "cancelling", ["validating", "in_progress"], now_s()):
            state = await store.load_or_404(conn, batch_id)
            if state.status != "cancelling":
                raise APIError(409, f"batch {batch_id!r} is {state.status}; only a batch in progress can be "
                                    "cancelled", code="batch_not_cancellable", type_="conflict_error")
        request.app.state.batch_keeper.wake()
        return JSONResponse((await store.load_or_404(conn, batch_id)).as_object())

    return routes
