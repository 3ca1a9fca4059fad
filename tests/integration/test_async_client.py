"""producer.AsyncClient against a real redis-server: the synchronous client's basics, on asyncio.

Each test runs one coroutine with asyncio.run; tests/doubles.py's ProtocolWorker plays
the worker (synchronously, from the test or a thread).
"""
from __future__ import annotations

import asyncio
import time

import pytest

from common import keys
from common.errors import JobCancelled, JobFailed, ResultTimeout
from common.results import FinishReason, JobResult
from common.settings import get_settings
from producer import AsyncClient, AsyncJobHandle, JobState, pubsub_mux

TEXTS = ["Hel", "lo", ",", " wor", "ld", "!"]


def run(redis_url, scenario):
    """Run ``scenario(client)`` in a fresh event loop with a fresh AsyncClient."""

    async def main():
        async with AsyncClient(settings=get_settings(redis_url=redis_url)) as client:
            return await scenario(client)

    return asyncio.run(main())


async def collect(stream):
    return [event async for event in stream]


def test_submit_stream_and_result(redis_url, worker):
    async def scenario(client):
        handle = await client.submit("Say hello", max_tokens=16, subscribe=True)
        assert isinstance(handle, AsyncJobHandle) and handle.created and handle.queue_name == keys.BATCH_QUEUE
        assert await handle.status() == JobState.QUEUED
        thread = worker.run_in_thread(TEXTS, delay_s=0.005)
        stream = handle.stream(timeout=5)
        events = await collect(stream)
        result = await handle.result(timeout=5)
        thread.join(5)
        assert [e.index for e in events] == list(range(len(TEXTS)))
        assert [e.token_id for e in events] == result.token_ids and result.text == "Hello, world!"
        assert stream.end.finish_reason == FinishReason.STOP
        assert await handle.status() == JobState.FINISHED
        late = await collect(handle.stream(timeout=2))  # opened after the job finished: the log replays it
        assert [e.text for e in late] == TEXTS
        again = await client.job(handle.id)
        assert (await again.result(timeout=1)).text == "Hello, world!"

    run(redis_url, scenario)
    assert not worker.errors


def test_dropped_connection_duplicates_and_gaps(redis_url, worker, raw):
    async def scenario(client):
        handle = await client.submit("p", subscribe=True)
        running = worker.take()
        stream = handle.stream(timeout=5)
        worker.emit(running, TEXTS[:2])
        worker.publish_only(running.tokens)  # duplicates
        got = [await stream.__anext__(), await stream.__anext__()]
        assert raw.client_kill_filter(_type="pubsub") == 1
        worker.emit(running, TEXTS[2:3])  # published to nobody
        got.append(await stream.__anext__())
        worker.emit(running, TEXTS[3:5], publish=False)  # a gap on pub/sub
        worker.emit(running, TEXTS[5:])
        worker.succeed(running)
        got.extend(await collect(stream))
        assert [e.index for e in got] == list(range(len(TEXTS))) and [e.text for e in got] == TEXTS

    run(redis_url, scenario)


def test_failed_job(redis_url, worker):
    async def scenario(client):
        handle = await client.submit("p")
        running = worker.take()
        worker.emit(running, TEXTS[:1])
        worker.fail(running, "ValueError: bad prompt")
        stream = handle.stream(timeout=5)
        assert (await stream.__anext__()).index == 0
        with pytest.raises(JobFailed, match="bad prompt"):
            await stream.__anext__()
        with pytest.raises(JobFailed, match=f"job '{handle.id}' failed: ValueError: bad prompt"):
            await handle.result(timeout=5)
        assert await handle.status() == JobState.FAILED

    run(redis_url, scenario)


def test_cancel_while_queued_and_timeouts(redis_url):
    async def scenario(client):
        waiting = await client.submit("p")
        started = time.monotonic()
        with pytest.raises(ResultTimeout, match=f"job '{waiting.id}' has no result after 0.2 s \\(status: queued\\)"):
            await waiting.result(timeout=0.2)
        with pytest.raises(ResultTimeout, match="no token event"):
            await collect(waiting.stream(timeout=0.2))
        assert time.monotonic() - started >= 0.4
        assert await waiting.cancel() is True
        assert await waiting.status() == JobState.CANCELLED
        with pytest.raises(JobCancelled):
            await waiting.result(timeout=2)
        stream = waiting.stream(timeout=2)
        assert await collect(stream) == [] and stream.end.finish_reason == FinishReason.CANCELLED
        assert await waiting.cancel() is False

    run(redis_url, scenario)


def test_batch_results_in_completion_order(redis_url, worker):
    async def scenario(client):
        batch = await client.submit_batch([{"prompt": f"p{i}", "request_id": f"a-{i}"} for i in range(4)])
        assert len(batch) == 4 and batch.ids == [f"a-{i}" for i in range(4)]
        taken = {r.id: r for r in (worker.take() for _ in range(4))}
        assert (await batch.progress())[JobState.RUNNING] == 4
        order = ["a-2", "a-0", "a-3", "a-1"]

        async def finish():
            for job_id in order:
                await asyncio.sleep(0.02)
                await asyncio.to_thread(worker.succeed, taken[job_id])

        finisher = asyncio.create_task(finish())
        seen = [(h.id, o) async for h, o in batch.results(timeout=10)]
        await finisher
        assert [job_id for job_id, _ in seen] == order
        assert all(isinstance(o, JobResult) for _, o in seen)
        pairs = await batch.wait(timeout=1)
        assert [h.id for h, _ in pairs] == batch.ids
        assert (await batch.progress())[JobState.FINISHED] == 4

    run(redis_url, scenario)


def test_a_reader_that_falls_behind_drops_pubsub_messages_and_reads_them_from_the_log(redis_url, worker,
                                                                                       monkeypatch):
    monkeypatch.setattr(pubsub_mux, "MAX_BUFFERED", 8)
    texts = [f"t{i} " for i in range(200)]

    async def scenario(client):
        handle = await client.submit("a slow reader", max_tokens=256, subscribe=True)
        stream = await handle.stream(timeout=10).open()  # subscribed: every message from now on reaches the hub
        running = worker.take()
        worker.emit(running, texts)  # 200 messages while this reader reads none
        worker.succeed(running)
        subscription = stream._core.pubsub
        deadline = time.monotonic() + 10
        while subscription.dropped < len(texts) - 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the hub's reader task takes the messages off the connection
        assert subscription.buffered == 8 and subscription.dropped == len(texts) + 1 - 8  # the end record too
        events = await collect(stream)
        assert [e.index for e in events] == list(range(len(texts)))
        assert "".join(e.text for e in events) == "".join(texts)

    run(redis_url, scenario)
    assert not worker.errors
