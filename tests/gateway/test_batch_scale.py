"""The Batch API's bounded-cost parts: the keeper's round over pending lines, paged files, takeover from the done set.

Unit tests of :class:`producer.gateway.batch_keeper._Tracked` need no Redis;
the rest run against the real redis-server of the fixtures, the HTTP ones
through the real gateway and the ``openai`` SDK with jobs played by
:class:`tests.doubles.ProtocolWorker`, with the per-pass bounds made tiny so
that a handful of lines takes many passes and many pages.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aredis

from common import keys
from common.errors import QueueFull
from producer.gateway import batch_keeper, batch_store, files
from producer.gateway.batch_keeper import BatchKeeper, LeaseLost, _Tracked
from tests.gateway.conftest import wait_for
from tests.gateway.test_batch_api import CHAT, answer_of, chat_line, lines_of, serve, upload, wait_status

# ------------------------------------------------------------------ the round over pending lines (no Redis)


def test_a_window_is_bounded_and_a_round_visits_every_pending_line_once():
    tracked = _Tracked(10, set(range(10)))
    seen = []
    for _ in range(4):
        window = tracked.window(enqueued=10, budget=3)
        assert len(window) <= 3 and len(set(window)) == len(window)
        seen += window
    assert seen[:10] == list(range(10))  # one round: every line, in order, none twice
    assert seen[10:] == [0, 1]  # then a new round


def test_a_window_skips_lines_done_meanwhile_and_lines_not_enqueued():
    tracked = _Tracked(10, set(range(10)))
    assert tracked.window(enqueued=6, budget=4) == [0, 1, 2, 3]
    tracked.pending -= {4, 0, 1}
    assert tracked.window(enqueued=6, budget=4) == [5, 2, 3]  # 4 is done, 6.. not enqueued: a new round
    later = tracked.window(enqueued=8, budget=4) + tracked.window(enqueued=8, budget=4)
    assert {6, 7} <= set(later) <= {2, 3, 5, 6, 7}  # enqueued since: in the next round


def test_a_window_smaller_than_the_budget_holds_every_pending_line_once():
    tracked = _Tracked(5, {1, 3})
    tracked.cursor, tracked.order = 1, [1, 3]
    assert tracked.window(enqueued=5, budget=100) == [3, 1]


def test_a_window_counts_jobs_not_lines():
    tracked = _Tracked(4, set(range(4)))
    tracked.jobs[0] = tracked.jobs[1] = 3
    assert tracked.window(enqueued=4, budget=5) == [0, 1]


def test_runs_of_consecutive_positions():
    assert batch_store.runs([7, 1, 2, 3, 9, 8]) == [(1, 4), (7, 10)]
    assert batch_store.runs([]) == []


@pytest.mark.parametrize("custom_id", ["plain-1", 'with "quotes", commas', "back\\slash", "naïve ✓", "new\nline"])
def test_custom_ids_and_entries_read_fast_are_what_json_reads(custom_id):
    raw = json.dumps({"n": 3, "custom_id": custom_id, "kind": "chat", "body": {}}, separators=(",", ":"),
                     ensure_ascii=False).encode()
    assert batch_store._custom_id(raw) == custom_id
    data = {"custom_id": custom_id, "response": None, "error": {"code": "x", "message": "é"}}
    for ensure_ascii in (True, False):  # as this version and an older one wrote entries
        stored = json.dumps({"line": 3, "error": True, "data": data}, separators=(",", ":"),
                            ensure_ascii=ensure_ascii).encode()
        failed, line = batch_store.entry_data(stored)
        assert failed is True and json.loads(line) == data
    spaced = json.dumps({"line": 3, "error": False, "data": data}).encode()  # another layout: decoded in full
    assert batch_store.entry_data(spaced) == (False, json.dumps(data, separators=(",", ":"),
                                                                ensure_ascii=False).encode())


# ------------------------------------------------------------------ files written a chunk at a time


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_file_writer_shows_nothing_until_it_commits_and_the_first_commit_wins(redis_url, monkeypatch):
    monkeypatch.setattr(files, "CHUNK_BYTES", 10)

    async def scenario():
        conn = aredis.Redis.from_url(redis_url)
        first = files.FileWriter(conn, "file-x", "x.jsonl", "batch_output", "p1")
        second = files.FileWriter(conn, "file-x", "x.jsonl", "batch_output", "p2")
        for i in range(7):
            await first.write(f"line {i}\n".encode())
            await second.write(b"other\n")
        assert not await conn.exists(keys.api_file("file-x"))
        assert await conn.llen(keys.api_file_part("file-x", "p1")) >= 3  # written in chunks already
        assert 0 < await conn.ttl(keys.api_file_part("file-x", "p1")) <= files.PART_TTL_S
        obj = await first.commit()
        await second.commit()
        content = await files.file_content(conn, "file-x")
        streamed = b"".join([chunk async for chunk in await files.file_chunks(conn, "file-x")])
        part_ttl = await conn.ttl(keys.api_file_part("file-x", "p1"))
        other_left = await conn.exists(keys.api_file_part("file-x", "p2"))
        await conn.aclose()
        return obj, content, streamed, part_ttl, other_left

    obj, content, streamed, part_ttl, other_left = run(scenario())
    expected = "".join(f"line {i}\n" for i in range(7)).encode()
    assert content == streamed == expected and obj["bytes"] == len(expected)
    assert part_ttl == -1 and not other_left  # the content kept for good; the second writer's part dropped


def test_a_chunked_file_downloads_and_deletes_over_http(sdk, redis_url, monkeypatch):
    monkeypatch.setattr(files, "CHUNK_BYTES", 16)
    client = sdk()
    body = "".join(f'{{"n": {i}}}\n' for i in range(50)).encode()

    async def write():
        conn = aredis.Redis.from_url(redis_url)
        writer = files.FileWriter(conn, "file-chunked", "out.jsonl", "batch_output", "w")
        for line in body.splitlines(keepends=True):
            await writer.write(line)
        await writer.commit()
        await conn.aclose()

    run(write())
    assert client.files.content("file-chunked").content == body
    assert client.files.retrieve("file-chunked").bytes == len(body)
    client.files.delete("file-chunked")
    conn = redis.Redis.from_url(redis_url)
    assert not conn.exists(keys.api_file("file-chunked")) and not conn.exists(keys.api_file_part("file-chunked", "w"))


# ------------------------------------------------------------------ a batch over many passes and pages


@pytest.fixture
def tiny_bounds(monkeypatch):
    """A pass reads 2 jobs' states and enqueues 3 jobs; files are written 2 lines a page, 64-byte chunks."""
    monkeypatch.setattr(batch_keeper, "READ_PER_PASS_JOBS", 2)
    monkeypatch.setattr(batch_keeper, "ENQUEUE_PER_PASS_JOBS", 3)
    monkeypatch.setattr(batch_keeper, "ENQUEUE_CHUNK_JOBS", 2)
    monkeypatch.setattr(batch_keeper, "PAGE_LINES", 2)
    monkeypatch.setattr(files, "CHUNK_BYTES", 64)


def test_a_batch_read_a_window_at_a_time_completes_with_each_line_once_in_order(sdk, worker, redis_url, tiny_bounds):
    client = sdk()
    items = [chat_line(f"req-{i}", f"question {i}") for i in range(9)] + [chat_line("two", n=2)]
    thread = serve(worker, 11, fail=lambda job_id: job_id.endswith("-4"))
    batch = client.batches.create(input_file_id=upload(client, items), endpoint=CHAT, completion_window="24h")
    done = wait_status(client, batch.id, {"completed"}, timeout_s=60)
    thread.join(timeout=30)
    assert worker.errors == []
    assert (done.request_counts.completed, done.request_counts.failed) == (9, 1)
    out, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert [line["custom_id"] for line in out] == [f"req-{i}" for i in range(9) if i != 3] + ["two"]
    assert [line["custom_id"] for line in errors] == ["req-3"]
    for number, line in enumerate(out[:3], start=1):
        assert line["response"]["body"]["choices"][0]["message"]["content"] == answer_of(f"{batch.id}-{number}")
    conn = redis.Redis.from_url(redis_url)
    assert not conn.exists(keys.api_batch_done(batch.id)) and not conn.exists(keys.api_batch_output(batch.id))


def test_a_cancelled_batch_pages_its_unrun_lines(sdk, worker, tiny_bounds):
    client = sdk()
    thread = serve(worker, 1)
    batch = client.batches.create(input_file_id=upload(client, [chat_line(f"c{i}") for i in range(7)]),
                                  endpoint=CHAT, completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed == 1, "one finished line")
    thread.join(timeout=30)
    client.batches.cancel(batch.id)
    done = wait_status(client, batch.id, {"cancelled"}, timeout_s=60)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 6)
    [finished] = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert [line["custom_id"] for line in errors] == [f"c{i}" for i in range(7) if f"c{i}" != finished["custom_id"]]
    assert all(line["error"]["code"] == "batch_cancelled" for line in errors)


# ------------------------------------------------------------------ taking a batch over


def stored_batch(conn: redis.Redis, batch_id: str, lines: int) -> None:
    raws = [json.dumps({"n": i + 1, "custom_id": f"id-{i}", "kind": "chat",
                        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}) for i in range(lines)]
    conn.rpush(keys.api_batch_lines(batch_id), *raws)
    conn.hset(keys.api_batch(batch_id), mapping={"spec": json.dumps({"id": batch_id}), "total": lines, "completed": 0,
                                                 "failed": 0, "status": "in_progress"})


def keeper_on(url: str) -> BatchKeeper:
    keeper = BatchKeeper.__new__(BatchKeeper)  # only what _track and _hold use
    keeper.conn, keeper.token = aredis.Redis.from_url(url), "me"
    keeper.settings = SimpleNamespace(http_batch_lease_s=10.0)  # type: ignore[assignment]
    return keeper


def test_a_replica_taking_over_learns_the_done_lines_from_the_done_set(redis_url):
    conn = redis.Redis.from_url(redis_url)
    stored_batch(conn, "batch_t", 6)

    async def scenario():
        keeper = keeper_on(redis_url)
        entry = {"line": 1, "error": False, "data": {}}
        written = await batch_store.harvest(keeper.conn, "batch_t", [
            batch_store.Harvest(0, "id-0", entry, False), batch_store.Harvest(4, "id-4", entry, True),
            batch_store.Harvest(0, "id-0", entry, False)])
        state = await batch_store.load(keeper.conn, "batch_t")
        tracked = await keeper._track(state)
        await keeper.conn.aclose()
        return written, state, tracked

    written, state, tracked = run(scenario())
    assert written == [True, True, False]  # the same custom_id again: not written, not counted
    assert (state.count("completed"), state.count("failed")) == (1, 1)
    assert tracked.pending == {1, 2, 3, 5}


def test_entries_an_older_replica_wrote_without_the_done_set_are_found_by_custom_id(redis_url):
    conn = redis.Redis.from_url(redis_url)
    stored_batch(conn, "batch_old", 5)
    conn.hset(keys.api_batch_output("batch_old"), "id-2", json.dumps({"line": 3, "error": False, "data": {}}))
    conn.hincrby(keys.api_batch("batch_old"), "completed", 1)
    conn.set(keys.api_batch_lease("batch_old"), "me")

    async def scenario():
        keeper = keeper_on(redis_url)
        tracked = await keeper._track(await batch_store.load(keeper.conn, "batch_old"))
        await keeper.conn.aclose()
        return tracked

    assert run(scenario()).pending == {0, 1, 3, 4}


def test_a_long_walk_stops_when_another_replica_holds_the_lease(redis_url):
    conn = redis.Redis.from_url(redis_url)
    conn.set(keys.api_batch_lease("batch_l"), "someone-else")

    async def scenario():
        keeper = keeper_on(redis_url)
        try:
            await keeper._hold("batch_l")
        finally:
            await keeper.conn.aclose()

    with pytest.raises(LeaseLost):
        run(scenario())


def test_a_full_queue_holds_the_enqueue_back_for_a_while(redis_url, monkeypatch):
    conn = redis.Redis.from_url(redis_url)
    stored_batch(conn, "batch_q", 3)
    calls = []

    async def submit_batch(requests):
        calls.append(len(requests))
        if len(calls) == 1:
            raise QueueFull("full")

    async def scenario():
        keeper = keeper_on(redis_url)
        keeper.client = SimpleNamespace(build_request=lambda **fields: fields, submit_batch=submit_batch)
        keeper.settings = SimpleNamespace(http_batch_lease_s=10.0, max_batch_size=100)
        state = await batch_store.load(keeper.conn, "batch_q")
        tracked = _Tracked(3, {0, 1, 2})
        counts = [await keeper._enqueue(state, tracked, 0), await keeper._enqueue(state, tracked, 0)]
        tracked.enqueue_at = 0.0  # the back-off is over
        counts.append(await keeper._enqueue(state, tracked, 0))
        await keeper.conn.aclose()
        return counts

    assert run(scenario()) == [0, 0, 3]
    assert calls == [3, 3]  # none tried while backing off
    assert conn.hget(keys.api_batch("batch_q"), "enqueued") == b"3"
