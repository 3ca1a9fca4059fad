"""The token log's gap-free append (common.token_log) and rank 0's publisher on a real redis-server.

A Redis that crashed can come back without its last writes (``appendfsync
everysec`` loses up to about a second). These tests make Redis "lose" the
tail of a job's log by rewriting the log shorter, as a crashed Redis
reloads it, and check that nothing after that leaves a hole in the log.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from common import keys
from common.jobs import LOG_FIELD, encode_stream_message, log_entry_id
from common.redis_conn import connect
from common.results import FinishReason, StreamEnd, TokenEvent
from common.token_log import append_messages, message_runs, position_of, read_log, resume_point
from gpu_worker.serve.engine_loop import StepReport
from gpu_worker.serve.publisher import Publisher

MAXLEN, TTL_S = 1000, 60


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


def tokens(job_id: str, start: int, stop: int, run: str = "a") -> list[TokenEvent]:
    return [TokenEvent(request_id=job_id, index=i, token_id=i, text=f"{run}{i} ") for i in range(start, stop)]


def keep_only(conn: redis.Redis, job_id: str, positions: list[int]) -> None:
    """Make the log hold only ``positions``, as a Redis that lost the others in a crash reloads it."""
    kept = [m for m in read_log(conn, job_id) if position_of(m) in positions]
    conn.delete(keys.token_log(job_id))
    for message in kept:
        conn.xadd(keys.token_log(job_id), {LOG_FIELD: encode_stream_message(message)},
                  id=log_entry_id(position_of(message)))


def positions(conn: redis.Redis, job_id: str) -> list[int]:
    return [position_of(m) for m in read_log(conn, job_id)]


def test_append_writes_publishes_and_skips_what_the_log_holds(conn: redis.Redis) -> None:
    pubsub = conn.pubsub()
    pubsub.subscribe(keys.token_channel("j"))
    assert append_messages(conn, message_runs(tokens("j", 0, 3)), MAXLEN, TTL_S) == {}
    assert append_messages(conn, message_runs(tokens("j", 1, 5, run="b")), MAXLEN, TTL_S) == {}  # 1, 2 are logged
    assert [m.text for m in read_log(conn, "j")] == ["a0 ", "a1 ", "a2 ", "b3 ", "b4 "]
    assert 0 < conn.ttl(keys.token_log("j")) <= TTL_S
    published = []
    while (message := pubsub.get_message(timeout=1)) is not None:
        if message["type"] == "message":
            published.append(message["data"])
    assert len(published) == 5  # each logged message once
    pubsub.close()


def test_append_refuses_to_leave_a_hole_and_says_where_the_log_ends(conn: redis.Redis) -> None:
    append_messages(conn, message_runs(tokens("j", 0, 6)), MAXLEN, TTL_S)
    keep_only(conn, "j", [0, 1, 2])  # Redis lost 3..5
    assert append_messages(conn, message_runs(tokens("j", 6, 8)), MAXLEN, TTL_S) == {"j": 3}
    assert positions(conn, "j") == [0, 1, 2]  # nothing written past the hole


def test_message_runs_cut_per_job_at_consecutive_positions() -> None:
    events = tokens("a", 0, 2) + tokens("b", 5, 6) + tokens("a", 2, 3)
    end = StreamEnd(request_id="a", num_tokens=3, finish_reason=FinishReason.LENGTH)
    runs = message_runs([*events, end, *tokens("b", 9, 10)])
    assert [[(m.request_id, position_of(m)) for m in run] for run in runs] == [
        [("a", 0), ("a", 1), ("a", 2), ("a", 3)], [("b", 5)], [("b", 9)]]


def test_the_publisher_writes_again_what_a_crashed_redis_lost(redis_url: str, conn: redis.Redis) -> None:
    written = threading.Event()
    publisher = Publisher(redis_url, MAXLEN, TTL_S, on_written=lambda report: written.set())
    publisher.start()
    try:
        publisher.put(StepReport(events=tokens("j", 0, 5) + tokens("k", 0, 2)))
        assert written.wait(10)
        keep_only(conn, "j", [0, 1])  # the crash took 2..4 of j
        written.clear()
        publisher.put(StepReport(events=tokens("j", 5, 7) + tokens("k", 2, 3)))
        assert written.wait(10)
        assert positions(conn, "j") == list(range(7)) and positions(conn, "k") == [0, 1, 2]
        assert [m.text for m in read_log(conn, "j")] == [f"a{i} " for i in range(7)]
    finally:
        publisher.close()


def test_a_job_resumed_at_a_hole_continues_the_log_gap_free(conn: redis.Redis) -> None:
    """A hole no writer could fill (its run died with the crash): the job resumes at the hole and its new run's
    first append drops the stranded entries above it."""
    append_messages(conn, message_runs(tokens("j", 0, 8)), MAXLEN, TTL_S)
    keep_only(conn, "j", [0, 1, 2, 6, 7])
    resumed, end = resume_point(conn, "j")
    assert [t.index for t in resumed] == [0, 1, 2] and end is None
    end = StreamEnd(request_id="j", num_tokens=5, finish_reason=FinishReason.LENGTH)
    assert append_messages(conn, message_runs([*tokens("j", 3, 5, run="b"), end]), MAXLEN, TTL_S) == {}
    assert [m.text if isinstance(m, TokenEvent) else "end" for m in read_log(conn, "j")] == [
        "a0 ", "a1 ", "a2 ", "b3 ", "b4 ", "end"]
    assert resume_point(conn, "j") == (read_log(conn, "j")[:5], end)


def test_append_loads_its_script_into_a_restarted_redis(redis_server, conn: redis.Redis) -> None:
    append_messages(conn, message_runs(tokens("j", 0, 1)), MAXLEN, TTL_S)
    redis_server.restart()  # the script cache is empty again
    deadline = time.monotonic() + 10
    while True:
        try:
            assert append_messages(conn, message_runs(tokens("j", 1, 2)), MAXLEN, TTL_S) == {}
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline
    assert positions(conn, "j") == [0, 1]
