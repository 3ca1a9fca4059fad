"""A stock rq SimpleWorker with AllowListedJob and pickle disabled, against a real redis-server.

Hostile jobs are written straight into Redis (a string func is never
imported on enqueue). Each must end FAILED with a clear error, import and
unpickle nothing, and leave the worker processing the next job.
"""
from __future__ import annotations

import logging
import pickle
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Callback, Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.webhook import Webhook

from common import pickle_guard
from common.pickle_guard import UnpicklingDisabled
from gpu_worker.serve import allow_list
from gpu_worker.serve.allow_list import AllowListedJob, ForbiddenJobFunction

ECHO = "tests.integration.test_rq_safety.echo"
QUEUE = "safety"
REFUSED = "refused pickle"  # what common.pickle_guard logs on every unpickling attempt it blocks

echo_calls: list[str] = []
pwned_calls: list[str] = []


def echo(text: str) -> str:
    """The allowed, harmless job function of these tests."""
    echo_calls.append(text)
    return text


def _pwned() -> str:
    pwned_calls.append("unpickled!")
    return "pwned"


class _Pwn:
    """Unpickling this calls :func:`_pwned`, which would show that a pickle payload ran."""

    def __reduce__(self):
        return (_pwned, ())


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def guarded(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Pickle disabled for the test; ``echo`` allowed.

    ``gpu_worker.serve.jobs.generate`` refuses to run outside a worker group, so
    the test extends the allow-list with the harmless ``echo`` above to show
    the worker still runs allowed jobs.
    """
    monkeypatch.setattr(allow_list, "ALLOWED_FUNCS", allow_list.ALLOWED_FUNCS | {ECHO})
    echo_calls.clear()
    pwned_calls.clear()
    caplog.set_level(logging.INFO, logger="gpu_worker.serve.allow_list")
    with pickle_guard.pickle_disabled():
        yield
    assert not pickle_guard.is_pickle_disabled()
    assert pwned_calls == []


def _queue(conn: redis.Redis) -> Queue:
    return Queue(QUEUE, connection=conn, serializer=JSONSerializer)


def _work(conn: redis.Redis, serializer=JSONSerializer) -> None:
    worker = SimpleWorker([QUEUE], connection=conn, serializer=serializer, job_class=AllowListedJob)
    worker.work(burst=True)


def _exc_string(conn: redis.Redis, job_id: str) -> str:
    job = AllowListedJob.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    result = job.latest_result()
    assert result is not None and result.exc_string
    return result.exc_string


def _refusals(caplog: pytest.LogCaptureFixture) -> int:
    return sum(REFUSED in r.getMessage() for r in caplog.records)


def _pickled_job(conn: redis.Redis) -> Job:
    """A job saved with rq's default (pickle) serializer whose data would call _pwned() when unpickled."""
    job = Job.create(ECHO, args=("x",), connection=conn, origin=QUEUE)  # serializer=None: pickle
    job.data = pickle.dumps((ECHO, None, (_Pwn(),), {}))
    job.meta = {"payload": _Pwn()}
    job.save()
    Queue(QUEUE, connection=conn).push_job_id(job.id)
    return job


def _set_data(conn: redis.Redis, job: Job, data: bytes) -> None:
    conn.hset(job.key, "data", data)


def _assert_worker_still_runs(conn: redis.Redis, text: str = "after") -> None:
    job = _queue(conn).enqueue_call(ECHO, args=(text,))
    _work(conn)
    job = AllowListedJob.fetch(job.id, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == text


# ------------------------------------------------------------------ functions


@pytest.mark.parametrize("func_name", ["os.getcwd", "builtins.eval", "subprocess.run", "eval", "this.s"])
def test_forbidden_function_fails_and_worker_goes_on(conn: redis.Redis, func_name: str) -> None:
    imported_this = "this" in sys.modules
    queue = _queue(conn)
    bad = queue.enqueue_call(func_name, args=("1+1",))
    good = queue.enqueue_call(ECHO, args=("hi",))
    _work(conn)

    exc = _exc_string(conn, bad.id)
    assert "ForbiddenJobFunction" in exc and repr(func_name) in exc and ECHO in exc
    assert AllowListedJob.fetch(good.id, connection=conn, serializer=JSONSerializer).return_value() == "hi"
    assert echo_calls == ["hi"]
    assert ("this" in sys.modules) == imported_this  # "this.s" was refused without importing `this`


def test_forbidden_function_never_imports(conn: redis.Redis) -> None:
    bad = _queue(conn).enqueue_call("tests.integration.no_such_module_imported.run")
    job = AllowListedJob.fetch(bad.id, connection=conn, serializer=JSONSerializer)
    with pytest.raises(ForbiddenJobFunction, match="no_such_module_imported.run"):
        job.func
    assert "tests.integration.no_such_module_imported" not in sys.modules


def test_instance_bound_job_is_refused(conn: redis.Redis) -> None:
    bad = _queue(conn).enqueue_call(ECHO, args=("x",))
    _set_data(conn, bad, JSONSerializer.dumps([ECHO, "an instance", ["x"], {}]))
    _work(conn)
    assert "bound to an instance of str" in _exc_string(conn, bad.id)
    assert echo_calls == []
    _assert_worker_still_runs(conn)


# ------------------------------------------------------------------ callbacks


@pytest.mark.parametrize("which", ["on_success", "on_failure", "on_stopped"])
def test_forbidden_callback_fails_the_job_before_it_runs(conn: redis.Redis, which: str) -> None:
    bad = _queue(conn).enqueue_call(ECHO, args=("never",), **{which: Callback("os.getcwd")})
    _work(conn)

    exc = _exc_string(conn, bad.id)
    assert "ForbiddenJobFunction" in exc and "'os.getcwd'" in exc
    assert echo_calls == []  # refused in `func`, before the job body
    _assert_worker_still_runs(conn)


def test_callback_properties_refuse_unless_unset(conn: redis.Redis) -> None:
    queue = _queue(conn)
    bad = queue.enqueue_call(
        ECHO, args=("x",),
        on_success=Callback("subprocess.run"), on_failure=Callback("builtins.eval"), on_stopped=Callback("os.system"),
    )
    job = AllowListedJob.fetch(bad.id, connection=conn, serializer=JSONSerializer)
    for prop, name in [("success_callback", "subprocess.run"), ("failure_callback", "builtins.eval"),
                       ("stopped_callback", "os.system")]:
        with pytest.raises(ForbiddenJobFunction, match=name.replace(".", r"\.")):
            getattr(job, prop)
    plain = AllowListedJob.fetch(queue.enqueue_call(ECHO, args=("x",)).id, connection=conn, serializer=JSONSerializer)
    assert (plain.success_callback, plain.failure_callback, plain.stopped_callback) == (None, None, None)
    allowed = queue.enqueue_call(ECHO, args=("x",), on_success=Callback(ECHO))
    assert AllowListedJob.fetch(allowed.id, connection=conn, serializer=JSONSerializer).success_callback is echo


def test_abandoned_job_with_forbidden_failure_callback_does_not_stop_maintenance(
    conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _queue(conn).enqueue_call(ECHO, args=("x",), on_failure=Callback("os.getcwd"))
    conn.lpop(_queue(conn).key)  # as if a worker had dequeued it and died
    started = StartedJobRegistry(QUEUE, connection=conn, job_class=AllowListedJob, serializer=JSONSerializer)
    conn.zadd(started.key, {f"{bad.id}:dead-execution": 1})  # expired long ago

    SimpleWorker([QUEUE], connection=conn, serializer=JSONSerializer, job_class=AllowListedJob).clean_registries()

    assert any("not running its failure callback" in r.getMessage() for r in caplog.records)
    assert conn.zcard(started.key) == 0
    _assert_worker_still_runs(conn)


# ------------------------------------------------------------------ undecodable data


def test_pickle_payload_is_never_unpickled_by_a_json_worker(
    conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _pickled_job(conn)
    _work(conn)

    exc = _exc_string(conn, bad.id)
    assert "DeserializationError" in exc and "UnicodeDecodeError" in exc
    assert _refusals(caplog) == 0  # JSONSerializer fails on the bytes; nothing even tries to unpickle
    _assert_worker_still_runs(conn)


def test_pickle_payload_is_refused_even_by_a_pickle_worker(
    conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker misconfigured with rq's default serializer still unpickles nothing."""
    bad = _pickled_job(conn)
    _work(conn, serializer=None)

    exc = _exc_string(conn, bad.id)
    assert "DeserializationError" in exc and "UnpicklingDisabled" in exc  # ours, chained by rq
    assert _refusals(caplog) >= 1  # the data, and the meta (which rq swallows into meta["unserialized"])
    _assert_worker_still_runs(conn)


def test_unpickling_is_disabled_and_restorable() -> None:
    payload = pickle.dumps(_Pwn())
    with pytest.raises(UnpicklingDisabled, match="unpickling is disabled"):
        pickle.loads(payload)
    pickle_guard.disable_pickle()  # idempotent
    pickle_guard.enable_pickle_for_tests()
    assert pickle.loads(pickle.dumps([1, 2])) == [1, 2]
    pickle_guard.disable_pickle()
    with pytest.raises(pickle.UnpicklingError):
        pickle.Unpickler(None)


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe\x00garbage", b"{not json", b'"just a string"', b"[1, 2]", b"null", b""],
    ids=["bytes", "invalid-json", "json-string", "short-list", "null", "empty"],
)
def test_undecodable_data_fails_the_job_and_worker_goes_on(conn: redis.Redis, data: bytes) -> None:
    bad = _queue(conn).enqueue_call(ECHO, args=("never",))
    _set_data(conn, bad, data)
    _work(conn)

    exc = _exc_string(conn, bad.id)
    assert "DeserializationError" in exc or "ForbiddenJobFunction" in exc
    assert echo_calls == []
    _assert_worker_still_runs(conn)


# ------------------------------------------------------------------ webhooks


class _Trap(HTTPServer):
    """Counts the HTTP requests it gets, on a free local port."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.parametrize("job_class", [Job, AllowListedJob], ids=["stock rq job (control)", "AllowListedJob"])
def test_webhooks_in_a_job_hash_are_never_sent(conn: redis.Redis, job_class: type[Job]) -> None:
    """rq 2.12 sends a job's webhooks when it ends: an HTTP request anywhere, for anyone who can write to Redis."""
    trap = _Trap()
    try:
        hooks = [Webhook(f"http://127.0.0.1:{trap.server_address[1]}/{s}", s, method="POST", timeout=2)
                 for s in ("finished", "failed")]
        queue = _queue(conn)
        ok = queue.enqueue_call(ECHO, args=("hooked",), webhooks=hooks)
        bad = queue.enqueue_call(ECHO, webhooks=hooks)  # no argument: TypeError, FAILED
        SimpleWorker([QUEUE], connection=conn, serializer=JSONSerializer, job_class=job_class).work(burst=True)
        assert AllowListedJob.fetch(ok.id, connection=conn, serializer=JSONSerializer).get_status() == "finished"
        assert AllowListedJob.fetch(bad.id, connection=conn, serializer=JSONSerializer).get_status() == "failed"
        expected = ["/finished", "/failed"] if job_class is Job else []
        assert sorted(trap.hits) == sorted(expected)
    finally:
        trap.shutdown()
        trap.server_close()
