"""Fixtures that run the real stack (supervisor and worker-group processes) against the test redis-server."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from common.settings import get_settings
from router.stack import LocalStack, StackOptions

# Fast failure detection for tests; every process of the stack reads these from its environment.
FAST_ENV = {
    "TPQ_HEARTBEAT_INTERVAL_S": "0.25",
    "TPQ_HEARTBEAT_TTL_S": "1.5",
    "TPQ_HANG_TIMEOUT_S": "10",
    "TPQ_NUM_SHARDS": "16",
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
