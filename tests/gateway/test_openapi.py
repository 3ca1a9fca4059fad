"""The gateway's OpenAPI document: every body a handler reads is published, and what it publishes is what is checked."""
from __future__ import annotations

import pydantic
import pytest

from common.settings import get_settings
from producer.gateway.app import create_app
from producer.gateway.batch_routes import _check_create
from producer.gateway.errors import APIError
from producer.gateway.openapi import BatchCreateBody


@pytest.fixture(scope="module")
def document() -> dict:
    return create_app(get_settings()).openapi()


def schema_of(document: dict, content: dict) -> dict:
    ref = content["schema"]["$ref"].rsplit("/", 1)[-1]
    return document["components"]["schemas"][ref]


@pytest.mark.parametrize("path, method, media", [
    ("/v1/chat/completions", "post", "application/json"), ("/v1/completions", "post", "application/json"),
    ("/v1/batches", "post", "application/json"), ("/v1/files", "post", "multipart/form-data"),
])
def test_every_route_that_reads_a_body_publishes_it(document, path, method, media):
    body = document["paths"][path][method]["requestBody"]
    assert body["required"] and list(body["content"]) == [media]
    assert schema_of(document, body["content"][media])["required"]


def test_the_upload_and_batch_bodies_name_their_fields(document):
    upload_body = document["paths"]["/v1/files"]["post"]["requestBody"]
    upload = schema_of(document, upload_body["content"]["multipart/form-data"])
    assert upload["properties"]["file"] == {"type": "string", "format": "binary", "title": "File"}
    assert upload["properties"]["purpose"]["const"] == "batch" and set(upload["required"]) == {"file", "purpose"}
    batch = schema_of(document, document["paths"]["/v1/batches"]["post"]["requestBody"]["content"]["application/json"])
    assert set(batch["properties"]) == {"input_file_id", "endpoint", "completion_window", "metadata"}
    assert set(batch["required"]) == {"input_file_id", "endpoint", "completion_window"}


@pytest.mark.parametrize("path, method, answer", [
    ("/v1/files", "post", "FileObject"), ("/v1/files", "get", "FileList"), ("/v1/files/{file_id}", "get", "FileObject"),
    ("/v1/files/{file_id}", "delete", "FileDeleted"), ("/v1/batches", "post", "Batch"),
    ("/v1/batches", "get", "BatchList"), ("/v1/batches/{batch_id}", "get", "Batch"),
    ("/v1/batches/{batch_id}/cancel", "post", "Batch"),
])
def test_the_batch_api_answers_are_described(document, path, method, answer):
    ok = document["paths"][path][method]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["$ref"].endswith(f"/{answer}")
    assert "422" not in document["paths"][path][method]["responses"]


GOOD = {"input_file_id": "file-1", "endpoint": "/v1/completions", "completion_window": "24h"}


@pytest.mark.parametrize("body", [
    GOOD, {**GOOD, "metadata": {"k": "v"}}, {**GOOD, "metadata": None}, {**GOOD, "input_file_id": ""},
    {**GOOD, "endpoint": "/v1/embeddings"}, {**GOOD, "completion_window": "1h"},
    {k: v for k, v in GOOD.items() if k != "endpoint"}, {**GOOD, "metadata": {"k" * 65: "v"}},
    {**GOOD, "metadata": {"k": "v" * 513}}, {**GOOD, "metadata": {str(i): "v" for i in range(17)}},
    {**GOOD, "metadata": {"k": 1}},
])
def test_the_published_batch_body_accepts_what_the_route_accepts(body):
    try:
        BatchCreateBody.model_validate(body, strict=True)
        published = True
    except pydantic.ValidationError:
        published = False
    try:
        _check_create(body)
        served = True
    except APIError:
        served = False
    assert published == served, body
