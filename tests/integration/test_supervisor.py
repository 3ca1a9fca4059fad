"""router.supervisor against a real redis-server: groups simulated through their Redis protocol.

A "group" here is what a worker group writes: a GroupInfo registered with
common.groups.register_group and one Heartbeat per rank (common.groups).
Its started jobs are real rq jobs, dequeued and started through a real rq
SimpleWorker named like the group's rq worker, so the supervisor finds them
exactly as it would find a BatchWorker's.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis
from rq import Queue, Retry, SimpleWorker
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp

from common import keys
from common.claims import return_claimed
from common.groups import (GroupInfo, fence, is_fenced, make_heartbeat, new_incarnation, read_shard_map,
                           register_group, unregister_group, write_heartbeat)
from common.heartbeat import HeartbeatSpec, HeartbeatThread
from common.jobs import GENERATE_FUNC
from common.redis_conn import connect
from common.results import TokenEvent
from common.settings import get_settings
from common.token_log import queue_messages, read_log
from gpu_worker.serve.batch_worker import BatchWorker
from router import cli, rq_maintenance
from router.supervisor import Supervisor

SETTINGS = get_settings(heartbeat_interval_s=0.2, heartbeat_ttl_s=0.6, hang_timeout_s=1.0, num_shards=8,
                        job_retries=2)
JOB_FUNC = "tests.integration.test_supervisor.never_runs"  # a string: rq never imports it here


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


def supervisor(conn: redis.Redis, **kwargs) -> Supervisor:
    return Supervisor(conn, SETTINGS, interval_s=kwargs.pop("interval_s", 0.05), **kwargs)


# ------------------------------------------------------------------ simulated groups


def register(conn: redis.Redis, group: str, *, tp: int = 1, started_ago_s: float = 10.0) -> GroupInfo:
    """Register a fresh incarnation of ``group``, as its rank 0 does at start."""
    incarnation = new_incarnation()
    info = GroupInfo(group=group, incarnation=incarnation, tp=tp, model="tiny", host="test", pid=1,
                     worker_name=f"tpq-{group}-{incarnation}", started_at=time.time() - started_ago_s)
    register_group(conn, info)
    return info


def beat(conn: redis.Redis, info: GroupInfo, *, step: int = 0, in_flight: int = 0, ranks: range | None = None,
         ttl_s: float = SETTINGS.heartbeat_ttl_s) -> None:
    """Write the heartbeats of ``info``'s ranks (all by default), with the settings' TTL unless ``ttl_s``."""
    for rank in ranks if ranks is not None else range(info.tp):
        write_heartbeat(conn, make_heartbeat(info.group, rank, info.incarnation, step if rank == 0 else 0,
                                             in_flight if rank == 0 else 0), ttl_s)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rank0_heartbeat(redis_url: str, info: GroupInfo, clock: FakeClock, *, step: Callable[[], int],
                    in_flight: Callable[[], int]) -> HeartbeatThread:
    """Rank 0's real heartbeat thread for ``info`` (not started: the test calls ``beat()``), timed by ``clock``."""
    spec = HeartbeatSpec(redis_url, info.group, info.incarnation, SETTINGS.heartbeat_interval_s,
                         SETTINGS.heartbeat_ttl_s)
    return HeartbeatThread(spec, 0, step=step, in_flight=in_flight, clock=clock)


def live_group(conn: redis.Redis, group: str, *, tp: int = 1) -> GroupInfo:
    info = register(conn, group, tp=tp)
    beat(conn, info)
    return info


def enqueue(conn: redis.Redis, queue_name: str, job_id: str, retries: int = 2) -> Job:
    queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
    return queue.enqueue(JOB_FUNC, job_id=job_id, retry=Retry(max=retries, enqueue_at_front=True),
                         result_ttl=60, failure_ttl=60)


def start_job(conn: redis.Redis, queue_name: str, job_id: str, worker_name: str, *, retries: int = 2,
              worker_class: type[SimpleWorker] = SimpleWorker) -> Job:
    """Enqueue a job, dequeue it and start it with an rq worker called ``worker_name``: a real started job."""
    enqueue(conn, queue_name, job_id, retries)
    return start_queued(conn, queue_name, worker_name, worker_class=worker_class)


def start_queued(conn: redis.Redis, queue_name: str, worker_name: str, *,
                 worker_class: type[SimpleWorker] = SimpleWorker) -> Job:
    """Dequeue the front job of ``queue_name`` and start it as rq worker ``worker_name`` does."""
    queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
    worker = worker_class([queue], connection=conn, name=worker_name, serializer=JSONSerializer)
    job, _ = Queue.dequeue_any([queue], None, connection=conn, serializer=JSONSerializer)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    return job


def queued_ids(conn: redis.Redis, queue_name: str) -> list[str]:
    return Queue(queue_name, connection=conn, serializer=JSONSerializer).get_job_ids()


def fetch(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


def shard_of(conn: redis.Redis, group: str) -> int:
    return min(s for s, g in read_shard_map(conn)[1].items() if g == group)


def wait_gone(conn: redis.Redis, key: str, timeout_s: float = 3.0) -> None:
    """Poll until Redis shows ``key`` expired (asserted within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while conn.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire within {timeout_s:g} s"
        time.sleep(0.01)


def started_scores(conn: redis.Redis, queue_name: str) -> list[float]:
    """The expiry scores (Unix seconds) of ``queue_name``'s started-registry entries."""
    key = StartedJobRegistry(queue_name, connection=conn).key
    return [score for _, score in conn.zrange(key, 0, -1, withscores=True)]


def wait_started_expired(conn: redis.Redis, queue_name: str, timeout_s: float = 5.0) -> None:
    """Poll until every started entry of ``queue_name`` is expired by rq's clock and by Redis TIME (asserted).

    rq scores in whole seconds and its cleanup takes entries scored at or before ``current_timestamp()``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        scores = started_scores(conn, queue_name)
        assert scores, f"no started entry in {queue_name}"
        if max(scores) <= min(current_timestamp(), conn.time()[0]):
            return
        assert time.monotonic() < deadline, f"started entries of {queue_name} did not expire within {timeout_s:g} s"
        time.sleep(0.05)


# ------------------------------------------------------------------ shard map


def test_a_new_group_gets_every_shard(conn: redis.Redis) -> None:
    live_group(conn, "g1")
    result = supervisor(conn).run_once()
    assert result.leader and result.live == ["g1"]
    assert read_shard_map(conn) == (1, {s: "g1" for s in range(8)})


def test_two_groups_split_the_shards_and_a_steady_pass_writes_nothing(conn: redis.Redis) -> None:
    sup = supervisor(conn)
    live_group(conn, "g1")
    sup.run_once()
    live_group(conn, "g2")
    result = sup.run_once()
    epoch, owners = read_shard_map(conn)
    assert epoch == 2 and Counter(owners.values()) == {"g1": 4, "g2": 4}
    assert len(result.moved) == 4 and all(owners[s] == "g2" for s in result.moved)
    assert sup.run_once().epoch is None and read_shard_map(conn)[0] == 2
    assert sup.shard_reassignments == 8 + 4 and sup.shard_map_writes == 2


def test_a_starting_group_gets_a_grace_then_is_declared_dead(conn: redis.Redis) -> None:
    info = register(conn, "g1", tp=2, started_ago_s=0.0)
    now = [info.started_at]
    sup = supervisor(conn, clock=lambda: now[0])
    beat(conn, info, ranks=range(1))  # rank 1 not up yet
    first = sup.run_once()
    assert first.live == [] and first.declared == {} and not is_fenced(conn, "g1", info.incarnation)
    assert read_shard_map(conn)[1] == {}, "a group is given shards only once all its ranks beat"
    now[0] += SETTINGS.heartbeat_ttl_s + 0.01
    second = sup.run_once()
    assert "no heartbeat from rank(s) 1 of 2" in second.declared["g1"]
    assert is_fenced(conn, "g1", info.incarnation)


# ------------------------------------------------------------------ dead and hung groups


def test_a_dead_group_is_fenced_its_shards_move_and_its_jobs_go_to_the_front(conn: redis.Redis) -> None:
    sup = supervisor(conn)
    g1, g2 = live_group(conn, "g1"), live_group(conn, "g2")
    sup.run_once()
    queue_name = keys.shard_queue_name(shard_of(conn, "g1"))
    start_job(conn, queue_name, "victim", g1.worker_name)
    enqueue(conn, queue_name, "bystander")
    beat(conn, g2, ttl_s=60)  # g2 lives on
    beat(conn, g1)  # g1's last heartbeat: then it dies
    before = sup.run_once()
    assert conn.pttl(keys.heartbeat("g1", 0)) > 0, "precondition: that pass saw g1's heartbeat"
    assert before.declared == {}, "not before its heartbeat expired"
    wait_gone(conn, keys.heartbeat("g1", 0))
    result = sup.run_once()
    assert list(result.declared) == ["g1"] and "no heartbeat from rank(s) 0" in result.declared["g1"]
    assert is_fenced(conn, "g1", g1.incarnation) and not is_fenced(conn, "g2", g2.incarnation)
    assert read_shard_map(conn)[1] == {s: "g2" for s in range(8)}
    assert result.requeued == ["victim"] and sup.jobs_requeued == 1 and sup.groups_declared_dead == 1
    assert queued_ids(conn, queue_name) == ["victim", "bystander"]
    victim = fetch(conn, "victim")
    assert victim.get_status() == JobStatus.QUEUED and victim.retries_left == 1
    assert StartedJobRegistry(queue_name, connection=conn).get_job_ids() == []


def test_a_dead_groups_claimed_but_unstarted_jobs_go_back_to_their_queue(conn: redis.Redis) -> None:
    sup = supervisor(conn)
    g1, g2 = live_group(conn, "g1"), live_group(conn, "g2")
    sup.run_once()
    queue_name = keys.shard_queue_name(shard_of(conn, "g1"))
    for job_id in ("claimed-a", "claimed-b", "waiting"):
        enqueue(conn, queue_name, job_id)
    for _ in range(2):  # what BatchWorker.claim does: LMOVE from the queue's front into the claimed list
        conn.lmove(keys.rq_queue_key(queue_name), keys.claimed_jobs("g1"), "LEFT", "RIGHT")
    beat(conn, g2, ttl_s=60)
    wait_gone(conn, keys.heartbeat("g1", 0))  # g1 died after claiming
    assert list(sup.run_once().declared) == ["g1"]
    assert is_fenced(conn, "g1", g1.incarnation)
    assert queued_ids(conn, queue_name) == ["claimed-a", "claimed-b", "waiting"]
    assert conn.llen(keys.claimed_jobs("g1")) == 0
    register(conn, "g1")  # a restarted g1 clears the fence: the supervisor leaves its new claims alone
    conn.lmove(keys.rq_queue_key(queue_name), keys.claimed_jobs("g1"), "LEFT", "RIGHT")
    assert return_claimed(conn, "g1", fenced_incarnation=g1.incarnation) == 0
    assert conn.llen(keys.claimed_jobs("g1")) == 1


def test_a_hung_group_is_fenced_after_the_hang_timeout(conn: redis.Redis, redis_url: str) -> None:
    """Rank 0's heartbeat thread beats on while its decode loop is stuck; the stall it reports makes the group hung.

    The ranks' heartbeat threads run on a fake clock, one heartbeat interval per supervisor pass.
    """
    sup = supervisor(conn)
    hung, busy = live_group(conn, "hung"), live_group(conn, "busy")
    sup.run_once()
    queue_name = keys.shard_queue_name(shard_of(conn, "hung"))
    start_job(conn, queue_name, "stuck", hung.worker_name)  # its rq execution stays fresh (TTL ~90 s)
    clock, busy_steps = FakeClock(), iter(range(1, 1000))
    threads = [rank0_heartbeat(redis_url, hung, clock, step=lambda: 7, in_flight=lambda: 1),
               rank0_heartbeat(redis_url, busy, clock, step=lambda: next(busy_steps), in_flight=lambda: 3)]
    for tick in range(1, 100):
        for thread in threads:
            thread.beat()
        result = sup.run_once()
        if result.declared or clock.now > SETTINGS.hang_timeout_s + 2.0:
            break
        clock.now = tick * SETTINGS.heartbeat_interval_s  # seconds since the hung group's step froze
    for thread in threads:
        thread.stop()
    assert list(result.declared) == ["hung"] and "step stuck at 7" in result.declared["hung"]
    assert clock.now >= SETTINGS.hang_timeout_s, "not before the hang timeout"
    assert clock.now < SETTINGS.hang_timeout_s + SETTINGS.heartbeat_interval_s, "at the first beat past it"
    assert is_fenced(conn, "hung", hung.incarnation) and sup.groups_declared_hung == 1
    assert set(read_shard_map(conn)[1].values()) == {"busy"}
    assert result.requeued == ["stuck"] and queued_ids(conn, queue_name) == ["stuck"]
    assert fetch(conn, "stuck").retries_left == 1


def test_a_restarted_supervisor_declares_a_hang_that_began_before_it(conn: redis.Redis, redis_url: str) -> None:
    """The stall is measured by the group, not by a supervisor's timer: a fresh supervisor loses no hang time."""
    hung = live_group(conn, "hung")
    clock = FakeClock()
    thread = rank0_heartbeat(redis_url, hung, clock, step=lambda: 7, in_flight=lambda: 2)
    thread.beat()  # the step froze here, while the previous supervisor ran
    clock.now = SETTINGS.hang_timeout_s
    thread.beat()
    thread.stop()
    result = supervisor(conn).run_once()  # its first pass
    assert list(result.declared) == ["hung"] and result.declared["hung"].startswith("hung: step stuck at 7")
    assert is_fenced(conn, "hung", hung.incarnation)


def test_a_stale_heartbeat_of_an_older_incarnation_counts_as_missing(conn: redis.Redis) -> None:
    old = live_group(conn, "g1")
    new = register(conn, "g1")  # restarted, but has not beaten yet; the old heartbeat is still there
    assert conn.exists(keys.heartbeat("g1", 0)) and old.incarnation != new.incarnation
    result = supervisor(conn).run_once()
    assert "no heartbeat from rank(s) 0" in result.declared["g1"]
    assert is_fenced(conn, "g1", new.incarnation)


def test_retries_exhausted_means_failed_with_a_clear_reason(conn: redis.Redis) -> None:
    sup = supervisor(conn)
    queue_name = keys.shard_queue_name(0)
    first = register(conn, "g1")
    start_job(conn, queue_name, "doomed", first.worker_name, retries=1)
    assert sup.run_once().requeued == ["doomed"]
    assert fetch(conn, "doomed").retries_left == 0
    second = register(conn, "g1")  # the launcher restarts the group; it takes the job again and dies again
    start_queued(conn, queue_name, second.worker_name)
    result = sup.run_once()
    assert result.failed == ["doomed"] and sup.jobs_failed == 1
    job = fetch(conn, "doomed")
    assert job.get_status() == JobStatus.FAILED
    assert "doomed" in FailedJobRegistry(queue_name, connection=conn).get_job_ids()
    reason = job.latest_result().exc_string
    assert f"worker group g1 (incarnation {second.incarnation}) was declared dead" in reason
    assert "no retries left" in reason and queued_ids(conn, queue_name) == []


def test_a_dead_groups_unreadable_job_ends_failed_with_the_reason(conn: redis.Redis) -> None:
    queue_name = keys.shard_queue_name(4)
    start_job(conn, queue_name, "garbled", "tpq-g1-dead")
    start_job(conn, queue_name, "fine", "tpq-g1-dead")
    conn.hset(keys.rq_job_key("garbled"), "created_at", b"\x00not a date")  # rq can no longer read the hash
    report = rq_maintenance.requeue_worker_jobs(conn, [queue_name], "tpq-g1-dead", "its heartbeats expired")
    assert report.failed == ["garbled"] and report.unreadable == {"garbled"} and report.requeued == ["fine"]
    assert conn.hget(keys.rq_job_key("garbled"), "status") == b"failed"
    assert 0 < conn.ttl(keys.rq_job_key("garbled")) <= 60  # the job's own failure_ttl
    assert "garbled" in FailedJobRegistry(queue_name, connection=conn).get_job_ids()
    assert StartedJobRegistry(queue_name, connection=conn).get_job_ids() == []
    assert queued_ids(conn, queue_name) == ["fine"]
    bare = Job("garbled", connection=conn, serializer=JSONSerializer)  # the Result API reads only its id
    failure = Result.fetch_latest(bare, serializer=JSONSerializer).exc_string
    assert "the job cannot be read (ValueError" in failure and "its heartbeats expired" in failure


def log_tokens(conn: redis.Redis, job_id: str, count: int) -> None:
    """Append ``count`` token events to ``job_id``'s log, after those it holds."""
    start = len(read_log(conn, job_id))
    with conn.pipeline(transaction=False) as pipe:
        queue_messages(pipe, [TokenEvent(request_id=job_id, index=i, token_id=i, text="t")
                              for i in range(start, start + count)], maxlen=1000, ttl_s=60)
        pipe.execute()


@pytest.mark.parametrize("new_tokens", [0, 3])
def test_a_crash_costs_a_retry_only_when_the_attempt_made_no_progress(conn: redis.Redis, new_tokens: int) -> None:
    queue_name = keys.shard_queue_name(5)
    job = start_job(conn, queue_name, "steady", "tpq-g1-dead", retries=1)
    log_tokens(conn, "steady", 4)  # an earlier attempt's tokens
    conn.hset(job.key, keys.JOB_LOGGED_AT_START_FIELD, 4)  # what the worker records when it starts the job
    log_tokens(conn, "steady", new_tokens)  # this attempt's
    report = rq_maintenance.requeue_worker_jobs(conn, [queue_name], "tpq-g1-dead", "its heartbeats expired")
    assert report.requeued == ["steady"] and queued_ids(conn, queue_name) == ["steady"]
    assert fetch(conn, "steady").retries_left == (1 if new_tokens else 0)


def test_entries_stranded_above_a_hole_are_no_progress(conn: redis.Redis) -> None:
    """A crashed Redis lost positions 4-5 under a writer that went on to log 6-7 (a hole no writer filled).

    The next attempt starts at the hole (the gap-free length, 4); crashing before it logs anything costs a retry.
    """
    queue_name = keys.shard_queue_name(7)
    job = start_job(conn, queue_name, "holed", "tpq-g1-dead", retries=1)
    log_tokens(conn, "holed", 4)
    with conn.pipeline(transaction=False) as pipe:
        queue_messages(pipe, [TokenEvent(request_id="holed", index=i, token_id=i, text="t") for i in (6, 7)],
                       maxlen=1000, ttl_s=60)
        pipe.execute()
    conn.hset(job.key, keys.JOB_LOGGED_AT_START_FIELD, 4)
    assert rq_maintenance.requeue_worker_jobs(conn, [queue_name], "tpq-g1-dead", "test").requeued == ["holed"]
    assert fetch(conn, "holed").retries_left == 0


def test_a_job_that_keeps_making_progress_is_requeued_after_its_retries_ran_out(conn: redis.Redis) -> None:
    queue_name = keys.shard_queue_name(6)
    start_job(conn, queue_name, "long", "tpq-g1-a", retries=1)
    for attempt, worker in enumerate(["tpq-g1-a", "tpq-g1-b", "tpq-g1-c"]):
        if attempt:
            start_queued(conn, queue_name, worker)
        conn.hset(keys.rq_job_key("long"), keys.JOB_LOGGED_AT_START_FIELD, 2 * attempt)
        log_tokens(conn, "long", 2)
        assert rq_maintenance.requeue_worker_jobs(conn, [queue_name], worker, "test").requeued == ["long"]
    assert fetch(conn, "long").retries_left == 1  # three crashes, each after progress: no retry used
    start_queued(conn, queue_name, "tpq-g1-d")
    conn.hset(keys.rq_job_key("long"), keys.JOB_LOGGED_AT_START_FIELD, 6)  # the next attempt logs nothing
    assert rq_maintenance.requeue_worker_jobs(conn, [queue_name], "tpq-g1-d", "test").requeued == ["long"]
    start_queued(conn, queue_name, "tpq-g1-e")
    assert rq_maintenance.requeue_worker_jobs(conn, [queue_name], "tpq-g1-e", "test").failed == ["long"]


def test_requeue_is_idempotent_and_leaves_nothing_for_rqs_cleanup(conn: redis.Redis) -> None:
    queue_name = keys.shard_queue_name(1)
    start_job(conn, queue_name, "once", "tpq-g1-abc")
    queues = [queue_name]
    assert rq_maintenance.requeue_worker_jobs(conn, queues, "tpq-g1-abc", "test").requeued == ["once"]
    assert rq_maintenance.requeue_worker_jobs(conn, queues, "tpq-g1-abc", "test").requeued == []
    StartedJobRegistry(queue_name, connection=conn, serializer=JSONSerializer).cleanup(time.time() + 1000)
    assert queued_ids(conn, queue_name) == ["once"] and fetch(conn, "once").retries_left == 1


def test_only_the_named_workers_jobs_are_requeued(conn: redis.Redis) -> None:
    queue_name = keys.shard_queue_name(2)
    start_job(conn, queue_name, "mine", "tpq-dead-1")
    start_job(conn, queue_name, "theirs", "tpq-alive-2")
    report = rq_maintenance.requeue_worker_jobs(conn, [queue_name], "tpq-dead-1", "test")
    assert report.requeued == ["mine"]
    assert StartedJobRegistry(queue_name, connection=conn).get_job_ids() == ["theirs"]


def test_the_worker_name_is_found_after_the_execution_hash_expired(conn: redis.Redis) -> None:
    queue_name = keys.shard_queue_name(3)
    job = start_job(conn, queue_name, "orphan", "tpq-dead-9")
    for execution in job.get_executions():
        conn.delete(execution.key)  # rq gives it the same TTL as the registry entry
    assert rq_maintenance.requeue_worker_jobs(conn, [queue_name], "tpq-dead-9", "test").requeued == ["orphan"]


def test_requeue_works_on_fakeredis_too(fake_redis: redis.Redis) -> None:
    queue_name = keys.BATCH_QUEUE
    start_job(fake_redis, queue_name, "fake", "tpq-g-1")
    enqueue(fake_redis, queue_name, "next")
    assert rq_maintenance.requeue_worker_jobs(fake_redis, [queue_name], "tpq-g-1", "test").requeued == ["fake"]
    assert queued_ids(fake_redis, queue_name) == ["fake", "next"]


# ------------------------------------------------------------------ rq's own cleanups


class ShortTTLWorker(SimpleWorker):
    """A worker whose executions expire two seconds after they start unless refreshed.

    rq scores in whole seconds, so that is at least one whole second after the start.
    """

    def get_heartbeat_ttl(self, job: Job) -> int:
        return 2


def test_an_expired_started_job_is_requeued_by_rqs_cleanup(conn: redis.Redis) -> None:
    queue_name = keys.shard_queue_name(4)
    start_job(conn, queue_name, "expired", "tpq-gone-1", worker_class=ShortTTLWorker)
    sup = supervisor(conn)
    assert sup.run_once().expired == 0
    assert max(started_scores(conn, queue_name)) > current_timestamp(), "precondition: that pass ran before expiry"
    wait_started_expired(conn, queue_name)
    assert sup.run_once().expired == 1 and sup.expired_jobs_cleaned == 1
    assert queued_ids(conn, queue_name) == ["expired"] and fetch(conn, "expired").retries_left == 1


def test_a_job_stuck_in_the_intermediate_queue_is_requeued(conn: redis.Redis) -> None:
    queue_name = keys.shard_queue_name(5)
    queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
    enqueue(conn, queue_name, "limbo")
    Queue.dequeue_any([queue], None, connection=conn, serializer=JSONSerializer)  # LMOVE, then the worker died
    intermediate = IntermediateQueue(queue.key, connection=conn)
    assert intermediate.get_job_ids() == ["limbo"]
    assert rq_maintenance.clean_intermediate_queue(conn, queue_name) == 0  # first seen now
    conn.set(intermediate.get_first_seen_key("limbo"), time.time() - 61)
    assert rq_maintenance.clean_intermediate_queue(conn, queue_name) == 1
    assert intermediate.get_job_ids() == [] and queued_ids(conn, queue_name) == ["limbo"]
    assert fetch(conn, "limbo").retries_left == 1


# ------------------------------------------------------------------ one active supervisor


def test_a_second_supervisor_stands_by_and_takes_over_after_release(conn: redis.Redis) -> None:
    active, standby = supervisor(conn), supervisor(conn)
    live_group(conn, "g1")
    assert active.run_once().leader
    live_group(conn, "g2")
    assert not standby.run_once().leader
    assert set(read_shard_map(conn)[1].values()) == {"g1"}, "a standby writes nothing"
    active.release()
    assert standby.run_once().leader and standby.is_leader
    assert set(read_shard_map(conn)[1].values()) == {"g1", "g2"}
    assert not active.run_once().leader


def test_run_stops_cleanly_and_a_standby_takes_over(conn: redis.Redis) -> None:
    active, standby = supervisor(conn), supervisor(conn)
    stop = threading.Event()
    thread = threading.Thread(target=active.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 2
    while not active.is_leader and time.monotonic() < deadline:
        time.sleep(0.01)
    assert active.is_leader and not standby.run_once().leader
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive() and conn.get(keys.supervisor_lock()) is None
    assert standby.run_once().leader


def test_a_crashed_supervisors_lock_expires_and_the_standby_takes_over(conn: redis.Redis) -> None:
    crashed = supervisor(conn, interval_s=0.05, lock_ttl_s=0.3)
    standby = supervisor(conn, interval_s=0.05, lock_ttl_s=0.3)
    assert crashed.run_once().leader and not standby.run_once().leader
    wait_gone(conn, keys.supervisor_lock())  # the crashed one never renews nor releases
    assert standby.run_once().leader
    assert not crashed.run_once().leader and not crashed.is_leader


def test_a_restarted_supervisor_recovers_from_redis(conn: redis.Redis) -> None:
    g1, g2 = live_group(conn, "g1"), live_group(conn, "g2")
    first = supervisor(conn)
    first.run_once()
    before = read_shard_map(conn)
    queue_name = keys.shard_queue_name(shard_of(conn, "g1"))
    start_job(conn, queue_name, "leftover", g1.worker_name)
    fence(conn, "g1", g1.incarnation)  # the first supervisor fenced g1, then died before moving anything
    conn.delete(keys.supervisor_lock(), keys.heartbeat("g1", 0))
    second = supervisor(conn)
    beat(conn, g2)
    result = second.run_once()
    epoch, owners = read_shard_map(conn)
    assert epoch == before[0] + 1 and owners == {s: "g2" for s in range(8)}
    assert sorted(owners) == list(range(8)), "one owner per shard"
    assert result.requeued == ["leftover"] and queued_ids(conn, queue_name) == ["leftover"]
    assert result.declared == {}, "an incarnation is fenced once"
    third = supervisor(conn)
    conn.delete(keys.supervisor_lock())
    assert third.run_once().epoch is None and read_shard_map(conn) == (epoch, owners)


def test_a_cleanly_stopped_group_loses_its_shards_without_being_fenced(conn: redis.Redis) -> None:
    sup = supervisor(conn)
    g1, _ = live_group(conn, "g1"), live_group(conn, "g2")
    sup.run_once()
    unregister_group(conn, "g1", g1.incarnation, g1.tp)
    result = sup.run_once()
    assert result.declared == {} and set(read_shard_map(conn)[1].values()) == {"g2"}


def test_no_live_group_empties_the_map(conn: redis.Redis) -> None:
    sup = supervisor(conn)
    info = live_group(conn, "g1")
    sup.run_once()
    conn.delete(keys.heartbeat("g1", 0))
    assert sup.run_once().declared and read_shard_map(conn)[1] == {}
    assert is_fenced(conn, "g1", info.incarnation)


# ------------------------------------------------------------------ tpq supervisor


def test_cli_once_runs_one_pass(redis_url: str, conn: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TPQ_REDIS_URL", redis_url)
    monkeypatch.setenv("TPQ_NUM_SHARDS", "8")
    live_group(conn, "g1")
    assert cli.main(["--once"]) == 0
    out = capsys.readouterr().out
    assert "live groups: g1" in out and "shard map written at epoch 1: 8 shard(s) moved" in out
    assert conn.get(keys.supervisor_lock()) is None, "--once releases the lock"


def test_cli_without_a_redis_url_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TPQ_REDIS_URL", raising=False)
    assert cli.main(["--once"]) == 2
    err = capsys.readouterr().err
    assert "TPQ_REDIS_URL is not set" in err and "tpq up" in err


def test_cli_rejects_a_bad_interval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--interval-s", "0"])
    assert exit_info.value.code == 2 and "positive number of seconds" in capsys.readouterr().err


def test_the_real_batch_workers_started_jobs_are_requeued(conn: redis.Redis) -> None:
    """gpu_worker's BatchWorker names its executions after GroupInfo.worker_name: the supervisor finds them."""
    sup = supervisor(conn)
    incarnation = new_incarnation()
    queue_name = keys.shard_queue_name(6)
    worker = BatchWorker(conn, "g1", incarnation, [queue_name], job_ttl_s=60)
    register_group(conn, GroupInfo(group="g1", incarnation=incarnation, tp=1, model="tiny", host="test", pid=1,
                                   worker_name=worker.name, started_at=time.time() - 10))
    Queue(queue_name, connection=conn, serializer=JSONSerializer).enqueue(
        GENERATE_FUNC, job_id="batched", retry=Retry(max=2, enqueue_at_front=True))
    (claimed,) = worker.claim([queue_name], 1)
    worker.start(claimed.job, claimed.queue)
    enqueue(conn, queue_name, "behind")
    result = sup.run_once()  # g1 never beat: dead
    assert result.requeued == ["batched"] and queued_ids(conn, queue_name) == ["batched", "behind"]
    assert fetch(conn, "batched").retries_left == 1



# ------------------------------------------------------------------ Redis restarts


def keep_alive(conn: redis.Redis, queue_name: str) -> None:
    """What rank 0's job pump does every heartbeat interval: push its started jobs' rq expiry forward."""
    key = StartedJobRegistry(queue_name, connection=conn).key
    conn.zadd(key, {member: time.time() + 60 for member in conn.zrange(key, 0, -1)})


def test_after_a_redis_restart_groups_are_judged_only_once_their_heartbeats_could_return(redis_server, conn) -> None:
    """Keys written before a restart expire on the wall clock while Redis is down: a live group's heartbeats
    and its jobs' rq heartbeats are gone when Redis answers again. The supervisor waits one heartbeat TTL
    before it judges groups or hands expired started jobs to rq's cleanup, so nothing live is fenced or requeued.

    The supervisor's grace runs on a fake monotonic clock; what must expire in Redis is waited for and asserted
    (Redis expires keys on the wall clock, so waiting after the restart leaves what a longer outage would)."""
    clock = FakeClock()
    sup = supervisor(conn, monotonic=clock)
    info = live_group(conn, "g0")
    queue_name = keys.shard_queue_name(2)
    start_job(conn, queue_name, "running", info.worker_name, worker_class=ShortTTLWorker)
    assert sup.run_once().live == ["g0"]

    redis_server.stop()
    redis_server.start()
    wait_gone(conn, keys.heartbeat("g0", 0))  # the heartbeat and the job's rq heartbeat ran out meanwhile
    wait_started_expired(conn, queue_name)
    waiting = sup.run_once()
    assert waiting.settling and not waiting.declared and waiting.expired == 0
    assert cli.describe_pass(waiting).startswith("waiting: ")
    beat(conn, info)  # meanwhile the group's ranks and job pump write again
    keep_alive(conn, queue_name)
    clock.now = SETTINGS.heartbeat_ttl_s * 0.99
    assert sup.run_once().settling, "groups judged before a heartbeat TTL had passed"
    clock.now = SETTINGS.heartbeat_ttl_s
    beat(conn, info)
    result = sup.run_once()
    assert not result.settling, "the supervisor did not resume judging groups after a heartbeat TTL"
    assert result.live == ["g0"] and not result.declared and not result.requeued and result.expired == 0
    assert fetch(conn, "running").get_status() == JobStatus.STARTED

    redis_server.stop()  # a group that does not beat again after the grace is dead, as ever
    redis_server.start()
    clock.now = 10.0
    assert sup.run_once().settling
    clock.now += 1.5 * SETTINGS.heartbeat_ttl_s  # past the grace
    wait_gone(conn, keys.heartbeat("g0", 0))
    assert sup.run_once().declared.keys() == {"g0"}
