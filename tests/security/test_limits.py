"""Every deployment limit, enforced at the client and again in the worker.

Request limits (``TPQ_MAX_PROMPT_CHARS``, ``TPQ_MAX_TOKENS_LIMIT``, and the
schema's 4096 messages per chat) are checked by ``Client`` before anything
is written and again by rank 0's admission (``JobPump`` with its real
``BatchWorker`` on real Redis; the engine is a stub that records what is
admitted), against jobs written by a client with looser limits, as an old
or misconfigured client or anyone with Redis access could. The enqueue
limits (``TPQ_MAX_BATCH_SIZE`` per ``submit_batch``, ``TPQ_MAX_QUEUE_DEPTH``
per queue) belong to the client; a worker cannot refuse what was already
enqueued, but it never takes more jobs than it has room for
(``--max-num-seqs``): the rest wait in their queue.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from common import keys
from common.errors import InvalidRequestError, QueueFull
from common.jobs import GENERATE_FUNC
from common.schemas import MAX_MESSAGES
from common.settings import get_settings
from producer import Client
from tests.doubles import StubEngineLoop

LIMITS = {"max_prompt_chars": 50, "max_tokens_limit": 300, "max_batch_size": 3, "max_queue_depth": 4}

OVER_THE_LIMIT = [
    ("prompt", {"prompt": "x" * 51}, "prompt total 51 characters; at most 50 .*TPQ_MAX_PROMPT_CHARS"),
    ("chat", {"messages": [{"role": "user", "content": "y" * 30}, {"role": "assistant", "content": "z" * 21}]},
     "messages total 51 characters; at most 50 .*TPQ_MAX_PROMPT_CHARS"),
    ("max_tokens", {"prompt": "x", "sampling": {"max_tokens": 301}}, "max_tokens is 301; at most 300 .*TPQ_MAX_TOKENS_LIMIT"),
    ("messages", {"messages": [{"role": "user", "content": ""}] * (MAX_MESSAGES + 1)}, "messages: .*at most 4096"),
]
AT_THE_LIMIT = [
    {"prompt": "x" * 50},
    {"messages": [{"role": "user", "content": "y" * 29}, {"role": "assistant", "content": "z" * 21}]},
    {"prompt": "x", "sampling": {"max_tokens": 300}},
    {"messages": [{"role": "user", "content": ""}] * MAX_MESSAGES},
]


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def make_pump(redis_url: str, model_dir, max_in_flight: int = 64):
    from gpu_worker.serve.job_pump import JobPump
    from gpu_worker.models.tokenizer import Tokenizer

    pump = JobPump(get_settings(redis_url=redis_url, **LIMITS), redis_url, "limits", "inc-1", StubEngineLoop(),
                   Tokenizer(model_dir), max_in_flight=max_in_flight)
    pump.worker.register()
    return pump


def enqueue_unchecked(conn: redis.Redis, job_id: str, request: dict[str, Any]) -> None:
    """What a client without these limits (or anyone with Redis access) puts in the queue."""
    Queue(keys.BATCH_QUEUE, connection=conn, serializer=JSONSerializer).enqueue_call(
        GENERATE_FUNC, kwargs={"request": {**request, "request_id": job_id}}, job_id=job_id, failure_ttl=600)


@pytest.mark.parametrize(("name", "request_", "message"), OVER_THE_LIMIT, ids=[c[0] for c in OVER_THE_LIMIT])
def test_request_limits_at_the_client(redis_url: str, conn: redis.Redis, name: str, request_: dict,
                                      message: str) -> None:
    with Client(redis_url, settings=get_settings(redis_url=redis_url, **LIMITS)) as client:
        with pytest.raises(InvalidRequestError, match=message):
            client.submit(**{k: v for k, v in request_.items() if k != "sampling"}, **request_.get("sampling", {}))
        with pytest.raises(InvalidRequestError, match=f"batch request 1: .*{message}"):
            client.submit_batch([{"prompt": "fine"}, request_])
    assert conn.dbsize() == 0


@pytest.mark.parametrize(("name", "request_", "message"), OVER_THE_LIMIT, ids=[c[0] for c in OVER_THE_LIMIT])
def test_request_limits_again_in_the_worker(redis_url: str, conn: redis.Redis, tiny_llama_dir, name: str,
                                            request_: dict, message: str) -> None:
    from producer.job_state import JobState, ResultWatch

    enqueue_unchecked(conn, "too-big", request_)
    pump = make_pump(redis_url, tiny_llama_dir)
    while pump._claim_and_admit():
        pass
    assert pump.loop.admitted == []
    assert conn.hget(keys.rq_job_key("too-big"), "status") == b"failed"
    watch = ResultWatch("too-big")
    watch.feed(conn.xrange(keys.rq_result_key("too-big")))
    failed = watch.verdict(JobState.FAILED)
    assert failed is not None and re.search(message, failed.error), failed


def test_requests_at_the_limits_pass_both_ends(redis_url: str, conn: redis.Redis, tiny_llama_dir) -> None:
    with Client(redis_url, settings=get_settings(redis_url=redis_url, **LIMITS)) as client:
        ids = client.submit_batch(AT_THE_LIMIT[:2]).ids + client.submit_batch(AT_THE_LIMIT[2:]).ids
    pump = make_pump(redis_url, tiny_llama_dir)
    while pump._claim_and_admit():
        pass
    assert sorted(pump.loop.admitted) == sorted(ids)


def test_batch_size_limit_at_the_client(redis_url: str, conn: redis.Redis) -> None:
    with Client(redis_url, settings=get_settings(redis_url=redis_url, **LIMITS)) as client:
        with pytest.raises(InvalidRequestError, match="at most 3 requests .*TPQ_MAX_BATCH_SIZE"):
            client.submit_batch([{"prompt": f"p{i}"} for i in range(4)])
        assert conn.dbsize() == 0
        assert len(client.submit_batch([{"prompt": f"p{i}"} for i in range(3)])) == 3


def test_queue_depth_limit_at_the_client(redis_url: str, conn: redis.Redis) -> None:
    with Client(redis_url, settings=get_settings(redis_url=redis_url, **LIMITS)) as client:
        client.submit_batch([{"prompt": f"p{i}"} for i in range(3)])
        client.submit(prompt="the fourth")
        before = conn.dbsize()
        with pytest.raises(QueueFull, match="queue 'batch' is full: 4 jobs queued, limit 4 .*TPQ_MAX_QUEUE_DEPTH"):
            client.submit(prompt="one too many")
        with pytest.raises(QueueFull, match="after waiting 0.2 s"):
            client.submit(prompt="one too many", wait_s=0.2)
        with pytest.raises(QueueFull):
            client.submit_batch([{"prompt": "a"}, {"prompt": "b"}])
        assert conn.dbsize() == before and conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 4
        client.submit(prompt="another queue", session_id="s")  # the limit is per queue


def test_a_worker_takes_no_more_jobs_than_it_has_room_for(redis_url: str, conn: redis.Redis, tiny_llama_dir) -> None:
    for i in range(10):
        enqueue_unchecked(conn, f"job-{i}", {"prompt": f"p{i}", "sampling": {"max_tokens": 4}})
    pump = make_pump(redis_url, tiny_llama_dir, max_in_flight=3)
    while pump._claim_and_admit():
        pass
    assert len(pump.loop.admitted) == 3
    assert conn.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 7  # the rest wait, untouched, for room
