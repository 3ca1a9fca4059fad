"""Redis fixtures shared by every test: a real redis-server and a fake one."""
from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
import redis

from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (AOF on, free port, temp dir) for the whole test session."""
    with RedisServer(tmp_path_factory.mktemp("redis-server")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The URL of the session's redis-server, emptied (FLUSHALL) before the test.

    Restarts the server first if an earlier test stopped or killed it.
    """
    if not redis_server.is_running:
        redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    yield redis_server.url


@pytest.fixture
def fake_redis() -> Iterator[redis.Redis]:
    """A fakeredis client on its own empty in-process server (bytes responses, like production)."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama checkpoint with a tokenizer (tests/checkpoints.py)."""
    from tests.checkpoints import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen2 checkpoint (q/k/v biases, GQA) with a tokenizer."""
    from tests.checkpoints import write_tiny_qwen2

    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))
