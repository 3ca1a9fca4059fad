"""common.redis_conn.retries_for against a real redis-server that is down longer than the default retries last."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from producer.local_stack.embedded_redis import RedisServer
from common.redis_conn import DEFAULT_BACKOFF_BASE_S, DEFAULT_BACKOFF_CAP_S, connect, retries_for

DOWN_S = 7.0  # longer than the ~5 s the default retries wait


def backoff_total(retries: int) -> float:
    return sum(min(DEFAULT_BACKOFF_CAP_S, DEFAULT_BACKOFF_BASE_S * 2 ** i) for i in range(1, retries + 1))


@pytest.mark.parametrize("outage_s", [0.5, 5.0, 120.0])
def test_retries_for_waits_out_the_outage_and_no_longer(outage_s: float) -> None:
    retries = retries_for(outage_s)
    assert backoff_total(retries) >= outage_s > backoff_total(retries - 1)


def test_a_command_waits_for_a_restarted_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        patient = connect(server.url, retries=retries_for(DOWN_S + 10))
        hasty = connect(server.url)  # the default: about 5 s
        patient.set("k", "v")
        hasty.ping()
        server.stop()
        restart = threading.Timer(DOWN_S, server.start)
        restart.start()
        began = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            hasty.get("k")  # gives up while Redis is still down
        assert patient.get("k") == b"v"  # waited, and the AOF kept the key
        assert time.monotonic() - began >= DOWN_S - 1
        restart.join()
    finally:
        server.close()
