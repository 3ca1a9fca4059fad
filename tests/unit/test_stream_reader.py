"""TokenStream and AsyncTokenStream on fakeredis: replay, live pub/sub, idle re-reads, drops, errors."""
from __future__ import annotations

import asyncio
import threading
import time

import fakeredis
import pytest
import redis
from rq.results import Result
from rq.serializers import JSONSerializer

from common import keys
from common.errors import JobFailed, JobNotFound, ResultTimeout, StreamIncomplete
from common.redis_conn import RedisUnavailableError
from common.results import FinishReason, StreamEnd, TokenEvent
from common.jobs import LOG_FIELD, encode_stream_message, log_entry_id
from common.token_log import queue_messages
from producer.stream import AsyncTokenStream, TokenStream

JOB = "job-1"
FAST = {"idle_s": 0.05, "finished_grace_s": 0.1}


def events(n: int, start: int = 0) -> list[TokenEvent]:
    return [TokenEvent(request_id=JOB, index=i, token_id=i, text=f"t{i}") for i in range(start, n)]


def end(n: int, **fields) -> StreamEnd:
    fields.setdefault("finish_reason", FinishReason.STOP)
    return StreamEnd(request_id=JOB, num_tokens=n, **fields)


def write(conn, messages) -> None:
    with conn.pipeline(transaction=False) as pipe:
        queue_messages(pipe, messages, maxlen=1000, ttl_s=60)
        pipe.execute(raise_on_error=False)


def set_status(conn, status: str) -> None:
    conn.hset(keys.rq_job_key(JOB), "status", status)


def test_replays_a_finished_stream(fake_redis):
    write(fake_redis, [*events(4), end(4)])
    stream = TokenStream(fake_redis, JOB, **FAST)
    assert list(stream) == events(4) and stream.end == end(4) and not stream.subscribed


def test_live_stream_with_duplicates(fake_redis):
    set_status(fake_redis, "started")
    stream = TokenStream(fake_redis, JOB, timeout=5, **FAST).open()
    assert stream.subscribed

    def worker() -> None:
        for event in events(5):
            write(fake_redis, [event])
            fake_redis.publish(keys.token_channel(JOB), event.model_dump_json())  # every message twice
            time.sleep(0.01)
        write(fake_redis, [end(5)])

    thread = threading.Thread(target=worker)
    thread.start()
    assert list(stream) == events(5)
    thread.join()


def test_error_end_raises_job_failed_after_the_tokens(fake_redis):
    write(fake_redis, [*events(2), end(2, finish_reason=None, error="RuntimeError: boom")])
    stream = TokenStream(fake_redis, JOB, **FAST)
    assert [next(stream), next(stream)] == events(2)
    with pytest.raises(JobFailed, match=f"job '{JOB}' failed: RuntimeError: boom"):
        next(stream)
    assert list(stream) == []


def test_idle_reread_sees_failed_status(fake_redis):
    write(fake_redis, events(1))
    set_status(fake_redis, "failed")
    Result(JOB, Result.Type.FAILED, fake_redis, exc_string="ValueError: worker said no",
           serializer=JSONSerializer).save(ttl=60)
    stream = TokenStream(fake_redis, JOB, **FAST)
    assert next(stream) == events(1)[0]
    with pytest.raises(JobFailed, match="worker said no"):
        next(stream)


def test_unknown_job(fake_redis):
    with pytest.raises(JobNotFound, match=f"no job '{JOB}'"):
        next(TokenStream(fake_redis, JOB, **FAST))


def test_a_status_is_judged_only_after_the_tokens_that_came_with_it(fake_redis):
    """An idle re-read that brings tokens and a final status hands the tokens out first, and ``next_index``
    counts only what was handed out: a caller that resumes there after the error misses nothing (the chaos
    soak's client resubmits a job Redis lost and streams again from ``next_index``)."""
    set_status(fake_redis, "started")
    write(fake_redis, events(1))
    stream = TokenStream(fake_redis, JOB, timeout=5, **FAST).open()
    got = [next(stream)]  # from the replay; the stream now waits on pub/sub
    for event in events(3, start=1):  # logged, not published: only the idle re-read sees them,
        fake_redis.xadd(keys.token_log(JOB), {LOG_FIELD: encode_stream_message(event)}, id=log_entry_id(event.index))
    fake_redis.delete(keys.rq_job_key(JOB))  # in the same round trip as the job's status (gone)
    with pytest.raises(JobNotFound):
        for event in stream:
            got.append(event)
    assert got == events(3) and stream.next_index == 3


def test_finished_job_without_end_record(fake_redis):
    write(fake_redis, events(2))
    set_status(fake_redis, "finished")
    stream = TokenStream(fake_redis, JOB, **FAST)
    with pytest.raises(StreamIncomplete, match="no end record after 2 tokens"):
        list(stream)


def test_timeout_then_continue(fake_redis):
    set_status(fake_redis, "queued")
    stream = TokenStream(fake_redis, JOB, timeout=0.1, **FAST)
    with pytest.raises(ResultTimeout, match="within 0.1 s \\(status: queued, 0 tokens"):
        next(stream)
    write(fake_redis, [*events(1), end(1)])
    assert list(stream) == events(1)


class FlakyConn:
    """A pub/sub connection whose first ``failures`` reads raise ConnectionError (a dropped socket)."""

    def __init__(self, conn, failures: int) -> None:
        self.conn, self.failures, self.pubsubs = conn, failures, 0

    def pubsub(self):
        self.pubsubs += 1
        inner = self.conn.pubsub()
        owner = self

        class Flaky:
            def subscribe(self, *a):
                return inner.subscribe(*a)

            def get_message(self, **kw):
                message = inner.get_message(**kw)
                if message is not None and message["type"] == "message" and owner.failures > 0:
                    owner.failures -= 1
                    raise redis.ConnectionError("Connection closed by server.")
                return message

            def close(self):
                inner.close()

        return Flaky()


def test_drop_resubscribes_and_fills_from_the_log(fake_redis):
    set_status(fake_redis, "started")
    flaky = FlakyConn(fake_redis, failures=2)
    stream = TokenStream(fake_redis, JOB, pubsub_conn=flaky, timeout=5, **FAST).open()
    write(fake_redis, events(3))  # the first published message breaks the connection, the next one too
    write(fake_redis, [*events(6, 3), end(6)])
    assert list(stream) == events(6) and flaky.pubsubs >= 2


def test_gives_up_when_redis_stays_away(fake_redis):
    class Down:
        def pubsub(self):
            raise redis.ConnectionError("Connection refused")

    stream = TokenStream(fake_redis, JOB, pubsub_conn=Down(), give_up_s=0.2, **FAST)
    with pytest.raises(RedisUnavailableError, match="could not reconnect .* stream\\(start=0\\)"):
        next(stream)


def test_async_stream_replay_and_live():
    async def scenario():
        server = fakeredis.FakeServer()
        conn = fakeredis.FakeAsyncRedis(server=server)
        sync = fakeredis.FakeRedis(server=server)
        set_status(sync, "started")
        write(sync, events(2))
        stream = await AsyncTokenStream(conn, JOB, timeout=5, **FAST).open()

        async def worker():
            await asyncio.sleep(0.02)
            await asyncio.to_thread(write, sync, [*events(4, 2), end(4)])

        task = asyncio.create_task(worker())
        got = [event async for event in stream]
        await task
        assert got == events(4) and stream.end == end(4)
        await conn.aclose()

    asyncio.run(scenario())
