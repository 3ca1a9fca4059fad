"""Fixtures the client-side integration tests share: a client, a raw Redis connection, a protocol worker."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from common.settings import get_settings
from producer import Client
from tests.doubles import ProtocolWorker


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(settings=get_settings(redis_url=redis_url)) as c:
        yield c


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as r:
        yield r


@pytest.fixture
def worker(redis_url: str) -> Iterator[ProtocolWorker]:
    """Plays a worker group through the wire protocol alone (no model): see tests/doubles.py."""
    w = ProtocolWorker(redis_url)
    yield w
    w.close()
