"""Redis crashes and comes back without its last second of writes, while tokens stream.

A killed redis-server process loses nothing it wrote to its AOF file (the
page cache survives); a crashed machine loses what was not yet fsynced, up
to about a second with ``appendfsync everysec``. The test kills Redis and
cuts its AOF back to its size a second before the kill, which is what such
a crash leaves, then restarts it: the worker keeps running, and every job's
token log must still come out gap-free and equal to its result.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import redis

from common import keys
from common.token_log import position_of, read_log
from producer import Client
from tests.pipeline_checks import assert_streams_match_results, collect

pytestmark = pytest.mark.slow

MAX_TOKENS = 300
LOST_S = 1.0


def test_a_redis_crash_that_loses_its_last_second_leaves_no_gap_in_any_token_log(start_stack, redis_server,
                                                                                  redis_url, tiny_llama_dir):
    stack = start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    conn = redis.Redis.from_url(redis_url)
    with Client(redis_url) as client:
        handles = [client.submit(prompt=f"crash {i} tells a long story", session_id=f"crash-{i}", temperature=0,
                                 max_tokens=MAX_TOKENS, ignore_eos=True) for i in range(4)]
        box: dict = {}
        reader = threading.Thread(target=lambda: box.update(outcomes=collect(handles)), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while sum(conn.xlen(keys.token_log(h.id)) for h in handles) < 40:
            assert time.monotonic() < deadline, "no tokens streamed"
            time.sleep(0.02)
        aof = redis_server.dir / "appendonly.aof"
        before = aof.stat()
        time.sleep(LOST_S)
        logged = sum(conn.xlen(keys.token_log(h.id)) for h in handles)
        redis_server.kill()
        assert aof.stat().st_ino == before.st_ino, "the AOF was rewritten meanwhile; cannot cut it back"
        os.truncate(aof, before.st_size)  # what a crash with appendfsync everysec loses
        redis_server.start()
        conn.connection_pool.disconnect()
        assert sum(conn.xlen(keys.token_log(h.id)) for h in handles) < logged, "the crash lost no token"
        reader.join(300)
        assert not reader.is_alive(), "streams did not finish"
    outcomes = box["outcomes"]
    assert_streams_match_results(outcomes)
    for job_id, (_events, result) in outcomes.items():
        log = read_log(conn, job_id)
        assert [position_of(m) for m in log] == list(range(MAX_TOKENS + 1)), f"{job_id}: a gap in the token log"
        assert [m.token_id for m in log[:-1]] == result.token_ids
    stack.wait_ready(timeout_s=60)
