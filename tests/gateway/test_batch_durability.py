"""A Batch API batch survives its gateways killed (SIGKILL, twice) and its worker group killed, and completes exact.

The gateway runs as ``tpq gateway`` subprocesses in front of a real group of
the tiny random model. Every kill point is chosen from observed state (the
batch's ``request_counts``, the jobs' rq statuses) and asserted, never timed.
The output must hold 200 lines, one per ``custom_id``, each the text of its
own job's result as the Python client reads it.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import redis

from common import keys
from common.groups import read_heartbeats
from producer import Client
from tests.gateway.conftest import wait_for
from tests.gateway.test_up_gateway import free_port

pytestmark = pytest.mark.slow

LINES = 200
MAX_TOKENS = 48
TIMEOUT_S = 600.0


class GatewayProcess:
    """``tpq gateway --port PORT`` as a subprocess (its own session), killed with SIGKILL on demand."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port, self.log_path = port, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> GatewayProcess:
        env = {**os.environ, "TPQ_HTTP_BATCH_LEASE_S": "1"}  # a killed replica's batches are taken over in 1 s
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "common.cli", "gateway", "--port", str(self.port)],
                                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            assert self.process.poll() is None, f"tpq gateway exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "tpq gateway to answer /health", timeout_s=120)
        return self

    def kill(self) -> None:
        assert self.process is not None and self.process.poll() is None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def batch_jobs_started(conn: redis.Redis, batch_id: str) -> int:
    with conn.pipeline(transaction=False) as pipe:
        for number in range(1, LINES + 1):
            pipe.hget(keys.rq_job_key(f"{batch_id}-{number}"), "status")
        return sum(status == b"started" for status in pipe.execute())


def test_a_batch_survives_gateway_and_group_kills(start_stack, redis_url, tiny_llama_dir, tmp_path):
    # 4 sequences at a time: the group must still be running lines when the keeper has harvested 130 of them
    # (with 64 the tiny model finished all 200 before that, and the wait for a running job never ended)
    start_stack(groups=1, tp=1, model=str(tiny_llama_dir), extra=["--max-num-seqs", "4"])
    conn = redis.Redis.from_url(redis_url)
    gateway = GatewayProcess(free_port(), tmp_path / "gateway.log").start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="unused", max_retries=2)
        items = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                  "body": {"model": str(tiny_llama_dir), "prompt": f"story {i} begins", "max_tokens": MAX_TOKENS,
                           "temperature": 0, "ignore_eos": True}} for i in range(LINES)]
        content = "".join(json.dumps(item) + "\n" for item in items).encode()
        file_id = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch").id
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
        assert batch.status == "in_progress"

        def counts():
            try:
                return client.batches.retrieve(batch.id).request_counts
            except (openai.APIConnectionError, openai.InternalServerError):
                return None  # the gateway is being restarted

        for at_least in (50, 100):  # kill the gateway twice, each time mid-batch
            wait_for(lambda: (c := counts()) is not None and c.completed >= at_least, f"{at_least} lines done",
                     TIMEOUT_S)
            gateway.kill()
            at_kill = json.loads(conn.hget(keys.api_batch(batch.id), "completed"))
            assert at_least <= at_kill < LINES, f"the batch was not mid-run at the kill: {at_kill} done"
            gateway.start()

        wait_for(lambda: (c := counts()) is not None and c.completed >= 130 and batch_jobs_started(conn, batch.id),
                 "130 lines done and some job running", TIMEOUT_S)
        [rank0] = [b for b in read_heartbeats(conn, "g0") if b.rank == 0]
        os.kill(rank0.pid, signal.SIGKILL)  # the supervisor recovers its jobs; the group restarts
        assert client.batches.retrieve(batch.id).request_counts.completed < LINES

        done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
                        "the batch to complete", TIMEOUT_S)
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (LINES,
                                                                                                           LINES, 0)
        assert done.error_file_id is None
        lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    finally:
        gateway.stop()
    assert len(lines) == LINES
    assert sorted(line["custom_id"] for line in lines) == sorted(item["custom_id"] for item in items)
    attempts = {}
    with Client(redis_url) as direct:
        for line in lines:
            job_id = line["response"]["request_id"]
            assert job_id == f"{batch.id}-{int(line['custom_id'].split('-')[1]) + 1}"
            result = direct.job(job_id).result(timeout=10)
            body = line["response"]["body"]
            assert body["choices"][0]["text"] == result.text and body["usage"]["completion_tokens"] == MAX_TOKENS
            attempts[job_id] = result.attempt
    assert max(attempts.values()) > 1, "the group kill interrupted no job"
