"""Token-log replay in pages: a log longer than one XRANGE page is read page by page, every position once, to its end.

A real redis-server; the logs are written by the worker's own writer
(:func:`common.token_log.append_messages`). The readers' log connection is
wrapped to record each XRANGE it sends and how many entries came back.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from common import keys
from common.results import FinishReason, StreamEnd, TokenEvent
from common.token_log import append_messages, message_runs
from producer.stream import AsyncTokenStream, TokenStream
from producer.stream_core import LOG_PAGE

JOB = "paged-job"
MAXLEN, TTL_S = 100_000, 600


def tokens(start: int, stop: int) -> list[TokenEvent]:
    return [TokenEvent(request_id=JOB, index=i, token_id=i, text=f"t{i} ") for i in range(start, stop)]


def end(num_tokens: int) -> StreamEnd:
    return StreamEnd(request_id=JOB, num_tokens=num_tokens, finish_reason=FinishReason.LENGTH)


def write(conn: redis.Redis, messages: list[Any]) -> None:
    assert append_messages(conn, message_runs(messages), MAXLEN, TTL_S) == {}, "the log refused a write"


class RecordingConn:
    """A Redis client that records every XRANGE sent through it: its ``count`` and the entries it returned."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.reads: list[tuple[int | None, int]] = []

    def xrange(self, *args: Any, **kwargs: Any) -> Any:
        reply = self._conn.xrange(*args, **kwargs)
        if asyncio.iscoroutine(reply):
            return self._recorded_async(reply, kwargs.get("count"))
        self.reads.append((kwargs.get("count"), len(reply)))
        return reply

    async def _recorded_async(self, reply: Any, count: int | None) -> Any:
        entries = await reply
        self.reads.append((count, len(entries)))
        return entries

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


def check_pages(reads: list[tuple[int | None, int]], entries: int) -> None:
    """Every read asked for one page, and the reads were exactly the pages ``entries`` entries make."""
    assert all(count == LOG_PAGE for count, _ in reads), f"an XRANGE without COUNT {LOG_PAGE}: {reads}"
    assert [got for _, got in reads] == [min(LOG_PAGE, entries - i * LOG_PAGE)
                                         for i in range(math.ceil(entries / LOG_PAGE))], reads


@pytest.mark.parametrize("num_tokens, start", [
    (3 * LOG_PAGE - 1, 0),  # the end record is the last entry of a full page
    (3 * LOG_PAGE, 0),  # the end record alone on the last page
    (2 * LOG_PAGE + 100, 0),
    (2 * LOG_PAGE + 100, LOG_PAGE - 1),  # a resume: pages counted from the start position
])
def test_a_finished_log_longer_than_a_page_replays_every_position_once(conn, num_tokens, start):
    write(conn, [*tokens(0, num_tokens), end(num_tokens)])
    assert conn.xlen(keys.token_log(JOB)) == num_tokens + 1, "the log does not hold every message written"
    recording = RecordingConn(conn)
    with TokenStream(recording, JOB, pubsub_conn=conn, start=start, timeout=30) as stream:
        first = next(stream)
        assert len(recording.reads) == 1, "more than one page was read before the first event was handed out"
        events = [first, *stream]
    assert [e.index for e in events] == list(range(start, num_tokens))
    assert [e.text for e in events] == [f"t{i} " for i in range(start, num_tokens)]
    assert stream.end == end(num_tokens)
    check_pages(recording.reads, num_tokens + 1 - start)


def test_the_async_reader_replays_in_pages_too(redis_url, conn):
    num_tokens = 2 * LOG_PAGE + 7
    write(conn, [*tokens(0, num_tokens), end(num_tokens)])

    async def read() -> tuple[list[TokenEvent], StreamEnd | None, list[tuple[int | None, int]]]:
        async with redis.asyncio.Redis.from_url(redis_url) as aconn:
            recording = RecordingConn(aconn)
            async with AsyncTokenStream(recording, JOB, pubsub_conn=aconn, timeout=30) as stream:
                events = [event async for event in stream]
            return events, stream.end, recording.reads

    events, stream_end, reads = asyncio.run(read())
    assert [e.index for e in events] == list(range(num_tokens)) and stream_end == end(num_tokens)
    check_pages(reads, num_tokens + 1)


def test_a_live_job_is_paged_through_and_then_followed_on_pub_sub(conn):
    logged = 2 * LOG_PAGE + 3
    write(conn, tokens(0, logged))
    recording = RecordingConn(conn)
    with TokenStream(recording, JOB, pubsub_conn=conn, timeout=30) as stream:
        replayed = [next(stream) for _ in range(logged)]
        assert stream.subscribed, "the reader replayed the log without subscribing first"
        pages = len(recording.reads)
        write(conn, [*tokens(logged, logged + 5), end(logged + 5)])  # published as well as logged
        live = list(stream)
    assert [e.index for e in replayed + live] == list(range(logged + 5)) and stream.end == end(logged + 5)
    check_pages(recording.reads[:pages], logged)
