"""A poison job fails in the worker every time: it ends FAILED after its retries; its neighbours run.

The job pump runs for real against the test redis-server (rq bookkeeping,
claims, retries); the tokenizer is a double that raises an unexpected error
for the poison prompt, and the engine loop is the inbox only (no model): the
subject is how the worker handles a job that keeps failing, or whose state
in Redis a crash took while it ran.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from common.results import FinishReason, GenerationResult, StreamEnd, Timings, TokenEvent, Usage
from common.settings import get_settings
from common.token_log import log_is_whole, queue_messages, read_log
from gpu_worker.serve.engine_loop import StepReport
from producer import Client
from tests.doubles import StubEngineLoop

RETRIES = 2


class ExplodingTokenizer:
    """Encodes every prompt to three tokens, except one containing 'poison', which raises (a worker bug)."""

    def encode(self, text: str) -> list[int]:
        if "poison" in text:
            raise RuntimeError("tokenizer exploded")
        return [1, 2, 3]

    def encode_chat(self, messages: Any) -> list[int]:
        return self.encode(" ".join(m.content for m in messages))


@pytest.fixture
def pump(redis_url: str) -> Iterator[Any]:
    from gpu_worker.serve.job_pump import JobPump

    settings = get_settings(redis_url=redis_url, job_retries=RETRIES)
    pump = JobPump(settings, redis_url, "poison-test", "inc-1", StubEngineLoop(), ExplodingTokenizer(), max_in_flight=100)
    pump.worker.register()
    yield pump
    pump.worker.unregister()
    pump.conn.close()


def test_a_job_that_fails_every_time_ends_failed_after_its_retries_and_its_batch_runs(pump, redis_url):
    settings = get_settings(redis_url=redis_url, job_retries=RETRIES)
    with Client(redis_url, settings=settings) as client:
        batch = client.submit_batch([{"prompt": "fine 1", "request_id": "ok-1"},
                                     {"prompt": "the poison pill", "request_id": "poison"},
                                     {"prompt": "fine 2", "request_id": "ok-2"}])
    assert len(batch) == 3
    while pump._claim_and_admit():  # the poison goes back to the front after each failure until retries run out
        pass
    conn = redis.Redis.from_url(redis_url)
    poison = Job.fetch("poison", connection=conn, serializer=JSONSerializer)
    assert poison.get_status() == JobStatus.FAILED
    assert "RuntimeError: tokenizer exploded" in poison.latest_result().exc_string
    assert int(conn.hget("rq:job:poison", "tpq_attempts")) == RETRIES + 1
    [end] = read_log(conn, "poison")  # one end record, written only when no retry was left
    assert isinstance(end, StreamEnd) and "tokenizer exploded" in end.error
    assert sorted(pump.loop.admitted) == ["ok-1", "ok-2"]  # each neighbour admitted once, and running
    for job_id in ("ok-1", "ok-2"):
        assert Job.fetch(job_id, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.STARTED


def test_an_unexpected_engine_error_retries_the_job_and_a_refusal_does_not(pump, redis_url):
    settings = get_settings(redis_url=redis_url, job_retries=RETRIES)
    with Client(redis_url, settings=settings) as client:
        client.submit_batch([{"prompt": "a", "request_id": "flaky"}, {"prompt": "b", "request_id": "refused"}])
    pump._claim_and_admit()
    assert sorted(pump.loop.admitted) == ["flaky", "refused"]
    pump.on_written(StepReport(rejected=[("flaky", "RuntimeError: cuda hiccup", True),
                                         ("refused", "the prompt is longer than the context", False)]))
    pump._finish_written()
    conn = redis.Redis.from_url(redis_url)
    flaky = Job.fetch("flaky", connection=conn, serializer=JSONSerializer)
    assert flaky.get_status() == JobStatus.QUEUED and flaky.retries_left == RETRIES - 1
    assert read_log(conn, "flaky") == []  # its stream stays open for the retry
    refused = Job.fetch("refused", connection=conn, serializer=JSONSerializer)
    assert refused.get_status() == JobStatus.FAILED
    [end] = read_log(conn, "refused")
    assert "longer than the context" in end.error


def test_a_running_job_that_comes_back_through_its_queue_is_recorded_as_started_here_again(pump, redis_url):
    """E.g. a crashed Redis lost its hash and its client submitted it again: a later group crash must requeue it."""
    with Client(redis_url) as client:
        client.submit("a long one", request_id="resurrected")
        pump._claim_and_admit()
        conn = redis.Redis.from_url(redis_url)
        conn.delete("rq:job:resurrected", "rq:wip:batch")  # what the crash lost: the job and its started entry
        client.submit("a long one", request_id="resurrected")  # the client found it gone and submitted it again
    pump._claim_and_admit()
    assert pump.loop.admitted == ["resurrected"]  # the engine's run serves it: not admitted twice
    job = Job.fetch("resurrected", connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STARTED and job.worker_name == pump.worker.name
    assert StartedJobRegistry("batch", connection=conn).get_job_ids() == ["resurrected"]  # a crash would requeue it
    assert conn.llen("rq:queue:batch") == 0 and conn.llen("tpq:claimed:poison-test") == 0
    assert pump.running["resurrected"].started is pump.worker.started["resurrected"]


def test_a_stray_copy_of_a_running_job_leaves_one_execution_in_the_registry(pump, redis_url):
    with Client(redis_url) as client:
        client.submit("running", request_id="twice")
    pump._claim_and_admit()
    conn = redis.Redis.from_url(redis_url)
    [first] = conn.zrange("rq:wip:batch", 0, -1)
    conn.lpush("rq:queue:batch", "twice")  # a copy queued while it runs (as rq's cleanup of an expired entry does)
    pump._claim_and_admit()
    [second] = conn.zrange("rq:wip:batch", 0, -1)  # the old execution dropped, the new one kept alive
    assert second != first and second.decode().startswith("twice:")
    assert pump.loop.admitted == ["twice"] and int(conn.hget("rq:job:twice", "tpq_attempts")) == 2


def finished(job_id: str, num_tokens: int) -> GenerationResult:
    return GenerationResult(request_id=job_id, text="t" * num_tokens, token_ids=list(range(num_tokens)),
                            finish_reason=FinishReason.LENGTH,
                            usage=Usage(prompt_tokens=3, cached_tokens=0, generated_tokens=num_tokens),
                            timings=Timings(queue_s=0, time_to_first_token_s=0, total_s=0))


def log_messages(conn: redis.Redis, job_id: str, tokens: int, end: bool) -> None:
    messages: list[Any] = [TokenEvent(request_id=job_id, index=i, token_id=i, text="t") for i in range(tokens)]
    if end:
        messages.append(StreamEnd(request_id=job_id, num_tokens=tokens, finish_reason=FinishReason.LENGTH))
    with conn.pipeline(transaction=False) as pipe:
        queue_messages(pipe, messages, maxlen=1000, ttl_s=60)
        pipe.execute()


def test_a_job_whose_log_lost_its_end_runs_again_instead_of_completing(pump, redis_url):
    """Redis crashed after the publisher wrote a job's last messages and came back without them."""
    with Client(redis_url) as client:
        client.submit_batch([{"prompt": "a", "request_id": "whole"}, {"prompt": "b", "request_id": "cut"}])
    pump._claim_and_admit()
    conn = redis.Redis.from_url(redis_url)
    retries = Job.fetch("cut", connection=conn, serializer=JSONSerializer).retries_left
    log_messages(conn, "whole", 4, end=True)
    log_messages(conn, "cut", 2, end=False)  # tokens 2-3 and the end were lost
    pump.on_written(StepReport(finished=[finished("whole", 4), finished("cut", 4)]))
    pump._finish_written()
    assert Job.fetch("whole", connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    cut = Job.fetch("cut", connection=conn, serializer=JSONSerializer)
    assert cut.get_status() == JobStatus.QUEUED and cut.retries_left == retries  # free: it made progress
    assert conn.lrange("rq:queue:batch", 0, -1) == [b"cut"] and "cut" not in pump.running
    pump._claim_and_admit()  # the next run resumes from what the log kept
    assert pump.loop.admitted == ["whole", "cut", "cut"] and "cut" in pump.running


def test_a_completion_that_lands_after_the_crash_took_the_logs_end_runs_the_job_again(pump, redis_url, monkeypatch):
    """The crash falls between the pump's check of the log and its completion, which redis-py retries onto the
    Redis that came back without the log's end: the completion must not land over the short log, and the job
    must run again."""
    from gpu_worker.serve import job_pump

    with Client(redis_url) as client:
        client.submit("a", request_id="late")
    pump._claim_and_admit()
    conn = redis.Redis.from_url(redis_url)
    retries = Job.fetch("late", connection=conn, serializer=JSONSerializer).retries_left
    log_messages(conn, "late", 4, end=True)
    checks: list[bool] = []

    def check_then_crash(conn_: Any, job_id: str, num_tokens: int) -> bool:
        whole = log_is_whole(conn_, job_id, num_tokens)
        checks.append(whole)
        conn.xdel("tpq:log:late", "0-4", "0-5")  # what the crash took, right after the check: the last token, the end
        return whole

    monkeypatch.setattr(job_pump, "log_is_whole", check_then_crash)
    pump.on_written(StepReport(finished=[finished("late", 4)]))
    pump._finish_written()
    assert checks == [True, False]  # the log was whole when checked; the completion saw the loss and checked again
    late = Job.fetch("late", connection=conn, serializer=JSONSerializer)
    assert late.get_status() == JobStatus.QUEUED and late.retries_left == retries
    assert conn.lrange("rq:queue:batch", 0, -1) == [b"late"] and conn.ttl("rq:job:late") == -1
    assert "late" not in FinishedJobRegistry("batch", connection=conn).get_job_ids()
    assert late.latest_result() is None  # no client ever read a finished job over the short log
    pump._claim_and_admit()
    assert pump.loop.admitted == ["late", "late"] and "late" in pump.running
