"""Logprobs, echo and token-id prompts over real HTTP: uvicorn, a real redis-server, the real ``openai`` SDK.

No model runs here (tests/gateway/test_openai_logprobs.py runs one): a
registered group makes the model served, its vocabulary is published as a
group publishes it, and :class:`LogprobWorker` (tests.doubles.ProtocolWorker
with logprobs) writes every token event and result the gateway renders, so
each logprob the client sees is one the test wrote.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import redis

from common import keys
from common.jobs import REQUEST_KWARG
from common.results import TokenEvent, TokenLogprob
from common.schemas import GenerationRequest
from gpu_worker.serve.vocab_publish import vocabulary_fields
from tests.doubles import ProtocolWorker, Running
from tests.gateway.conftest import FAKE_MODEL, register_fake_group
from tests.gateway.sse import sse_events

MESSAGES = [{"role": "user", "content": "hi"}]
TEXTS = ["Hel", "lo", "", "é!"]  # token 102 is the first byte of "é": its event has no text
TOKEN_BYTES = {10: b"Say", 11: b" hi", 100: b"Hel", 101: b"lo", 102: b"\xc3", 103: b"\xa9!"}
PROMPT_IDS = [10, 11]
VOCAB_SIZE = 200


def lp(token_id: int) -> float:
    """The logprob the worker writes for ``token_id`` (exact in binary, so JSON keeps it exactly)."""
    return -(token_id % 7 + 1) / 8


def alternatives(token_id: int) -> list[tuple[int, float]]:
    return [(token_id, lp(token_id)), (5, -3.0)]


class LogprobWorker(ProtocolWorker):
    """A :class:`ProtocolWorker` whose token events and results carry logprobs when the job asked for them."""

    def tokens(self, running: Running, texts) -> list[TokenEvent]:
        events = super().tokens(running, texts)
        if request_of(running).sampling.logprobs is None:
            return events
        return [e.model_copy(update={"logprob": lp(e.token_id), "top_logprobs": alternatives(e.token_id)})
                for e in events]

    def result_of(self, running: Running, finish_reason):
        result = super().result_of(running, finish_reason)
        sampling = request_of(running).sampling
        prompt = None
        if sampling.prompt_logprobs is not None:
            prompt = [TokenLogprob(token_id=PROMPT_IDS[0])] + [
                TokenLogprob(token_id=i, logprob=lp(i), top_logprobs=alternatives(i)) for i in PROMPT_IDS[1:]]
        logprobs = [t.token_logprob() for t in running.tokens] if sampling.logprobs is not None else None
        return result.model_copy(update={"logprobs": logprobs, "prompt_logprobs": prompt})


def request_of(running: Running) -> GenerationRequest:
    return GenerationRequest.model_validate(running.job.kwargs[REQUEST_KWARG])


@pytest.fixture
def worker(redis_url: str):
    w = LogprobWorker(redis_url)
    yield w
    w.close()


@pytest.fixture
def served(start_gateway, redis_url):
    """``served(**settings)``: a gateway's base URL, its model registered and its vocabulary published."""

    def make(**settings: object) -> str:
        register_fake_group(redis_url)
        token_bytes = [TOKEN_BYTES.get(i, f"<{i}>".encode()) for i in range(VOCAB_SIZE)]
        with redis.Redis.from_url(redis_url) as conn:
            conn.hset(keys.vocab(FAKE_MODEL), mapping=vocabulary_fields(FAKE_MODEL, token_bytes, [0]))
        return start_gateway(**settings).url

    return make


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def content_tokens(chunks) -> list[dict]:
    return [entry.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
            for entry in c.choices[0].logprobs.content]


def test_chat_logprobs_streamed_join_to_the_answers(served, worker):
    client = sdk(served())
    thread = worker.run_in_thread(TEXTS, count=2)
    answer = client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, logprobs=True,
                                                 top_logprobs=2, stream=True))
    thread.join(timeout=30)
    assert worker.errors == []
    content = [entry.model_dump() for entry in answer.choices[0].logprobs.content]
    assert [c["token"] for c in content] == ["Hel", "lo", "bytes:\\xc3", "bytes:\\xa9\\x21"]
    assert [c["logprob"] for c in content] == [lp(i) for i in (100, 101, 102, 103)]
    assert bytes(sum((c["bytes"] for c in content), [])).decode() == answer.choices[0].message.content == "Helloé!"
    assert content[0]["top_logprobs"] == [{"token": "Hel", "logprob": lp(100), "bytes": list(b"Hel")},
                                          {"token": "<5>", "logprob": -3.0, "bytes": list(b"<5>")}]
    assert content_tokens(chunks) == content  # every token once, in order, also the one with no text
    carrying = [len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs]
    assert carrying == [1, 1, 2]  # the empty-text token rides with the next one
    assert [worker.served[0].job.id, worker.served[1].job.id] == [answer.id, chunks[0].id]


def test_completions_echo_and_logprobs_streamed_and_not(served, worker):
    client = sdk(served())
    thread = worker.run_in_thread(TEXTS, count=2)
    options = {"model": FAKE_MODEL, "prompt": "Say hi", "echo": True, "logprobs": 1, "max_tokens": 4}
    answer = client.completions.create(**options)
    chunks = list(client.completions.create(**options, stream=True))
    thread.join(timeout=30)
    assert worker.errors == []
    choice = answer.choices[0]
    assert choice.text == "Say hiHelloé!"
    logprobs = choice.logprobs
    assert logprobs.tokens == ["Say", " hi", "Hel", "lo", "bytes:\\xc3", "bytes:\\xa9\\x21"]
    assert logprobs.token_logprobs == [None, *(lp(i) for i in (11, 100, 101, 102, 103))]
    assert logprobs.top_logprobs[0] is None and logprobs.top_logprobs[2] == {"Hel": lp(100), "<5>": -3.0}
    assert logprobs.text_offset == [0, 3, 6, 9, 11, 11]
    assert chunks[0].choices[0].text == "Say hi"  # the first chunk carries the prompt and its logprobs
    assert chunks[0].choices[0].logprobs.tokens == ["Say", " hi"]
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for name in streamed:
            streamed[name] += getattr(c.choices[0].logprobs, name) if c.choices[0].logprobs else []
    assert streamed == logprobs.model_dump()
    assert "".join(c.choices[0].text for c in chunks) == choice.text


def test_max_tokens_zero_with_echo_is_what_lm_eval_scores(served, worker):
    client = sdk(served())
    thread = worker.run_in_thread(["ignored"], count=2)
    answer = client.completions.create(model=FAKE_MODEL, prompt="Say hi", echo=True, logprobs=1, max_tokens=0)
    one = client.completions.create(model=FAKE_MODEL, prompt="Say hi", echo=True, logprobs=1, max_tokens=1)
    thread.join(timeout=30)
    assert answer.choices[0].text == "Say hi" and answer.choices[0].logprobs.tokens == ["Say", " hi"]
    assert answer.choices[0].logprobs.token_logprobs == [None, lp(11)] and answer.usage.completion_tokens == 0
    assert request_of(worker.served[0]).sampling.max_tokens == 1  # the engine generates at least one token
    assert one.choices[0].text == "Say hiignored" and one.choices[0].logprobs.text_offset == [0, 3, 6]
    assert one.usage.completion_tokens == 1


def test_a_token_id_prompt_reaches_the_worker_as_ids_and_echoes_as_text(served, worker, redis_url):
    client = sdk(served())
    thread = worker.run_in_thread(["!"], count=1)
    answer = client.completions.create(model=FAKE_MODEL, prompt=PROMPT_IDS, echo=True, max_tokens=1)
    thread.join(timeout=30)
    request = request_of(worker.served[0])
    assert request.prompt_token_ids == tuple(PROMPT_IDS) and request.prompt is None
    assert answer.choices[0].text == "Say hi!"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=FAKE_MODEL, prompt=[[10, 11], [10, VOCAB_SIZE + 7]], max_tokens=1)
    assert caught.value.body["param"] == "prompt" and str(VOCAB_SIZE + 7) in caught.value.body["message"]
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0  # refused before anything was enqueued


def test_logprobs_without_a_published_vocabulary_are_a_503_before_enqueue(start_gateway, redis_url):
    register_fake_group(redis_url, model="no-vocab", group="gw-novocab")
    client = sdk(start_gateway().url)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="no-vocab", messages=MESSAGES, logprobs=True)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "vocabulary_unavailable"
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0


def events_of(data_events: list[dict]) -> list[dict]:
    return [json.loads(e["data"]) for e in data_events if e["data"] != "[DONE]"]


def test_a_resumed_stream_loses_no_logprob_of_a_token_it_had_not_sent(served, worker):
    base = served(http_disconnect_grace_s=60)
    body = {"model": FAKE_MODEL, "messages": MESSAGES, "n": 2, "logprobs": True, "stream": True}
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            jobs = {r.id: r for r in (worker.take(), worker.take())}
            cid = next(iter(jobs)).rsplit("-", 1)[0]
            first, second = jobs[f"{cid}-0"], jobs[f"{cid}-1"]
            worker.emit(second, [""])   # choice 1: a token with no text yet, so not sent
            worker.emit(first, ["x"])   # choice 0: sent; its event's id must not cover choice 1's token
            seen = []
            for event in sse_events(response.iter_lines()):
                seen.append(event)
                chunk = json.loads(event["data"])
                if chunk["choices"][0]["index"] == 0 and chunk["choices"][0]["delta"].get("content") == "x":
                    break
        assert seen[-1]["id"] == "0,-1"
        headers = {"Last-Event-ID": seen[-1]["id"]}
        with http.stream("GET", f"/v1/chat/completions/{cid}/stream", headers=headers) as rest:
            worker.emit(second, ["é"])
            worker.succeed(first)
            worker.succeed(second)
            resumed = list(sse_events(rest.iter_lines()))
    assert resumed[-1]["data"] == "[DONE]"
    by_choice: dict[int, list[tuple[int, str]]] = {0: [], 1: []}
    for chunk in events_of(seen + resumed):
        choice = chunk["choices"][0]
        for entry in (choice["logprobs"] or {}).get("content", []):
            by_choice[choice["index"]].append((entry["logprob"], choice["delta"].get("content")))
    assert by_choice == {0: [(lp(100), "x")], 1: [(lp(100), "é"), (lp(101), "é")]}  # once each, in order


def test_a_resumed_completions_stream_keeps_counting_text_offsets(served, worker):
    base = served(http_disconnect_grace_s=60)
    body = {"model": FAKE_MODEL, "prompt": "Say hi", "logprobs": 0, "max_tokens": 4, "stream": True}
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            running = worker.take()
            worker.emit(running, TEXTS[:2])
            seen = []
            for event in sse_events(response.iter_lines()):
                seen.append(event)
                if json.loads(event["data"])["choices"][0]["text"] == "Hel":
                    break
        cid = json.loads(seen[0]["data"])["id"]
        with http.stream("GET", f"/v1/completions/{cid}/stream", headers={"Last-Event-ID": seen[-1]["id"]}) as rest:
            worker.emit(running, TEXTS[2:])
            worker.succeed(running)
            resumed = list(sse_events(rest.iter_lines()))
    offsets, tokens = [], []
    for chunk in events_of(seen + resumed):
        logprobs = chunk["choices"][0]["logprobs"]
        if logprobs:
            offsets += logprobs["text_offset"]
            tokens += logprobs["tokens"]
    assert tokens == ["Hel", "lo", "bytes:\\xc3", "bytes:\\xa9\\x21"] and offsets == [0, 3, 5, 5]
