"""The gateway's OpenAPI document: every body a handler reads is published, and what it publishes is what is checked."""
from __future__ import annotations

import io
import json
import re
from typing import Any

import httpx
import openai
import pydantic
import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.datastructures import QueryParams
from starlette.requests import HTTPConnection

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


# ------------------------------------------------------------------ query and path parameters


def parameters_of(document: dict, path: str, method: str, where: str) -> dict[str, dict]:
    return {p["name"]: p for p in document["paths"][path][method].get("parameters", []) if p["in"] == where}


def http_routes() -> list[tuple[str, str]]:
    """``(path template, method)`` of every HTTP operation the app serves, included routers' too."""
    routes = [(context.path, method.lower()) for context in iter_route_contexts(create_app(get_settings()).routes)
              if isinstance(context.original_route, APIRoute) for method in sorted(context.methods or ())]
    assert {("/v1/files", "get"), ("/v1/batches", "get"), ("/v1/models", "get")} <= set(routes), routes
    return routes


def test_every_path_parameter_of_every_route_is_published(document):
    for path, method in http_routes():
        published = parameters_of(document, path, method, "path")
        assert set(published) == set(re.findall(r"{(\w+)}", path)), (method, path, published)
        assert all(p["required"] for p in published.values())


class RecordingQuery(QueryParams):
    """A request's query parameters that note every name the handler asks for, under its route and method."""

    def __init__(self, scope: dict, reads: set[tuple[str, str, str]]) -> None:
        super().__init__(scope["query_string"])
        self._where = (scope["app"].state.route_templates.of(scope), scope["method"].lower())
        self._reads = reads

    def _note(self, name: Any) -> None:
        self._reads.add((*self._where, name))

    def get(self, key: Any, default: Any = None) -> Any:
        self._note(key)
        return super().get(key, default)

    def getlist(self, key: Any) -> list[Any]:
        self._note(key)
        return super().getlist(key)

    def __getitem__(self, key: Any) -> Any:
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self._note(key)
        return super().__contains__(key)


def published_accepts(schema: dict, raw: str) -> bool:
    """Whether a query value ``raw`` is one ``schema`` allows (the subset of JSON Schema the document uses)."""
    assert set(schema) <= {"type", "minimum", "maximum", "enum", "default"}, f"unchecked schema keys: {schema}"
    if schema["type"] == "integer":
        if not re.fullmatch(r"-?[0-9]+", raw):
            return False
        return schema.get("minimum", int(raw)) <= int(raw) <= schema.get("maximum", int(raw))
    assert schema["type"] == "string", schema
    return raw in schema["enum"] if "enum" in schema else True


def probes(schema: dict, listed_id: str) -> list[str]:
    """Values at and past the bounds ``schema`` publishes (a string param gets a listed id: ``after`` takes one)."""
    if schema["type"] == "integer":
        low, high = schema["minimum"], schema["maximum"]
        return [str(low - 1), str(low), str(high), str(high + 1), "x", "2.0", ""]
    if "enum" in schema:
        return [*schema["enum"], "sideways", ""]
    return [listed_id]


BAD_LINE = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "nope", "prompt": "x"}}


def upload(client: openai.OpenAI) -> str:
    """A batch file whose one line is refused (a batch of it fails at once: nothing runs)."""
    return client.files.create(file=("in.jsonl", io.BytesIO(json.dumps(BAD_LINE).encode())), purpose="batch").id


@pytest.fixture
def listed(sdk) -> tuple[str, dict[str, str]]:
    """A gateway with files and a (failed) batch: its URL, and ids for each list route and path parameter."""
    client = sdk()
    file_id = upload(client)
    batch_id = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id
    ids = {"/v1/files": file_id, "/v1/batches": batch_id, "file_id": file_id, "batch_id": batch_id,
           "completion_id": "cmpl-none", "deleted_file_id": upload(client)}
    return str(client.base_url).removesuffix("/v1/"), ids


def test_the_query_parameters_the_app_reads_are_published_with_the_bounds_it_checks(document, listed, monkeypatch):
    base, ids = listed
    reads: set[tuple[str, str, str]] = set()
    monkeypatch.setattr(HTTPConnection, "query_params", property(lambda request: RecordingQuery(request.scope, reads)))
    routes = http_routes()
    for path, method in routes:  # every operation once, with ids that exist (a delete takes a file of its own)
        values = {**ids, "file_id": ids["deleted_file_id"]} if method == "delete" else ids
        httpx.request(method, base + path.format(**values), timeout=10)
    assert reads, "no handler read a query parameter: the recording does not see the app's reads"
    for path, method in routes:
        read = {name for p, m, name in reads if (p, m) == (path, method)}
        published = parameters_of(document, path, method, "query")
        assert set(published) == read, f"{method.upper()} {path}: reads {sorted(read)}, publishes {sorted(published)}"

    for (path, method), name in sorted({((p, m), n) for p, m, n in reads}):
        parameter = parameters_of(document, path, method, "query")[name]
        assert parameter["required"] is False and parameter["description"]
        for raw in probes(parameter["schema"], ids[path]):
            answer = httpx.request(method, base + path, params={name: raw}, timeout=10)
            assert answer.status_code in (200, 400), (path, name, raw, answer.text)
            served = answer.status_code == 200
            assert served == published_accepts(parameter["schema"], raw), (
                f"{method.upper()} {path}?{name}={raw!r}: the app answers {answer.status_code}, the document "
                f"{'allows' if published_accepts(parameter['schema'], raw) else 'refuses'} it")
            if not served:
                assert answer.json()["error"]["param"] == name, answer.text


def test_the_published_limit_default_is_what_a_list_without_one_returns(sdk, document):
    client = sdk()
    file_id = upload(client)
    default = parameters_of(document, "/v1/batches", "get", "query")["limit"]["schema"]["default"]
    for _ in range(default + 1):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    page = httpx.get(str(client.base_url) + "batches", timeout=10).json()
    assert len(page["data"]) == default and page["has_more"], (len(page["data"]), page["has_more"])
