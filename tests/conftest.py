"""Fixtures shared by every test: a real redis-server, a fake one, tiny checkpoints, the whole stack."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import fakeredis
import pytest
import redis

from common.settings import get_settings
from producer.local_stack.embedded_redis import RedisServer
from producer.local_stack.stack import LocalStack, StackOptions
from tests.doubles import ProtocolWorker

# No kernel calibration in tests (engines use the model dtype's kernels, and nothing is written to the user's
# cache); tests/unit/test_calibration.py turns it on where it is the subject. Child processes inherit it.
os.environ.setdefault("TPQ_CALIBRATE", "0")


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
def worker(redis_url: str) -> Iterator[ProtocolWorker]:
    """Plays a worker group through the wire protocol alone (no model): see tests/doubles.py."""
    w = ProtocolWorker(redis_url)
    yield w
    w.close()


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


# Fast failure detection for tests; every process of the stack reads these from its environment.
FAST_ENV = {
    "TPQ_HEARTBEAT_INTERVAL_S": "0.25",
    "TPQ_HEARTBEAT_TTL_S": "1.5",
    "TPQ_HANG_TIMEOUT_S": "10",
    "TPQ_NUM_SHARDS": "16",
    "TPQ_SUPERVISOR_METRICS_PORT": "0",  # no /metrics unless a test asks (tests may run side by side)
    "TPQ_WORKER_METRICS_PORT": "0",
}


@pytest.fixture
def fast_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    return FAST_ENV


@pytest.fixture
def start_stack(redis_url: str, fast_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                tmp_path) -> Iterator[Callable[..., LocalStack]]:
    """``start_stack(groups=1, tp=1, model=...)``: a running, ready stack on the test Redis; stopped after."""
    monkeypatch.setenv("TPQ_REDIS_URL", redis_url)
    monkeypatch.setenv("TPQ_DATA_DIR", str(tmp_path / "data"))
    stacks: list[LocalStack] = []

    def start(groups: int = 1, tp: int = 1, model: str | None = None, extra: list[str] = ()) -> LocalStack:
        args = [*(["--model", model] if model else []), *extra]
        stack = LocalStack(get_settings(), StackOptions(groups=groups, tp=tp, worker_args=args))
        stacks.append(stack)
        stack.start()
        stack.wait_ready(timeout_s=300)
        return stack

    yield start
    for stack in stacks:
        stack.stop()
