"""The gateway's OpenAPI document (``GET /openapi.json``): its routes, with the bodies its handlers read and write.

The handlers read their JSON bodies themselves (bounded, and checked by
:mod:`producer.gateway.params` so that every refusal is OpenAI's 400, not
FastAPI's 422), so FastAPI alone would publish operations without bodies.
:func:`install` adds them: the request bodies are the JSON Schemas of
params' own models (one definition: what is published is what is checked),
the answers are described by the response models below, and every
operation lists the errors it can answer in OpenAI's shape. Tools that read
the document (client generators, schema fuzzers such as schemathesis) then
see the API as it is served.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

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


SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "id": {"type": "string", "description": "the last token index sent, per job (resume with Last-Event-ID)"},
    "data": {"type": "string", "description": "a chunk object as JSON, an error object as JSON, or [DONE]"}}}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}  # the schema of each event, as OpenAPI 3.2 reads it
PROMETHEUS_TEXT = {"text/plain": {"schema": {"type": "string"}}}
NONE: dict[str, Any] = {}

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
            if (path, method) not in BODIES:  # a route this table does not describe keeps FastAPI's own answer
                operation.setdefault("responses", {}).update(
                    {status: {"description": why, "content": error} for status, why in ERROR_STATUSES.items()})
                operation["responses"].pop("422", None)
                continue
            request_model, answer_model, other_content = BODIES[(path, method)]
            if request_model is not None:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": components.ref(request_model, "validation")}}}
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
