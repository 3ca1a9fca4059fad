"""``tpq up --http-port``: the local stack with its gateway, as processes, answering the openai SDK."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import FAST_ENV
from tests.gateway.conftest import wait_for

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tpq_up_starts_a_gateway_that_serves_the_stacks_model(redis_url, tiny_llama_dir, tmp_path):
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TPQ_")}, **FAST_ENV,
           "TPQ_REDIS_URL": redis_url, "TPQ_DATA_DIR": str(tmp_path / "data"), "TPQ_MODEL": str(tiny_llama_dir)}
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen([sys.executable, "-m", "common.cli", "up", "--http-port", str(port), "--no-metrics"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            assert up.poll() is None, f"tpq up exited with {up.returncode}:\n{log_path.read_text()[-3000:]}"
            return "tpq up: ready" in log_path.read_text()

        wait_for(ready, "tpq up to be ready", timeout_s=300)
        assert f"OpenAI API: http://127.0.0.1:{port}/v1" in log_path.read_text()

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False  # the gateway is still importing its web stack

        wait_for(healthy, "the stack's gateway to answer /health", timeout_s=60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        [model] = client.models.list().data
        assert model.id == str(tiny_llama_dir)
        answer = client.completions.create(model=model.id, prompt="hello", max_tokens=4, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            assert up.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
            raise
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # the gateway stopped with the stack
