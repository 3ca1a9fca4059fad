"""Fixtures the client-side integration tests share: a client, a raw Redis connection, a protocol worker."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from common.settings import get_settings
from producer import Client


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(settings=get_settings(redis_url=redis_url)) as c:
        yield c


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as r:
        yield r


