"""The gateway's Redis records and the disconnect grace's decision, on fakeredis (no HTTP, no worker)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import fakeredis

from common import keys
from common.errors import JobNotFound
from common.settings import get_settings
from producer.gateway import records
from producer.gateway.records import CompletionRecord
from producer.gateway.streaming import CompletionStream


class FakeHandle:
    """A job handle that records whether it was cancelled (or says the job is gone)."""

    def __init__(self, gone: bool = False) -> None:
        self.cancelled = False
        self.gone = gone

    async def cancel(self) -> bool:
        if self.gone:
            raise JobNotFound("gone")
        self.cancelled = True
        return True


def record(cid: str = "c1", **fields: object) -> CompletionRecord:
    return CompletionRecord(**{"id": cid, "kind": "chat", "model": "m", "created": 1, "num_jobs": 2, "n": 2,
                               **fields})


def stream_of(conn, handles) -> CompletionStream:
    client = SimpleNamespace(redis=conn, settings=get_settings(redis_url="redis://localhost:1/0"))
    return CompletionStream(client, record(), handles, [0, 0], grace_s=0, spawn=lambda coroutine: None)


def test_a_retried_request_keeps_the_first_record_and_ttl() -> None:
    async def go() -> None:
        conn = fakeredis.FakeAsyncRedis()
        first = await records.save(conn, record(created=1), ttl_s=60)
        again = await records.save(conn, record(created=99), ttl_s=60)
        assert again == first and again.created == 1
        assert await records.load(conn, "c1") == first
        assert 0 < await conn.ttl(keys.completion("c1")) <= 60
        assert await records.load(conn, "missing") is None
        assert await records.load(conn, "bad id!") is None
        await conn.set(keys.completion("junk"), b"{not a record")
        assert await records.load(conn, "junk") is None

    asyncio.run(go())


def test_a_stream_that_left_cancels_only_if_no_stream_attached_since() -> None:
    async def go() -> None:
        conn = fakeredis.FakeAsyncRedis()
        handles = [FakeHandle(), FakeHandle(gone=True)]
        stream = stream_of(conn, handles)
        left_at = await records.attach(conn, "c1", ttl_s=60)
        resumed_at = await records.attach(conn, "c1", ttl_s=60)  # a resume (on any replica)
        assert (left_at, resumed_at) == (1, 2)
        await stream._cancel_unless_resumed(left_at)
        assert not handles[0].cancelled  # the resume keeps the job
        await stream._cancel_unless_resumed(resumed_at)  # the resumed stream left too, and nobody came back
        assert handles[0].cancelled  # and a job already gone is skipped

    asyncio.run(go())
