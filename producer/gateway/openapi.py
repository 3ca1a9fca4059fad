"""The gateway's OpenAPI document (``GET /openapi.json``): its routes, with the bodies its handlers read and write.

The handlers read their JSON bodies themselves (bounded, and checked by
:mod:`producer.gateway.params` so that every refusal is OpenAI's 400, not
FastAPI's 422), so FastAPI alone would publish operations without bodies.
:func:`install` adds them: the request bodies are the JSON Schemas of
params' own models (one definition: what is published is what is checked;
the Batch API's create body and multipart upload are models below, built
from the bounds ``batch_routes`` checks and pinned to its check by
tests/gateway/test_openapi.py; so are the list routes' query parameters,
:data:`QUERY`, which the handlers read themselves), the answers (files and batches included)
are described by the response models below, and every
operation lists the errors it can answer in OpenAI's shape. Tools that read
the document (client generators, schema fuzzers such as schemathesis) then
see the API as it is served.
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from producer.gateway.batch_lines import ENDPOINTS
from producer.gateway import batch_routes, files
from producer.gateway.batch_routes import MAX_METADATA_KEY_CHARS, MAX_METADATA_PAIRS, MAX_METADATA_VALUE_CHARS
from producer.gateway.batch_store import STATUSES
from producer.gateway.params import ChatBody, CompletionBody

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {"400": "Bad request", "401": "Missing or unknown API key", "404": "Unknown model or id",
                  "409": "Conflict", "413": "Body too large", "429": "Rate limit or queue full",
                  "500": "The job failed", "503": "No live worker group"}


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {...}}``."""

    error: ErrorDetail


class ModelCard(BaseModel):
    """One served model."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    """Token counts of a completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, Any] | None = None


class AssistantMessage(BaseModel):
    """The message of a chat choice."""

    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    """A whole (non-streamed) chat completion."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    """One choice of a text completion."""

    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class TextCompletion(BaseModel):
    """A whole (non-streamed) text completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class Health(BaseModel):
    """``GET /health`` when a live group serves."""

    status: Literal["ok"]
    groups: dict[str, str]


class FileUpload(BaseModel):
    """``POST /v1/files``, as multipart/form-data: the file and its purpose (only ``batch`` is served)."""

    file: bytes
    purpose: Literal["batch"]


class FileObject(BaseModel):
    """An uploaded file (or a batch's output or error file)."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None
    status_details: str | None


class FileList(BaseModel):
    """``GET /v1/files``: a cursor page of files."""

    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    """``DELETE /v1/files/{file_id}``."""

    id: str
    object: Literal["file"]
    deleted: bool


MetadataKey = Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_PAIRS)]


class BatchCreateBody(BaseModel):
    """``POST /v1/batches``: the uploaded input file, the endpoint its lines call, the window, metadata."""

    input_file_id: str = Field(min_length=1)
    endpoint: Literal[tuple(ENDPOINTS)]  # type: ignore[valid-type]
    completion_window: Literal["24h"]
    metadata: Metadata | None = None


class BatchLineError(BaseModel):
    """One input line refused at creation (``line`` counts from 1)."""

    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    """A failed batch's validation errors."""

    object: Literal["list"]
    data: list[BatchLineError]


class RequestCounts(BaseModel):
    """A batch's requests: all of them, those completed, those failed."""

    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    """OpenAI's batch object."""

    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Literal[STATUSES]  # type: ignore[valid-type]
    errors: BatchErrors | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    expires_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    metadata: dict[str, str] | None
    request_counts: RequestCounts


class BatchList(BaseModel):
    """``GET /v1/batches``: a cursor page of batches, newest first."""

    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "id": {"type": "string", "description": "the last token index sent, per job (resume with Last-Event-ID)"},
    "data": {"type": "string", "description": "a chunk object as JSON, an error object as JSON, or [DONE]"}}}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}  # the schema of each event, as OpenAPI 3.2 reads it
PROMETHEUS_TEXT = {"text/plain": {"schema": {"type": "string"}}}
OCTETS = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
NONE: dict[str, Any] = {}
REQUEST_MEDIA: dict[type[BaseModel], str] = {FileUpload: "multipart/form-data"}
"""Request bodies not sent as JSON, by model."""

# (path, method) -> (request body model or None, JSON 200 answer model or None, other 200 content types)
BODIES: dict[tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel] | None, dict[str, Any]]] = {
    ("/health", "get"): (None, Health, NONE),
    ("/metrics", "get"): (None, None, PROMETHEUS_TEXT),
    ("/v1/models", "get"): (None, ModelList, NONE),
    ("/v1/chat/completions", "post"): (ChatBody, ChatCompletion, SSE),
    ("/v1/completions", "post"): (CompletionBody, TextCompletion, SSE),
    ("/v1/chat/completions/{completion_id}", "get"): (None, ChatCompletion, NONE),
    ("/v1/completions/{completion_id}", "get"): (None, TextCompletion, NONE),
    ("/v1/chat/completions/{completion_id}/stream", "get"): (None, None, SSE),
    ("/v1/completions/{completion_id}/stream", "get"): (None, None, SSE),
    ("/v1/files", "post"): (FileUpload, FileObject, NONE),
    ("/v1/files", "get"): (None, FileList, NONE),
    ("/v1/files/{file_id}", "get"): (None, FileObject, NONE),
    ("/v1/files/{file_id}", "delete"): (None, FileDeleted, NONE),
    ("/v1/files/{file_id}/content", "get"): (None, None, OCTETS),
    ("/v1/batches", "post"): (BatchCreateBody, Batch, NONE),
    ("/v1/batches", "get"): (None, BatchList, NONE),
    ("/v1/batches/{batch_id}", "get"): (None, Batch, NONE),
    ("/v1/batches/{batch_id}/cancel", "post"): (None, Batch, NONE),
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _limit(default: int, most: int) -> dict[str, Any]:
    return _query("limit", {"type": "integer", "minimum": 1, "maximum": most, "default": default},
                  f"how many objects a page holds at most (1 to {most}; 400 otherwise)")


AFTER = _query("after", {"type": "string"}, "the last id of the previous page (`last_id`): this page lists the "
                                            "objects after it (400 when no such id is listed)")
# (path, method) -> the query parameters its handler reads, with the bounds it checks them against (the handlers
# read request.query_params themselves, so FastAPI sees none; tests/gateway/test_openapi.py pins them to the app)
QUERY: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("/v1/files", "get"): [
        AFTER, _limit(files.MAX_LIST_LIMIT, files.MAX_LIST_LIMIT),
        _query("order", {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
               "by creation time: desc (newest first) or asc"),
        _query("purpose", {"type": "string"}, "only files of this purpose (batch, batch_output)")],
    ("/v1/batches", "get"): [AFTER, _limit(batch_routes.LIST_DEFAULT_LIMIT, batch_routes.MAX_LIST_LIMIT)],
}


class _Components:
    """The document's ``components.schemas``, filled as models are referenced."""

    def __init__(self, schemas: dict[str, Any]) -> None:
        self.schemas = schemas

    def ref(self, model: type[BaseModel], mode: Literal["validation", "serialization"]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=REF, mode=mode)
        self.schemas.update(schema.pop("$defs", {}))
        self.schemas[model.__name__] = schema
        return {"$ref": REF.format(model=model.__name__)}


def build_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app``'s routes, with request bodies, answers and errors."""
    document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                           description="OpenAI-compatible API over tpqueue's Redis queues")
    components = _Components(document.setdefault("components", {}).setdefault("schemas", {}))
    components.schemas.pop("HTTPValidationError", None)  # FastAPI's 422: never answered (params gives 400s)
    components.schemas.pop("ValidationError", None)
    error = {"application/json": {"schema": components.ref(ErrorBody, "serialization")}}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            query = copy.deepcopy(QUERY.get((path, method), []))
            if query:
                operation["parameters"] = [*operation.get("parameters", []), *query]
            if (path, method) not in BODIES:  # a route this table does not describe keeps FastAPI's own answer
                operation.setdefault("responses", {}).update(
                    {status: {"description": why, "content": error} for status, why in ERROR_STATUSES.items()})
                operation["responses"].pop("422", None)
                continue
            request_model, answer_model, other_content = BODIES[(path, method)]
            if request_model is not None:
                media = REQUEST_MEDIA.get(request_model, "application/json")
                operation["requestBody"] = {"required": True, "content": {
                    media: {"schema": components.ref(request_model, "validation")}}}
            ok: dict[str, Any] = {}
            if answer_model is not None:
                ok["application/json"] = {"schema": components.ref(answer_model, "serialization")}
            ok.update(other_content)
            responses = {"200": {"description": "OK", **({"content": ok} if ok else {})}}
            responses.update({status: {"description": why, "content": error} for status, why in ERROR_STATUSES.items()})
            operation["responses"] = {**responses, **{k: v for k, v in operation.get("responses", {}).items()
                                                      if k not in responses and k != "422"}}
    return document


def install(app: FastAPI) -> None:
    """Serve :func:`build_document` as ``app``'s OpenAPI document (built once, on the first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
