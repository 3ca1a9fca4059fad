"""An AsyncClient's many streams share one pub/sub connection, and its result waits one more.

Against a real redis-server, with tests/doubles.py's ProtocolWorker playing
the worker from a thread: every stream still gets every token once, in
order, also when the shared pub/sub connection is killed mid-stream; a
stream that closes early unsubscribes its channel; and the client's
connections, counted by CLIENT LIST, stay few however many jobs it watches.
"""
from __future__ import annotations

import asyncio
import threading
import time

from common import keys
from common.settings import get_settings
from producer import AsyncClient

JOBS = 40
TEXTS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def run(redis_url, scenario):
    async def main():
        async with AsyncClient(settings=get_settings(redis_url=redis_url)) as client:
            return await scenario(client)

    return asyncio.run(main())


def connections(raw) -> dict[str, int]:
    """The test Redis's client connections by name."""
    counts: dict[str, int] = {}
    for client in raw.client_list():
        counts[client["name"]] = counts.get(client["name"], 0) + 1
    return counts


async def collect(stream):
    return [event async for event in stream]


async def until(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def serve_jobs(worker, count: int, texts, gate: threading.Event | None = None) -> threading.Thread:
    """Take ``count`` jobs, then (after ``gate``) stream ``texts`` to each, interleaved, and finish them."""

    def serve() -> None:
        try:
            running = [worker.take() for _ in range(count)]
            if gate is not None:
                assert gate.wait(30), "the test never opened the gate"
            for text in texts:
                for job in running:
                    worker.emit(job, [text])
            for job in running:
                worker.succeed(job)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            worker.errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_many_streams_share_one_pubsub_connection_and_get_every_token_once(redis_url, worker, raw):
    async def scenario(client):
        handles = [await client.submit(f"p{i}", max_tokens=16) for i in range(JOBS)]
        gate = threading.Event()
        thread = serve_jobs(worker, JOBS, TEXTS, gate)
        streams = [await h.stream(timeout=10).open() for h in handles]
        assert client._streams.channels == JOBS  # every stream subscribed before any token is written
        assert connections(raw).get("tpq-producer-async-stream") == 1
        gate.set()
        events = await asyncio.gather(*(collect(s) for s in streams))
        thread.join(10)
        for handle, got in zip(handles, events):
            assert [e.index for e in got] == list(range(len(TEXTS))), handle.id
            assert "".join(e.text for e in got) == "".join(TEXTS)
        await until(lambda: client._streams.channels == 0, "every channel to be unsubscribed")
        numsub = dict(raw.pubsub_numsub(*(keys.token_channel(h.id) for h in handles)))
        assert set(numsub.values()) == {0}, numsub

    run(redis_url, scenario)
    assert not worker.errors


def test_killing_the_shared_pubsub_connection_loses_and_repeats_nothing(redis_url, worker, raw):
    async def scenario(client):
        handles = [await client.submit(f"p{i}", max_tokens=16) for i in range(JOBS)]
        running = [worker.take() for _ in handles]
        streams = [await h.stream(timeout=10).open() for h in handles]
        for job in running:
            worker.emit(job, TEXTS[:3])
        got = [[await s.__anext__() for _ in range(3)] for s in streams]  # every stream is live
        assert raw.client_kill_filter(_type="pubsub") == 1  # the one connection every stream listens on
        for job in running:
            worker.emit(job, TEXTS[3:])
            worker.succeed(job)
        rest = await asyncio.gather(*(collect(s) for s in streams))
        for first, later in zip(got, rest):
            assert [e.index for e in first + later] == list(range(len(TEXTS)))
        assert connections(raw).get("tpq-producer-async-stream") == 1  # reconnected, still one

    run(redis_url, scenario)


def test_a_stream_closed_early_unsubscribes_only_its_channel(redis_url, worker, raw):
    async def scenario(client):
        first, second = [await client.submit(f"p{i}", max_tokens=16) for i in range(2)]
        one, two = await first.stream(timeout=5).open(), await second.stream(timeout=5).open()
        await one.aclose()
        numsub = dict(raw.pubsub_numsub(keys.token_channel(first.id), keys.token_channel(second.id)))
        assert numsub == {keys.token_channel(first.id).encode(): 0, keys.token_channel(second.id).encode(): 1}
        await two.aclose()

    run(redis_url, scenario)


def test_many_result_waits_share_one_connection(redis_url, worker, raw):
    async def scenario(client):
        handles = [await client.submit(f"p{i}", max_tokens=16) for i in range(100)]
        waits = [asyncio.ensure_future(h.result(timeout=30)) for h in handles]
        await until(lambda: client._results.waiting == len(handles), "every result() to be waiting")
        seen = connections(raw)
        assert seen.get("tpq-producer-async-results") == 1
        assert seen.get("tpq-producer-async", 0) <= client.settings.client_pool_size
        thread = serve_jobs(worker, len(handles), ["x", "y"])
        results = await asyncio.gather(*waits)
        thread.join(10)
        assert [r.request_id for r in results] == [h.id for h in handles]
        assert all(r.text == "xy" for r in results)
        assert client._results.waiting == 0

    run(redis_url, scenario)
    assert not worker.errors
