"""Fixtures of the gateway's tests: the gateway served by uvicorn on a free port, a registered group."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import openai
import pytest
import redis
import uvicorn

from common.groups import GroupInfo, make_heartbeat, new_incarnation, register_group, write_heartbeat
from common.settings import Settings, get_settings
from producer.gateway.app import create_app

START_TIMEOUT_S = 30.0
FAKE_MODEL = "test-model"


class GatewayServer:
    """The gateway app served by a real uvicorn server on a background thread; ``url`` once started."""

    def __init__(self, settings: Settings) -> None:
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)
        self.url = ""

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            assert self.thread.is_alive(), "the gateway's uvicorn thread exited while starting"
            assert time.monotonic() < deadline, f"the gateway did not start within {START_TIMEOUT_S:g} s"
            time.sleep(0.01)
        [server] = self.server.servers
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the gateway did not stop"


@pytest.fixture
def start_gateway(redis_url: str) -> Iterator[Callable[..., GatewayServer]]:
    """``start_gateway(**settings)``: a running gateway on the test Redis (stopped after the test)."""
    servers: list[GatewayServer] = []

    def start(**overrides: object) -> GatewayServer:
        settings = get_settings(redis_url=redis_url, **overrides)
        server = GatewayServer(settings).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def gateway(start_gateway, redis_url):
    """``gateway(**settings)``: the base URL of a fresh gateway with a (stand-in) group registered."""

    def make(**settings: object) -> str:
        register_fake_group(redis_url)
        return start_gateway(**settings).url

    return make


@pytest.fixture
def sdk(gateway):
    """``sdk(**settings)``: an ``openai.OpenAI`` client of a fresh gateway (no retries), with a group registered."""

    def make(**settings: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{gateway(**settings)}/v1", api_key="unused", max_retries=0)

    return make


def keyed_sdk(base: str, key: str) -> openai.OpenAI:
    """An ``openai.OpenAI`` client of the gateway at ``base`` that sends API key ``key`` (no retries)."""
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def register_fake_group(redis_url: str, model: str = FAKE_MODEL, group: str = "gw-fake") -> GroupInfo:
    """A registered group with a live heartbeat (one rank, an hour's TTL) that runs nothing itself.

    Its jobs stay queued unless a test plays the worker (``tests.doubles.ProtocolWorker``).
    """
    info = GroupInfo(group=group, incarnation=new_incarnation(), tp=1, model=model, host="test", pid=os.getpid(),
                     worker_name=f"{group}-worker", started_at=time.time())
    with redis.Redis.from_url(redis_url) as conn:
        register_group(conn, info)
        write_heartbeat(conn, make_heartbeat(group, 0, info.incarnation, step=0), ttl_s=3600)
    return info


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> object:
    """Poll ``condition`` until it is truthy; its value. Fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(0.02)
    return value
