"""Fixtures the integration tests share: a client, a raw Redis connection, a worker group on a thread."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from common.pickle_guard import enable_pickle_for_tests
from common.settings import get_settings
from gpu_worker.serve.group import EXIT_OK, GroupOptions, serve
from producer import Client


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(settings=get_settings(redis_url=redis_url)) as c:
        yield c


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as r:
        yield r




@pytest.fixture
def start_group(redis_url: str, tiny_llama_dir, fast_env) -> Iterator[Callable[[], None]]:
    """``start_group()``: a worker group of the tiny Llama on a thread, serving the test Redis; stopped (exit code
    0) after."""
    stop, codes, threads = threading.Event(), [], []
    options = GroupOptions(group="thread-group", engine={"model": str(tiny_llama_dir), "block_size": 4})

    def start() -> None:
        settings = get_settings(redis_url=redis_url)
        thread = threading.Thread(target=lambda: codes.append(serve(settings, redis_url, options, stop)),
                                  name="test-group", daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    enable_pickle_for_tests()  # serve() turned unpickling off for the whole process
    assert codes == [EXIT_OK] * len(threads)
