"""The gateway over real HTTP: uvicorn, a real redis-server, the real ``openai`` SDK and raw SSE through httpx.

No model runs here: a registered group with a live heartbeat makes the
model served, and tests.doubles.ProtocolWorker plays the worker's side of
the protocol (tokens into the durable log and pub/sub, the rq result), so
every token the gateway sends is one the test wrote.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import redis

from common import keys
from common.settings import get_settings
from producer import Client
from tests.gateway.conftest import FAKE_MODEL, wait_for
from tests.gateway.sse import content_of, sse_events

MESSAGES = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------ answers


def test_models_health_and_metrics(sdk, redis_url):
    client = sdk()
    [model] = client.models.list().data
    assert (model.id, model.object, model.owned_by) == (FAKE_MODEL, "model", "tpqueue")
    base = str(client.base_url).removesuffix("/v1/")
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200 and health.json()["groups"] == {"gw-fake": "live"}
    metrics = httpx.get(f"{base}/metrics").text
    assert 'tpq_http_requests_total{route="/v1/models",status="200"}' in metrics
    assert "tpq_http_open_streams" in metrics


def test_chat_streamed_and_not_through_the_sdk(sdk, worker):
    client = sdk()
    thread = worker.run_in_thread(["Hel", "lo", "", " world"], count=2)
    answer = client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.content == "Hello world"
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.role == "assistant"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (3, 4, 7)

    chunks = list(client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    thread.join(timeout=30)
    assert worker.errors == []
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
    assert len({c.id for c in chunks}) == 1

    again = client.chat.completions.retrieve(answer.id)  # GET /v1/chat/completions/{id}
    assert again.choices[0].message.content == "Hello world"


def test_the_async_sdk_streams_completions(sdk, worker):
    client = sdk()
    base_url = str(client.base_url)
    thread = worker.run_in_thread(["Once", " upon"], count=2)

    async def go() -> tuple[str, list]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as aclient:
            answer = await aclient.completions.create(model=FAKE_MODEL, prompt="x", max_tokens=2)
            stream = await aclient.completions.create(model=FAKE_MODEL, prompt="x", max_tokens=2, stream=True,
                                                      stream_options={"include_usage": True})
            return answer.choices[0].text, [c async for c in stream]

    text, chunks = asyncio.run(go())
    thread.join(timeout=30)
    assert text == "Once upon"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once upon"
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2


def test_completions_with_n_choices_are_n_jobs_with_derived_ids(sdk, worker, redis_url):
    client = sdk()
    thread = worker.run_in_thread(["a", "b"], count=2)
    answer = client.completions.create(model=FAKE_MODEL, prompt="x", n=2, max_tokens=2,
                                       extra_headers={"Idempotency-Key": "cmpl-n2"})
    thread.join(timeout=30)
    assert answer.id == "cmpl-n2" and answer.object == "text_completion"
    assert [(c.index, c.text) for c in answer.choices] == [(0, "ab"), (1, "ab")]
    assert sorted(r.job.id for r in worker.served) == ["cmpl-n2-0", "cmpl-n2-1"]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (3, 4)  # the prompt counts once


def test_sessions_and_idempotency_keys_reach_the_clients_queues(sdk, redis_url):
    client = sdk()
    conn = redis.Redis.from_url(redis_url)
    num_shards = get_settings().num_shards

    def origin(job_id: str) -> str:
        return conn.hget(keys.rq_job_key(job_id), "origin").decode()

    def opened(**options: object) -> str:
        with client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, stream=True, **options) as stream:
            return next(iter(stream)).id

    first = opened(extra_headers={"X-Session-Id": "alice", "Idempotency-Key": "same-key"})
    assert origin(first) == keys.shard_queue_name(keys.shard_for_session("alice", num_shards))
    assert opened(extra_headers={"X-Session-Id": "alice", "Idempotency-Key": "same-key"}) == first
    assert conn.llen(keys.rq_queue_key(origin(first))) == 1  # the retry is the same job
    by_user = opened(user="bob")
    assert origin(by_user) == keys.shard_queue_name(keys.shard_for_session("bob", num_shards))
    by_field = opened(extra_body={"session_id": "carol", "user": "bob"})
    assert origin(by_field) == keys.shard_queue_name(keys.shard_for_session("carol", num_shards))
    assert origin(opened()) == keys.BATCH_QUEUE


def test_a_running_completion_is_not_finished_and_a_reused_key_must_repeat_its_request(sdk, worker):
    client = sdk()
    with client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, stream=True,
                                        extra_headers={"Idempotency-Key": "running-1"}) as stream:
        next(iter(stream))
        running = worker.take()
        with pytest.raises(openai.ConflictError) as caught:
            client.chat.completions.retrieve("running-1")
        assert error_of(caught)["code"] == "not_finished"
        with pytest.raises(openai.ConflictError) as caught:
            client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, n=2,
                                           extra_headers={"Idempotency-Key": "running-1"})
        assert error_of(caught)["code"] == "idempotency_conflict"
        worker.succeed(running)
    assert client.chat.completions.retrieve("running-1").choices[0].finish_reason == "stop"


# ------------------------------------------------------------------ streams that survive


def test_a_dropped_stream_resumed_with_last_event_id_gives_every_token_once(sdk, worker):
    client = sdk(http_disconnect_grace_s=60)
    base = str(client.base_url).removesuffix("/v1/")
    texts = [f"t{i} " for i in range(8)]
    body = {"model": FAKE_MODEL, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            running = worker.take()
            worker.emit(running, texts[:5])
            seen = []
            for event in sse_events(response.iter_lines()):
                seen.append(event)
                if sum(1 for e in seen if content_of(e)) == 3:
                    break  # drop the connection after 3 tokens: 2 more are in the log, unsent
        completion_id = json.loads(seen[0]["data"])["id"]
        assert [content_of(e) for e in seen] == ["", *texts[:3]]
        headers = {"Last-Event-ID": seen[-1]["id"]}
        with http.stream("GET", f"/v1/chat/completions/{completion_id}/stream", headers=headers) as response:
            lines = response.iter_lines()
            resumed = []
            for event in sse_events(lines):
                resumed.append(event)
                if content_of(event) == texts[4]:
                    break  # the two logged tokens, replayed
            worker.emit(running, texts[5:])
            worker.succeed(running)
            resumed += list(sse_events(lines))
    assert all("id" in e for e in seen + resumed)  # every event, [DONE] included, carries its position
    delivered = [content_of(e) for e in seen + resumed]
    assert "".join(d for d in delivered if d) == "".join(texts)  # every token once, in order
    assert resumed[-1]["data"] == "[DONE]"
    usage = json.loads(resumed[-2]["data"])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert not worker.cancel_requested(running)  # the resume within the grace kept the job


def test_a_client_that_leaves_cancels_its_job_after_the_grace(sdk, worker):
    client = sdk(http_disconnect_grace_s=0)
    with client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, stream=True) as stream:
        chunks = iter(stream)
        next(chunks)  # the role chunk: the job is enqueued
        running = worker.take()
        worker.emit(running, ["one"])
        assert next(chunks).choices[0].delta.content == "one"
    wait_for(lambda: worker.cancel_requested(running), "the gateway to cancel the job of a stream that left")


def test_a_failed_job_ends_its_stream_with_an_error_chunk(sdk, worker):
    client = sdk()
    with client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, stream=True) as stream:
        chunks = iter(stream)
        next(chunks)
        running = worker.take()
        worker.emit(running, ["half"])
        worker.fail(running, "the engine refused it")
        with pytest.raises(openai.APIError, match="the engine refused it"):
            list(chunks)


# ------------------------------------------------------------------ errors in OpenAI's shape


def error_of(caught: pytest.ExceptionInfo) -> dict:
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the SDK hands over the "error" object
    return body


@pytest.mark.parametrize("options, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"1": 3}}, "logit_bias"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"extra_body": {"max_tokens": "five"}}, "max_tokens"),
    ({"extra_body": {"temperature": [1]}}, "temperature"),
    ({"extra_body": {"messages": []}}, "messages"),
])
def test_bad_chat_requests_are_400s_naming_the_parameter(sdk, options, param):
    client = sdk()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, **options)
    assert caught.value.status_code == 400 and error_of(caught)["param"] == param


def test_the_clients_own_limits_are_400s_with_its_message(sdk):
    client = sdk(max_tokens_limit=100)
    with pytest.raises(openai.BadRequestError, match="TPQ_MAX_TOKENS_LIMIT") as caught:
        client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, max_tokens=101)
    assert error_of(caught)["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=FAKE_MODEL, prompt="x", suffix="y")


def test_a_body_that_is_not_json_is_a_400_not_a_422(sdk):
    base = str(sdk().base_url).removesuffix("/v1/")
    response = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_unknown_models_and_ids_are_404s(sdk):
    client = sdk()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert error_of(caught)["param"] == "model" and FAKE_MODEL in error_of(caught)["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve("chatcmpl-unknown")
    base = str(client.base_url).removesuffix("/v1/")
    assert httpx.get(f"{base}/v1/completions/cmpl-unknown/stream").status_code == 404
    assert httpx.get(f"{base}/v1/no/such/route").json()["error"]["type"] == "not_found_error"


def test_a_body_over_the_limit_is_a_413(sdk):
    client = sdk(http_max_body_bytes=4096)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=FAKE_MODEL, messages=[{"role": "user", "content": "x" * 5000}])
    assert caught.value.status_code == 413 and error_of(caught)["code"] == "request_too_large"


def test_a_full_queue_is_a_429_with_retry_after(sdk, redis_url):
    client = sdk(max_queue_depth=1)
    with Client(settings=get_settings(redis_url=redis_url, max_queue_depth=1)) as python_client:
        python_client.submit("fills the batch queue")
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES)
    assert caught.value.response.headers["Retry-After"] == "1"
    assert error_of(caught)["code"] == "queue_full"


def test_no_live_group_is_a_503(start_gateway):
    server = start_gateway()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES)
    assert caught.value.status_code == 503 and "no worker group" in error_of(caught)["message"]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "no_live_group"
    assert client.models.list().data == []
