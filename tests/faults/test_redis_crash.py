"""Redis crashes and comes back without its last writes, while tokens stream or just after jobs finished.

A killed redis-server process loses nothing it wrote to its AOF file (the
page cache survives); a crashed machine loses what was not yet fsynced, up
to about a second with ``appendfsync everysec``. The tests kill Redis, cut
its AOF back to its size at an earlier moment (what such a crash leaves),
and restart it:

- while the jobs run: the worker keeps running and writes the lost messages
  again, so every job's token log comes out gap-free and equal to its result;
- after the jobs finished and their clients got the results: Redis forgot
  the completions (the jobs are 'started' again, their logs cut short), so
  the supervisor requeues them, they resume from their logs, finish again
  with the same tokens, and their logs come out whole.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import redis

from common import keys
from common.token_log import logged_count, position_of, read_log
from producer import Client, JobState
from tests.pipeline_checks import assert_streams_match_results, collect

pytestmark = pytest.mark.slow

JOBS = 4
MAX_TOKENS = 300
CUT_AT_TOKENS = 40  # logged over all jobs when the AOF's size is taken: what the crash keeps
LOST_TOKENS = 60  # logged over all jobs after that, before a kill while the jobs run: what the crash loses
SETTLE_S = 120


@pytest.mark.parametrize("crash", ["while_running", "after_finishing"])
def test_a_redis_crash_that_loses_its_last_writes_leaves_every_token_log_whole(crash, start_stack, redis_server,
                                                                               redis_url, tiny_llama_dir):
    stack = start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    conn = redis.Redis.from_url(redis_url)

    def logged() -> list[int]:
        return [logged_count(conn, h.id) for h in handles]

    def wait_until(condition, what: str) -> None:
        deadline = time.monotonic() + SETTLE_S
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    with Client(redis_url) as client:
        handles = [client.submit(prompt=f"crash {i} tells a long story", session_id=f"crash-{i}", temperature=0,
                                 max_tokens=MAX_TOKENS, ignore_eos=True) for i in range(JOBS)]
        box: dict = {}
        reader = threading.Thread(target=lambda: box.update(outcomes=collect(handles)), daemon=True)
        reader.start()
        wait_until(lambda: sum(logged()) >= CUT_AT_TOKENS, "no tokens streamed")
        aof = redis_server.dir / "appendonly.aof"
        before = aof.stat()
        if crash == "while_running":
            wait_until(lambda: sum(logged()) >= CUT_AT_TOKENS + LOST_TOKENS, "tokens stopped streaming")
        else:
            reader.join(SETTLE_S)
            assert not reader.is_alive(), "streams did not finish"
        at_kill = logged()
        redis_server.kill()
        assert aof.stat().st_ino == before.st_ino, "the AOF was rewritten meanwhile; cannot cut it back"
        os.truncate(aof, before.st_size)  # what a crash with appendfsync everysec loses
        redis_server.start()
        conn.connection_pool.disconnect()
        if crash == "while_running":
            assert all(n <= MAX_TOKENS for n in at_kill), f"a job finished before the kill: {at_kill}"
        else:
            assert all(n == MAX_TOKENS + 1 for n in at_kill), f"a job had not finished before the kill: {at_kill}"
        assert sum(logged()) < sum(at_kill), "the crash lost no token"
        reader.join(SETTLE_S)
        assert not reader.is_alive(), "streams did not finish"
        wait_until(lambda: all(h.status() == JobState.FINISHED for h in handles), "a job did not finish again")
    outcomes = box["outcomes"]
    assert_streams_match_results(outcomes)
    for job_id, (_events, result) in outcomes.items():
        log = read_log(conn, job_id)
        assert [position_of(m) for m in log] == list(range(MAX_TOKENS + 1)), f"{job_id}: a gap in the token log"
        assert [m.token_id for m in log[:-1]] == result.token_ids, f"{job_id}: its log differs from its result"
    stack.wait_ready(timeout_s=60)
