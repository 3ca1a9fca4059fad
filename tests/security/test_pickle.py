"""Pickle is never loaded: not by the supervisor or the client commands (unpickling disabled), not by the client library.

A pickle payload here is one whose unpickling would create a marker
directory (``os.mkdir``): if the marker ever exists, something unpickled.
The worker's side is covered by tests/integration/test_rq_safety.py and the
raw payloads of tests/faults/test_bad_input.py.
"""
from __future__ import annotations

import asyncio
import base64
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import redis
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from common import keys
from common.cli import PICKLE_FREE_COMMANDS, SUBCOMMANDS
from common.errors import InvalidRequestError, JobFailed, TpqError
from common.jobs import GENERATE_FUNC
from producer import AsyncClient, Client
from producer.batches import BatchHandle


class Mkdir:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def pickled(marker: Path) -> bytes:
    return pickle.dumps(Mkdir(marker))


def plant_pickled_job(conn: redis.Redis, job_id: str, marker: Path, *, status: str = "queued",
                      queue: str = keys.BATCH_QUEUE, exc_info: bool = True) -> Job:
    """A job hash whose data, meta, result (and exc_info, which makes the hash unreadable to rq) are pickles."""
    job = Job.create(GENERATE_FUNC, kwargs={}, id=job_id, connection=conn, serializer=JSONSerializer, origin=queue,
                     failure_ttl=600, result_ttl=600)
    fields = job.to_dict()
    fields.update(status=status, data=zlib.compress(pickled(marker)), meta=pickled(marker), result=pickled(marker))
    if exc_info:
        fields["exc_info"] = pickled(marker)
    conn.hset(job.key, mapping=fields)
    return job


def test_supervisor_and_client_commands_run_with_unpickling_disabled() -> None:
    """Every pickle-free tpq command gets to its ``main`` with unpickling already disabled."""
    probe = ("import sys, types; import common.cli as cli; from common import pickle_guard as g\n"
             "m = types.ModuleType('probe'); m.main = lambda argv: print(cli.sys.argv[0] and g.is_pickle_disabled())"
             " or 0\n"
             "sys.modules['probe'] = m\n"
             "for name in sorted(cli.SUBCOMMANDS):\n"
             "    cli.SUBCOMMANDS[name] = ('probe', '')\n"
             "    print(name, end=' '); cli.main([name]); g.enable_pickle_for_tests()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split() for line in done.stdout.splitlines())
    assert set(seen) == set(SUBCOMMANDS)
    assert {name for name, disabled in seen.items() if disabled == "True"} == PICKLE_FREE_COMMANDS
    assert {"supervisor", "generate", "batch", "status", "health"} <= PICKLE_FREE_COMMANDS
    # `worker` starts ranks whose start-up handshake unpickles; its rank 0 disables pickle after that.
    assert "worker" not in PICKLE_FREE_COMMANDS


def test_the_supervisor_process_unpickles_nothing_and_survives_unreadable_jobs(redis_url: str, tmp_path: Path) -> None:
    conn = redis.Redis.from_url(redis_url)
    marker = tmp_path / "unpickled"
    started = StartedJobRegistry(keys.BATCH_QUEUE, connection=conn, serializer=JSONSerializer)
    plant_pickled_job(conn, "pickled-1", marker, status="started", exc_info=False)
    corrupt = Job.create(GENERATE_FUNC, kwargs={}, id="corrupt-1", connection=conn, serializer=JSONSerializer,
                         origin=keys.BATCH_QUEUE)
    conn.hset(corrupt.key, mapping={**corrupt.to_dict(), "status": "started", "created_at": b"\x00not a date"})
    conn.zadd(started.key, {"pickled-1:exec-1": 1, "corrupt-1:exec-2": 1})  # abandoned long ago
    env = {**os.environ, "TPQ_REDIS_URL": redis_url, "TPQ_NUM_SHARDS": "16"}
    done = subprocess.run([sys.executable, "-m", "common.cli", "supervisor", "--once"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "the supervisor unpickled a payload from Redis"
    assert conn.zcard(started.key) == 0  # both handled: rq failed the readable one, the supervisor the corrupt one
    assert conn.hget("rq:job:pickled-1", "status") == b"failed"
    assert conn.hget("rq:job:corrupt-1", "status") == b"failed"
    failed = FailedJobRegistry(keys.BATCH_QUEUE, connection=conn, serializer=JSONSerializer)
    assert "corrupt-1" in failed.get_job_ids()
    with Client(redis_url) as client:
        handle = client.submit(prompt="x", request_id="corrupt-1")  # an existing id: its handle, nothing enqueued
        with pytest.raises(JobFailed, match="the job cannot be read"):
            handle.result(timeout=1)  # a client waiting on it gets the reason, not a hang


def test_the_client_library_unpickles_nothing_even_with_pickle_enabled(redis_url: str, tmp_path: Path) -> None:
    """A plain Python program using ``producer.Client`` (no guard installed) meets pickled jobs, results, events."""
    conn = redis.Redis.from_url(redis_url)
    marker = tmp_path / "unpickled"
    plant_pickled_job(conn, "pickled-q", marker)
    conn.rpush(keys.rq_queue_key(keys.BATCH_QUEUE), "pickled-q")
    plant_pickled_job(conn, "pickled-done", marker, status="finished")
    conn.xadd(keys.rq_result_key("pickled-done"), {"type": "1", "created_at": "2026-01-01T00:00:00.000000Z",
                                                     "return_value": base64.b64encode(pickled(marker))})
    plant_pickled_job(conn, "pickled-failed", marker, status="failed")
    conn.xadd(keys.rq_result_key("pickled-failed"), {"type": "2", "created_at": "2026-01-01T00:00:00.000000Z",
                                                       "return_value": base64.b64encode(pickled(marker))})
    conn.xadd(keys.token_log("pickled-done"), {"m": pickled(marker)}, id="0-1")
    errors: list[BaseException] = []

    def expect_clear_error(call) -> None:
        try:
            call()
        except TpqError as exc:
            errors.append(exc)

    with Client(redis_url) as client:
        for job_id in ("pickled-q", "pickled-done", "pickled-failed"):
            with pytest.raises(InvalidRequestError, match="no readable tpqueue request"):
                client.job(job_id)
        handles = [client.submit(prompt="x", request_id=job_id) for job_id in ("pickled-q", "pickled-done",
                                                                              "pickled-failed")]
        assert [h.created for h in handles] == [False, False, False]  # existing ids: nothing enqueued
        batch = client.submit_batch([{"prompt": "y", "request_id": "pickled-done"}, {"prompt": "z"}])
        for handle in handles:
            handle.status()
            expect_clear_error(lambda: handle.result(timeout=0.5))
        expect_clear_error(lambda: list(handles[1].stream(timeout=0.5)))
        BatchHandle(handles).progress()
        expect_clear_error(lambda: BatchHandle(handles[1:]).wait(timeout=1))
        expect_clear_error(handles[0].cancel)
        batch.progress()

    async def asynchronous() -> None:
        async with AsyncClient(redis_url) as client:
            with pytest.raises(InvalidRequestError):
                await client.job("pickled-done")
            handle = await client.submit(prompt="x", request_id="pickled-done")
            try:
                await handle.result(timeout=0.5)
            except TpqError as exc:
                errors.append(exc)

    asyncio.run(asynchronous())
    assert not marker.exists(), "the client library unpickled a payload from Redis"
    assert errors, "reading the pickled results should have failed clearly"
