"""rq's internals that tpqueue relies on (common/rq_internals.py), pinned against rq itself."""
from __future__ import annotations

import inspect
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import rq
from rq import Queue, SimpleWorker
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Callback, Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import BaseWorker

from common import keys, rq_internals
from common.rq_internals import (
    NoClientList, callback_names, execution_owners, execution_slot, failure_ttl_of, job_origins, listen_on,
    parse_execution_entry, queue_job_success, queue_unreadable_failure, record_failure, set_job_result,
)

QUEUE = "pinned"


def test_rq_is_the_version_these_pins_were_written_for() -> None:
    """An rq upgrade fails here first: check every pin below against the new rq, then move the pin."""
    assert re.fullmatch(r"2\.12\.\d+", rq.__version__), f"rq {rq.__version__}: tpqueue's rq internals are for 2.12"
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"rq==2.12.*"' in pyproject


class PinWorker(NoClientList, SimpleWorker):
    """A stock rq worker with tpqueue's CLIENT LIST override, to pin what rq does with it."""


def make_worker(conn: redis.Redis) -> PinWorker:
    worker = PinWorker([Queue(QUEUE, connection=conn, serializer=JSONSerializer)], connection=conn,
                       serializer=JSONSerializer, name=f"pin-{time.monotonic_ns()}")
    worker.register_birth()
    return worker


def started_job(conn: redis.Redis, worker: PinWorker, job_id: str) -> tuple[Job, Execution]:
    """A job enqueued on QUEUE and started by ``worker`` the way BatchWorker starts one."""
    job = Queue(QUEUE, connection=conn, serializer=JSONSerializer).enqueue_call(
        "tests.unit.test_rq_internals.noop", job_id=job_id, result_ttl=600, failure_ttl=900)
    with execution_slot(worker):
        execution = worker.prepare_execution(job)
        worker.prepare_job_execution(job)
    job.started_at = job.started_at or now()
    return job, execution


def noop() -> None:
    """The job function of these pins (never run)."""


def footprint(conn: redis.Redis, job_id: str) -> dict[str, Any]:
    """Every key that mentions ``job_id`` (the id replaced by ``ID``), with its type, hash fields and whether it expires."""
    found: dict[str, Any] = {}
    for key in sorted(k.decode() for k in conn.keys("*")):
        kind = conn.type(key).decode()
        if job_id in key:
            fields = sorted(f.decode() for f in conn.hkeys(key)) if kind == "hash" else None
            found[key.replace(job_id, "ID")] = (kind, fields, conn.ttl(key) > 0)
        elif kind == "zset" and conn.zscore(key, job_id) is not None:
            found[f"{key} has ID"] = True
    return found


# ------------------------------------------------------------------ the worker's execution slot and job results

def test_base_worker_init_calls_set_ip_address_which_no_client_list_replaces(
    fake_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    monkeypatch.setattr(SimpleWorker, "_set_ip_address", lambda self, conn: asked.append(self.name))
    SimpleWorker([QUEUE], connection=fake_redis, name="stock")
    assert asked == ["stock"]  # rq private: BaseWorker.__init__ looks the address up through it
    monkeypatch.undo()
    listed: list[bool] = []
    monkeypatch.setattr(type(fake_redis), "client_list", lambda self, *a, **k: listed.append(True) or [])
    assert make_worker(fake_redis).ip_address == "unknown" and listed == []


def test_handle_job_success_reads_the_execution_slot_and_the_jobs_result(fake_redis: redis.Redis) -> None:
    worker = make_worker(fake_redis)
    job, execution = started_job(fake_redis, worker, "ok")
    set_job_result(job, {"answer": 42})
    job.ended_at = now()
    with execution_slot(worker, execution):
        worker.handle_job_success(job, Queue(QUEUE, connection=fake_redis), job.started_job_registry)
        assert worker.execution is None  # rq's cleanup_execution empties the slot
    result = Result.fetch_latest(job, serializer=JSONSerializer)
    assert result.return_value == {"answer": 42} and result.execution_id == execution.id
    assert not fake_redis.exists(execution.key)


def test_cleanup_execution_deletes_only_the_execution_in_the_slot(fake_redis: redis.Redis) -> None:
    worker = make_worker(fake_redis)
    job, execution = started_job(fake_redis, worker, "slot")
    with fake_redis.pipeline() as pipe, execution_slot(worker):
        worker.cleanup_execution(job, pipeline=pipe)
        pipe.execute()
    assert fake_redis.exists(execution.key)
    with fake_redis.pipeline() as pipe, execution_slot(worker, execution):
        worker.cleanup_execution(job, pipeline=pipe)
        pipe.execute()
    assert not fake_redis.exists(execution.key) and worker.execution is None


def test_queue_job_success_writes_what_handle_job_success_writes(fake_redis: redis.Redis) -> None:
    worker = make_worker(fake_redis)
    queue = Queue(QUEUE, connection=fake_redis, serializer=JSONSerializer)
    theirs, their_execution = started_job(fake_redis, worker, "theirs")
    ours, our_execution = started_job(fake_redis, worker, "ours")
    for job in (theirs, ours):
        set_job_result(job, {"n": 1})
        job.ended_at = now()
    with execution_slot(worker, their_execution):
        worker.handle_job_success(theirs, queue, theirs.started_job_registry)
    with fake_redis.pipeline() as pipe:
        pipe.watch(ours.dependents_key)
        queue_job_success(worker, ours, queue, our_execution, pipe)
        pipe.execute()
    assert footprint(fake_redis, "ours") == footprint(fake_redis, "theirs")
    assert footprint(fake_redis, "ours")["rq:finished:pinned has ID"]
    for job_id, execution in (("theirs", their_execution), ("ours", our_execution)):
        job = Job.fetch(job_id, connection=fake_redis, serializer=JSONSerializer)
        result = job.latest_result()
        assert job.get_status() == JobStatus.FINISHED and result.return_value == {"n": 1}
        assert result.execution_id == execution.id and fake_redis.ttl(job.key) > 500
    assert int(fake_redis.hget(worker.key, "successful_job_count")) == 2
    assert worker.execution is None


def test_rq_dequeues_from_a_private_copy_of_the_queues(fake_redis: redis.Redis) -> None:
    worker = make_worker(fake_redis)
    assert worker._ordered_queues == worker.queues and worker._ordered_queues is not worker.queues
    assert "self._ordered_queues" in inspect.getsource(BaseWorker.dequeue_job_and_maintain_ttl)
    queues = [Queue(name, connection=fake_redis) for name in ("a", "b")]
    listen_on(worker, queues)
    assert worker.queues == worker._ordered_queues == queues and worker._ordered_queues is not queues


def test_callback_names_are_what_rq_stores(fake_redis: redis.Redis) -> None:
    job = Queue(QUEUE, connection=fake_redis, serializer=JSONSerializer).enqueue_call(
        "tests.unit.test_rq_internals.noop", on_success=Callback("a.ok"), on_failure=Callback("a.bad"))
    fetched = Job.fetch(job.id, connection=fake_redis, serializer=JSONSerializer)
    assert callback_names(fetched) == {"success callback": "a.ok", "failure callback": "a.bad",
                                       "stopped callback": None}


# ------------------------------------------------------------------ rq's Redis layout of queues and registries

def test_a_jobs_origin_field_names_its_queue(fake_redis: redis.Redis) -> None:
    Queue("gen.3", connection=fake_redis, serializer=JSONSerializer).enqueue_call(
        "tests.unit.test_rq_internals.noop", job_id="o1")
    assert fake_redis.hget(keys.rq_job_key("o1"), "origin") == b"gen.3"  # the field job_origins reads
    assert job_origins(fake_redis, ["o1", "missing"]) == ["gen.3", None]


def test_a_started_registry_entry_is_job_id_colon_execution_id(fake_redis: redis.Redis) -> None:
    worker = make_worker(fake_redis)
    job, execution = started_job(fake_redis, worker, "s1")
    [member] = fake_redis.zrange(StartedJobRegistry(QUEUE, connection=fake_redis).key, 0, -1)
    assert member == f"s1:{execution.id}".encode()
    assert parse_execution_entry(member) == ("s1", execution.id)
    assert StartedJobRegistry(QUEUE, connection=fake_redis).get_job_ids() == ["s1"]  # rq reads it the same way


def test_the_worker_of_an_execution_is_in_the_execution_hash_then_the_job_hash(fake_redis: redis.Redis) -> None:
    worker = make_worker(fake_redis)
    job, execution = started_job(fake_redis, worker, "w1")
    enqueued_at = fake_redis.hget(job.key, "enqueued_at").decode()
    assert fake_redis.hget(execution.key, "worker_name") == worker.name.encode()
    assert execution_owners(fake_redis, [("w1", execution.id)]) == [(worker.name, enqueued_at)]
    fake_redis.delete(execution.key)  # expired: rq gives it the registry entry's TTL
    assert execution_owners(fake_redis, [("w1", execution.id)]) == [(worker.name, enqueued_at)]
    fake_redis.hdel(job.key, "worker_name")
    assert execution_owners(fake_redis, [("w1", execution.id), ("gone", "x")]) == [("", enqueued_at), ("", "")]


# ------------------------------------------------------------------ failure writes

def test_record_failure_is_rqs_failure_record(fake_redis: redis.Redis) -> None:
    worker = make_worker(fake_redis)
    job, execution = started_job(fake_redis, worker, "f1")
    with fake_redis.pipeline() as pipe:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        record_failure(job, "AbandonedJobError: gone", pipe, worker_name=worker.name, execution_id=execution.id)
        pipe.execute()
    assert FailedJobRegistry(QUEUE, connection=fake_redis).get_job_ids() == ["f1"]
    result = Job.fetch("f1", connection=fake_redis, serializer=JSONSerializer).latest_result()
    assert result.type == Result.Type.FAILED and result.exc_string == "AbandonedJobError: gone"
    assert result.execution_id == execution.id and result.worker_name == worker.name


def test_the_failure_of_an_unreadable_job_looks_like_rqs_own(fake_redis: redis.Redis) -> None:
    """rq's failure path on a readable claimed job (as BatchWorker.fail runs it), ours on one whose data is garbage."""
    worker = make_worker(fake_redis)
    queue = Queue(QUEUE, connection=fake_redis, serializer=JSONSerializer)
    theirs, ours = (queue.enqueue_call("tests.unit.test_rq_internals.noop", job_id=i, failure_ttl=900)
                    for i in ("theirs", "ours"))
    fake_redis.delete(queue.key)  # both claimed off the queue
    theirs.retries_left = 0
    theirs.started_at = theirs.ended_at = now()
    with execution_slot(worker):
        worker.handle_job_failure(theirs, queue, exc_string="broken")
    fake_redis.hset(ours.key, "data", b"garbage")
    with pytest.raises(DeserializationError):
        Job.fetch("ours", connection=fake_redis, serializer=JSONSerializer).kwargs
    with fake_redis.pipeline() as pipe:
        queue_unreadable_failure(pipe, fake_redis, "ours", QUEUE, "broken", 900, worker.name)
        pipe.execute()
    assert set(footprint(fake_redis, "ours")) == set(footprint(fake_redis, "theirs"))
    failed = FailedJobRegistry(QUEUE, connection=fake_redis)
    assert sorted(failed.get_job_ids()) == ["ours", "theirs"]
    scores = [fake_redis.zscore(failed.key, i) for i in ("ours", "theirs")]
    assert abs(scores[0] - scores[1]) < 5  # both expire a failure TTL from now
    for job_id in ("ours", "theirs"):
        assert fake_redis.hget(keys.rq_job_key(job_id), "status") == b"failed"
        assert 800 < fake_redis.ttl(keys.rq_job_key(job_id)) <= 900
        result = Result.fetch_latest(Job(job_id, connection=fake_redis), serializer=JSONSerializer)
        assert result.type == Result.Type.FAILED and result.exc_string == "broken"
        assert result.worker_name == worker.name


def test_failure_ttl_of_reads_the_jobs_field(fake_redis: redis.Redis) -> None:
    Queue(QUEUE, connection=fake_redis).enqueue_call("tests.unit.test_rq_internals.noop", job_id="t1", failure_ttl=77)
    assert fake_redis.hget(keys.rq_job_key("t1"), "failure_ttl") == b"77"
    assert failure_ttl_of(fake_redis, "t1") == 77
    fake_redis.hset(keys.rq_job_key("t1"), "failure_ttl", "x")
    assert failure_ttl_of(fake_redis, "t1") == failure_ttl_of(fake_redis, "none") == rq_internals.DEFAULT_FAILURE_TTL_S


# ------------------------------------------------------------------ result encoding (read by the client)


def saved_results(conn: redis.Redis, job_id: str, *results: tuple[Result.Type, dict[str, Any]]) -> list[Any]:
    """Write results with rq's own writer (``Result.save``, JSON serializer); the result stream's entries."""
    for type_, fields in results:
        Result(job_id, type_, conn, serializer=JSONSerializer, **fields).save(ttl=60)
    return conn.xrange(keys.rq_result_key(job_id))


def test_read_result_entry_reads_every_type_as_rq_restores_it(fake_redis: redis.Redis) -> None:
    """The fast path for SUCCESSFUL entries (base64 of the serializer's bytes) pins this against rq's writer:
    it is taken (no ``Result.restore``), and every entry reads back as rq's own ``Result.restore`` reads it."""
    value = {"request_id": "r1", "text": "hi", "token_ids": [1, 2], "usage": {"cached": None}}
    entries = saved_results(
        fake_redis, "r1",
        (Result.Type.SUCCESSFUL, {"return_value": value}),
        (Result.Type.FAILED, {"exc_string": "Traceback\n  ...\nValueError: no"}),
        (Result.Type.STOPPED, {}),
        (Result.Type.RETRIED, {"return_value": {"max": 1}}),
        (Result.Type.MAX_RETRIES_EXCEEDED, {}),
    )
    read = [rq_internals.read_result_entry("r1", entry_id, fields) for entry_id, fields in entries]
    restored = [Result.restore("r1", entry_id.decode(), fields, connection=fake_redis, serializer=JSONSerializer)
                for entry_id, fields in entries]
    assert [(e.type, e.return_value, e.exc_string) for e in read] == [
        (r.type, r.return_value, r.exc_string) for r in restored]
    assert read[0] == rq_internals.ResultEntry(Result.Type.SUCCESSFUL, value)

    def no_restore(*args: Any, **kwargs: Any) -> Result:
        raise AssertionError("the SUCCESSFUL fast path fell back to Result.restore: rq's result format changed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Result, "restore", no_restore)
        assert rq_internals.read_result_entry("r1", *entries[0]).return_value == value


def test_read_result_entry_unpickles_nothing(fake_redis: redis.Redis) -> None:
    """An entry written with rq's default serializer (pickle) raises a decode error instead of being unpickled."""
    Result("p1", Result.Type.SUCCESSFUL, fake_redis, return_value={"x": 1}).save(ttl=60)
    Result("p1", Result.Type.FAILED, fake_redis, exc_string="boom").save(ttl=60)
    (ok_id, ok_fields), (failed_id, failed_fields) = fake_redis.xrange(keys.rq_result_key("p1"))
    with pytest.raises(rq_internals.RESULT_DECODE_ERRORS):
        rq_internals.read_result_entry("p1", ok_id, ok_fields)
    assert rq_internals.read_result_entry("p1", failed_id, failed_fields).exc_string == "boom"
    corrupt = {**failed_fields, b"exc_string": b"bm90IHpsaWI="}  # base64 of bytes that are not zlib
    with pytest.raises(rq_internals.RESULT_DECODE_ERRORS):
        rq_internals.read_result_entry("p1", failed_id, corrupt)
