"""Schema fuzzing: schemathesis generates requests from the gateway's own OpenAPI document.

The gateway runs in front of a real group of the tiny random model, so the
generated requests that are valid run real jobs. Every operation of the
document is fuzzed (bodies, path parameters, headers; about half of the
generated bodies name the served model, so that they reach the queue), and
every answer must be no 5xx, a status and content type the document lists,
and a body that matches the document's schema for it. The Batch API is
fuzzed the same way: about half of the batch bodies (and of the file ids
read) name a real uploaded input file, so that batches are created and run.
"""
from __future__ import annotations

import json

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 60
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def gateway(start_stack, start_gateway, tiny_llama_dir, monkeypatch):
    """``(gateway URL, served model id)``: a gateway in front of one group of the tiny model."""
    monkeypatch.setenv("TPQ_HTTP_DISCONNECT_GRACE_S", "0")
    start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    server = start_gateway(http_disconnect_grace_s=0)
    [model] = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"]
    return server.url, model["id"]


def upload_input_file(url: str, model: str) -> str:
    """The id of a good batch input file of two chat lines for ``model``."""
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
             for i in range(2)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    answer = requests.post(f"{url}/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                           timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def test_fuzzed_requests_get_documented_answers_and_never_a_5xx(gateway):
    url, model = gateway
    input_file_id = upload_input_file(url, model)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    session = requests.Session()
    ran: dict[str, int] = {}
    statuses: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                                "GET /v1/models", "GET /health"}
    for operation in operations:
        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
        @given(case=operation.as_strategy(), served=st.booleans())
        def fuzz(case, served: bool) -> None:
            if served and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model  # reach the queue, not only the 404 of an unknown model
            if served and isinstance(case.body, dict) and "input_file_id" in case.body:
                case.body["input_file_id"] = input_file_id  # create a batch, not only the 404 of an unknown file
            if served and case.method == "GET" and "file_id" in (case.path_parameters or {}):
                case.path_parameters["file_id"] = input_file_id
            response = case.call_and_validate(base_url=url, session=session, checks=CHECKS, timeout=120)
            ran[operation.label] = ran.get(operation.label, 0) + 1
            statuses.setdefault(operation.label, set()).add(response.status_code)

        fuzz()
    total = sum(ran.values())
    print(f"schemathesis: {total} cases over {len(ran)} operations: {ran}; statuses: {statuses}")
    assert set(ran) == {op.label for op in operations}
    assert total >= len(operations) * 10
    for created in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/files",
                    "POST /v1/batches"):  # some fuzzed requests really ran
        assert 200 in statuses[created], statuses


def test_a_prompt_longer_than_the_models_context_is_a_400_not_a_500(gateway):
    import openai

    url, model = gateway
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model, prompt="word " * 5000, max_tokens=4)
    error = caught.value.body
    assert error["code"] == "request_refused_by_model" and "context" in error["message"], error
