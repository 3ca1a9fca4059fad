"""gpu_worker.serve.batch_worker.BatchWorker against a real redis-server: rq's own registries tell the truth."""
from __future__ import annotations

import redis
import pytest
from rq import Queue, Retry, Worker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from common import claims, keys
from common.claims import return_claimed
from common.jobs import GENERATE_FUNC
from gpu_worker.serve.batch_worker import BatchWorker, ClaimRefused

QUEUE = keys.shard_queue_name(3)


@pytest.fixture
def conn(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def enqueue(conn, job_id: str, queue_name: str = QUEUE) -> Job:
    queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
    return queue.enqueue_call(GENERATE_FUNC, kwargs={"request": {}}, job_id=job_id,
                              retry=Retry(max=2, enqueue_at_front=True), failure_ttl=3600)


def queued(conn, queue_name: str = QUEUE) -> list[str]:
    return [i.decode() for i in conn.lrange(keys.rq_queue_key(queue_name), 0, -1)]


def worker(conn, incarnation: str = "inc1") -> BatchWorker:
    w = BatchWorker(conn, "g0", incarnation, [QUEUE, keys.BATCH_QUEUE], job_ttl_s=5)
    w.register()
    return w


def test_claim_takes_urgent_queues_first_and_records_claims(conn):
    for i in range(3):
        enqueue(conn, f"b{i}", keys.BATCH_QUEUE)
    enqueue(conn, "s0")
    w = worker(conn)
    claimed = w.claim([QUEUE, keys.BATCH_QUEUE], limit=2)
    assert [(c.job_id, c.queue.name) for c in claimed] == [("s0", QUEUE), ("b0", keys.BATCH_QUEUE)]
    assert [c.job.id for c in claimed] == ["s0", "b0"]
    assert conn.lrange(keys.claimed_jobs("g0"), 0, -1) == [b"s0", b"b0"]
    assert queued(conn, keys.BATCH_QUEUE) == ["b1", "b2"]


def test_a_claimed_id_whose_job_key_is_not_a_hash_is_unreadable_and_the_others_are_fetched(conn):
    """One job's hash is read in the same pipeline as the others: its WRONGTYPE must fail that job alone."""
    enqueue(conn, "good0")
    conn.rpush(keys.rq_queue_key(QUEUE), "bad")
    conn.set(keys.rq_job_key("bad"), "not a hash")
    enqueue(conn, "good1")
    w = worker(conn)
    claimed = w.claim([QUEUE], limit=3)
    assert [c.job_id for c in claimed] == ["good0", "bad", "good1"]
    assert [c.job is None for c in claimed] == [False, True, False]
    assert "WRONGTYPE" in claimed[1].error


def test_a_job_that_a_crashed_redis_lost_after_the_claim_is_written_whole_when_it_starts(conn):
    """Single fields written into the lost hash would leave a stub no one can read ('Unexpected job format')."""
    enqueue(conn, "lost")
    w = worker(conn)
    [item] = w.claim([QUEUE], 4)
    conn.delete(keys.rq_job_key("lost"))
    w.start(item.job, item.queue)
    job = Job.fetch("lost", connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STARTED and job.func_name == item.job.func_name
    assert job.kwargs == item.job.kwargs and job.worker_name == w.name


def test_start_succeed_shows_in_rqs_registries_and_counts(conn):
    enqueue(conn, "j1")
    w = worker(conn)
    [item] = w.claim([QUEUE], 4)
    started = w.start(item.job, item.queue, logged=7)
    assert started.attempt == 1
    assert conn.hget(keys.rq_job_key("j1"), keys.JOB_LOGGED_AT_START_FIELD) == b"7"  # for the progress check
    assert conn.llen(keys.claimed_jobs("g0")) == 0
    assert StartedJobRegistry(QUEUE, connection=conn).get_job_ids() == ["j1"]
    assert Job.fetch("j1", connection=conn, serializer=JSONSerializer).get_status() == JobStatus.STARTED
    w.keep_alive()
    w.succeed("j1", {"answer": 42})
    job = Job.fetch("j1", connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED and job.latest_result().return_value == {"answer": 42}
    assert FinishedJobRegistry(QUEUE, connection=conn).get_job_ids() == ["j1"]
    assert StartedJobRegistry(QUEUE, connection=conn).get_job_ids() == []
    [rq_worker] = [x for x in Worker.all(connection=conn) if x.name == w.name]
    assert rq_worker.successful_job_count == 1


def test_fail_without_retry_is_final_and_with_retry_goes_to_the_front(conn):
    enqueue(conn, "bad")
    enqueue(conn, "flaky")
    enqueue(conn, "other")
    w = worker(conn)
    bad, flaky = w.claim([QUEUE], 2)
    w.fail(bad.job, bad.queue, "ValueError: a bad request", retry=False)
    started = w.start(flaky.job, flaky.queue)
    w.fail(started.job, started.queue, "the group failed", retry=True)
    assert Job.fetch("bad", connection=conn, serializer=JSONSerializer).get_status() == JobStatus.FAILED
    assert "a bad request" in Job.fetch("bad", connection=conn, serializer=JSONSerializer).latest_result().exc_string
    assert FailedJobRegistry(QUEUE, connection=conn).get_job_ids() == ["bad"]
    assert queued(conn) == ["flaky", "other"]
    assert Job.fetch("flaky", connection=conn, serializer=JSONSerializer).retries_left == 1


def test_requeue_on_a_clean_stop_keeps_the_retries(conn):
    enqueue(conn, "r1")
    enqueue(conn, "r2")
    w = worker(conn)
    [item] = w.claim([QUEUE], 1)
    w.start(item.job, item.queue)
    w.requeue("r1")
    job = Job.fetch("r1", connection=conn, serializer=JSONSerializer)
    assert queued(conn) == ["r1", "r2"]
    assert job.get_status() == JobStatus.QUEUED and job.retries_left == 2
    assert StartedJobRegistry(QUEUE, connection=conn).get_job_ids() == []
    [again] = worker(conn, "inc2").claim([QUEUE], 1)
    assert again.job_id == "r1"


def test_a_restarted_group_returns_what_its_predecessor_claimed(conn):
    for i in range(3):
        enqueue(conn, f"c{i}")
    worker(conn, "old").claim([QUEUE], 2)  # then the process died before starting them
    assert queued(conn) == ["c2"]
    assert return_claimed(conn, "g0") == 2
    assert queued(conn) == ["c0", "c1", "c2"]
    assert conn.llen(keys.claimed_jobs("g0")) == 0


def test_returning_claims_drops_ids_with_no_job_and_ids_that_are_no_job_id(conn):
    enqueue(conn, "kept")
    enqueue(conn, "gone")
    worker(conn, "old").claim([QUEUE], 2)
    conn.delete(keys.rq_job_key("gone"))
    conn.rpush(keys.claimed_jobs("g0"), b"\xff not an id", "no:colons")
    assert return_claimed(conn, "g0") == 1
    assert queued(conn) == ["kept"] and conn.llen(keys.claimed_jobs("g0")) == 0


def test_the_supervisor_returns_claims_only_while_the_incarnation_is_the_fenced_one(conn):
    from common.groups import fence

    enqueue(conn, "x")
    worker(conn, "old").claim([QUEUE], 1)
    assert return_claimed(conn, "g0", fenced_incarnation="old") == 0  # not fenced: its group may start it
    assert conn.lrange(keys.claimed_jobs("g0"), 0, -1) == [b"x"] and queued(conn) == []
    fence(conn, "g0", "old")
    assert return_claimed(conn, "g0", fenced_incarnation="old") == 1
    assert queued(conn) == ["x"] and conn.llen(keys.claimed_jobs("g0")) == 0


def test_an_id_started_while_its_claim_is_being_returned_is_not_pushed_back(conn, monkeypatch):
    """The ids and their queues are read before the script runs; the script returns only ids still claimed."""
    for job_id in ("a", "b"):
        enqueue(conn, job_id)
    w = worker(conn)
    a, _b = w.claim([QUEUE], 2)
    read_origins = claims.job_origins

    def origins_then_a_starts(*args):
        origins = read_origins(*args)
        w.start(a.job, a.queue)  # between the reads and the script
        return origins

    monkeypatch.setattr(claims, "job_origins", origins_then_a_starts)
    assert return_claimed(conn, "g0") == 1
    assert queued(conn) == ["b"]  # a is started, not queued as well
    assert StartedJobRegistry(QUEUE, connection=conn).get_job_ids() == ["a"]


def test_a_fenced_or_replaced_incarnation_takes_no_job(conn):
    import time

    from common.groups import GroupInfo, fence, register_group

    enqueue(conn, "f1")

    def register(incarnation: str) -> None:
        register_group(conn, GroupInfo(group="g0", incarnation=incarnation, tp=1, model="m", host="h", pid=1,
                                       worker_name=f"tpq-g0-{incarnation}", started_at=time.time()))

    register("inc1")
    w = worker(conn, "inc1")
    fence(conn, "g0", "inc1")
    with pytest.raises(ClaimRefused, match="fenced"):
        w.claim([QUEUE], 4)
    register("inc2")  # the restarted group: inc1 stays refused, inc2 takes the job
    with pytest.raises(ClaimRefused):
        w.claim([QUEUE], 4)
    assert queued(conn) == ["f1"]
    assert [c.job_id for c in worker(conn, "inc2").claim([QUEUE], 4)] == ["f1"]


def started_job(conn, job_id: str):
    enqueue(conn, job_id)
    w = worker(conn)
    [item] = w.claim([QUEUE], 1)
    w.start(item.job, item.queue)
    return w


def assert_still_started_here(conn, w: BatchWorker, job_id: str) -> None:
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STARTED and job.latest_result() is None
    assert FinishedJobRegistry(QUEUE, connection=conn).get_job_ids() == []
    assert StartedJobRegistry(QUEUE, connection=conn).get_job_ids() == [job_id] and job_id in w.started


def test_a_completion_whose_condition_fails_writes_nothing(conn):
    """A short token log at completion time: the job is not finished (the pump requeues it instead)."""
    w = started_job(conn, "short")
    assert w.succeed("short", {"answer": 1}, watch=[keys.token_log("short")], provided=lambda: False) is False
    assert_still_started_here(conn, w, "short")
    w.requeue("short")  # what the pump does next: the job hash holds no result or end time
    job = Job.fetch("short", connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and job.ended_at is None and queued(conn) == ["short"]


def test_a_watched_key_that_changes_after_the_check_makes_the_completion_check_again(conn, redis_url):
    """The log loses its end between the check and the completion (a crash, seen from a second connection)."""
    w = started_job(conn, "cut")
    log_key = keys.token_log("cut")
    conn.xadd(log_key, {"m": "end"}, id="0-1")
    other = redis.Redis.from_url(redis_url)
    checks: list[bool] = []

    def whole_then_lost() -> bool:
        whole = other.xlen(log_key) == 1
        checks.append(whole)
        if whole:
            other.xdel(log_key, "0-1")  # inside the WATCH window, from another connection
        return whole

    assert w.succeed("cut", {"answer": 1}, watch=[log_key], provided=whole_then_lost) is False
    assert checks == [True, False]  # the first check passed; the transaction saw the change and checked again
    assert_still_started_here(conn, w, "cut")
    other.close()


def test_a_completion_whose_condition_holds_finishes_the_job(conn):
    w = started_job(conn, "fine")
    assert w.succeed("fine", {"answer": 2}, watch=[keys.token_log("fine")], provided=lambda: True) is True
    job = Job.fetch("fine", connection=conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED and job.latest_result().return_value == {"answer": 2}
    assert "fine" not in w.started
