"""Fault injection against the real stack: every job reaches a terminal state and every stream stays exact.

Each test runs the supervisor and worker-group processes on the test
redis-server (AOF on) with a tiny random Llama, injects one fault while
tokens stream, and asserts that every submitted job finishes, that every
finished job's stream equals its result with no gap or duplicate, and that
the stack is healthy again afterwards.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import redis
from rq import Worker

from common import keys
from common.errors import JobCancelled
from common.groups import read_groups, read_heartbeats, read_shard_map
from common.results import FinishReason
from producer import Client, JobState
from tests.pipeline_checks import RESULT_TIMEOUT_S, assert_streams_match_results, collect, log_tail, wait_until

pytestmark = pytest.mark.slow

MAX_TOKENS = 300
MID_STREAM = 10  # tokens every stream has logged when a fault is injected: each job is running, far from its end


@pytest.fixture(scope="module")
def tiny_llama_tp23_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama whose 6 query and 6 KV heads split evenly over 2 and over 3 ranks."""
    from tests.checkpoints import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tp23"), hidden_size=96, num_heads=6, num_kv_heads=6)


def submit_long_jobs(client: Client, count: int, prefix: str = "job") -> list:
    """Jobs that generate MAX_TOKENS tokens each (EOS ignored), spread over sessions."""
    return [client.submit(prompt=f"{prefix} {i} tells a long story", session_id=f"{prefix}-{i}",
                          temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True) for i in range(count)]


def wait_for_tokens(conn: redis.Redis, handles, at_least: int = 0, *, each: int = 0, timeout_s: float = 120.0) -> None:
    """Wait until the logs of ``handles`` hold ``at_least`` tokens together and ``each`` tokens every one.

    With ``each``, a log that ends first fails the wait: that job would not be
    running when the caller injects its fault.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if each:
            counts = unfinished_streams(conn, handles, f"before every stream had {each} tokens")
        else:
            counts = {h.id: log_tail(conn, h.id)[0] for h in handles}
        if sum(counts.values()) >= at_least and min(counts.values()) >= each:
            return
        assert time.monotonic() < deadline, (
            f"{sorted(counts.values())} tokens streamed in {timeout_s:.0f} s (wanted {at_least} together, {each} each)")
        time.sleep(0.02)


def unfinished_streams(conn: redis.Redis, handles, when: str = "") -> dict[str, int]:
    """Tokens logged by each job, asserting that none of the logs has ended: every job is still running."""
    tails = {h.id: log_tail(conn, h.id) for h in handles}
    ended = {job_id: (n, end.finish_reason) for job_id, (n, end) in tails.items() if end is not None}
    assert ended == {}, f"streams ended{' ' + when if when else ''}: {ended}"
    return {job_id: n for job_id, (n, _) in tails.items()}


def streams_in_background(handles) -> tuple[threading.Thread, dict]:
    """Read every stream and result in a background thread while the test injects a fault."""
    box: dict = {}

    def run() -> None:
        try:
            box["outcomes"] = collect(handles)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def finish(thread: threading.Thread, box: dict) -> dict:
    thread.join(RESULT_TIMEOUT_S + 30)
    assert not thread.is_alive(), "streams did not finish"
    if "error" in box:
        raise box["error"]
    return box["outcomes"]


def rank_pid(conn: redis.Redis, group: str, rank: int) -> tuple[int, str]:
    [beat] = [b for b in read_heartbeats(conn, group) if b.rank == rank]
    return beat.pid, beat.incarnation


def assert_all_complete(outcomes: dict, expected_tokens: int = MAX_TOKENS) -> None:
    assert_streams_match_results(outcomes)
    assert all(r.usage.generated_tokens == expected_tokens for _, r in outcomes.values())


def current_incarnation(conn: redis.Redis, group: str) -> str:
    return json.loads(conn.hget(keys.group_info(group), "incarnation"))


@pytest.mark.parametrize(("tp", "rank"), [(2, 1), (2, 0), (3, 1)], ids=["rank-1-of-2", "rank-0-of-2", "rank-1-of-3"])
def test_kill_9_of_a_rank_mid_decode_resumes_every_stream(start_stack, redis_url, tiny_llama_tp23_dir, tp, rank):
    """A non-zero rank: rank 0 sees the collective fail and retries its jobs (at tp=3, rank 2 outlives the
    killed rank and must go too); rank 0: the supervisor or rq's cleanup requeues them. Either way the launcher
    restarts the group and every job, killed mid-decode, resumes from its log exactly once."""
    stack = start_stack(groups=1, tp=tp, model=str(tiny_llama_tp23_dir))
    conn = redis.Redis.from_url(redis_url)
    with Client(redis_url) as client:
        handles = submit_long_jobs(client, 6)
        thread, box = streams_in_background(handles)
        wait_for_tokens(conn, handles, each=MID_STREAM)
        pid, incarnation = rank_pid(conn, "g0", rank)
        os.kill(pid, signal.SIGKILL)
        at_kill = unfinished_streams(conn, handles)  # read after the kill: no log had ended at the kill either
        outcomes = finish(thread, box)
    assert min(at_kill.values()) >= MID_STREAM
    assert_all_complete(outcomes)
    attempts = {job_id: result.attempt for job_id, (_, result) in outcomes.items()}
    assert set(attempts.values()) == {2}, f"every job ran at the kill and should have resumed once: {attempts}"
    assert current_incarnation(conn, "g0") != incarnation
    stack.wait_ready(timeout_s=60)


def test_a_hung_rank_is_detected_and_the_group_restarted(start_stack, redis_url, tiny_llama_dir):
    stack = start_stack(groups=1, tp=2, model=str(tiny_llama_dir))
    conn = redis.Redis.from_url(redis_url)
    with Client(redis_url) as client:
        handles = submit_long_jobs(client, 4)
        thread, box = streams_in_background(handles)
        wait_for_tokens(conn, handles, each=MID_STREAM)
        pid, incarnation = rank_pid(conn, "g0", 1)
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        unfinished_streams(conn, handles, "at the stop")  # read after the stop: every job was running
        try:
            while current_incarnation(conn, "g0") == incarnation:
                assert time.monotonic() - stopped_at < 30, "the hung group was not restarted within 30 s"
                time.sleep(0.1)
            restarted_after = time.monotonic() - stopped_at
        finally:
            try:
                os.kill(pid, signal.SIGKILL)  # the launcher should have killed it already
            except ProcessLookupError:
                pass
        outcomes = finish(thread, box)
    assert_all_complete(outcomes)
    assert restarted_after < 30
    stack.wait_ready(timeout_s=60)


def test_supervisor_killed_and_restarted_recovers_without_owning_a_shard_twice(start_stack, redis_url,
                                                                                tiny_llama_dir):
    stack = start_stack(groups=2, tp=1, model=str(tiny_llama_dir))
    conn = redis.Redis.from_url(redis_url)
    epoch_before, map_before = read_shard_map(conn)
    seen_overlap: list[str] = []
    stop_watch = threading.Event()

    def watch_listeners() -> None:  # no shard queue may be listened to by two live groups at once
        while not stop_watch.is_set():
            listening: dict[str, str] = {}
            for worker in Worker.all(connection=conn):
                for name in worker.queue_names():
                    if name.startswith(keys.SHARD_QUEUE_PREFIX) and listening.setdefault(name, worker.name) != worker.name:
                        seen_overlap.append(f"{name}: {listening[name]} and {worker.name}")
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_listeners, daemon=True)
    watcher.start()
    with Client(redis_url) as client:
        handles = submit_long_jobs(client, 6)
        thread, box = streams_in_background(handles)
        wait_for_tokens(conn, handles, 30)
        old_pid = stack.supervisor.pid
        stack.supervisor.kill()
        deadline = time.monotonic() + 30
        while stack.supervisor.pid == old_pid or stack.supervisor.poll() is not None:
            assert time.monotonic() < deadline, "the supervisor was not restarted"
            time.sleep(0.1)
        more = submit_long_jobs(client, 4, prefix="after")
        outcomes = finish(thread, box)
        outcomes.update(collect(more))
    stop_watch.set()
    watcher.join(5)
    assert_all_complete(outcomes)
    assert seen_overlap == []
    epoch_after, map_after = read_shard_map(conn)
    assert map_after == map_before and epoch_after >= epoch_before  # the same live groups: nothing moved
    assert set(read_groups(conn)) == {"g0", "g1"}


def test_redis_restarted_while_tokens_stream(start_stack, redis_server, redis_url, tiny_llama_dir):
    stack = start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    conn = redis.Redis.from_url(redis_url)
    with Client(redis_url) as client:
        handles = submit_long_jobs(client, 4)
        queued = [client.submit(prompt=f"queued {i}", temperature=0, max_tokens=20) for i in range(4)]
        thread, box = streams_in_background(handles + queued)
        wait_for_tokens(conn, handles, each=MID_STREAM)  # seen: every long job is mid-stream at the restart
        redis_server.restart()  # SIGTERM: Redis writes its AOF and exits; then it starts again on the same port
        outcomes = finish(thread, box)
    assert_streams_match_results(outcomes)
    assert all(outcomes[h.id][1].usage.generated_tokens == MAX_TOKENS for h in handles)
    assert all(outcomes[h.id][1].usage.generated_tokens == 20 for h in queued)
    stack.wait_ready(timeout_s=60)


def test_a_client_dropped_mid_stream_resumes_at_the_next_index(start_stack, redis_url, tiny_llama_dir):
    start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    conn = redis.Redis.from_url(redis_url)
    with Client(redis_url) as client:
        [handle] = submit_long_jobs(client, 1)
        stream = handle.stream(timeout=RESULT_TIMEOUT_S)
        events = [next(stream) for _ in range(10)]
        killed = conn.client_kill_filter(_type="pubsub")  # the stream's subscription connection
        events += list(stream)
        result = handle.result(timeout=RESULT_TIMEOUT_S)
    assert killed >= 1
    assert_streams_match_results({handle.id: (events, result)})


def test_the_same_request_id_twice_runs_once(start_stack, redis_url, tiny_llama_dir):
    start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    with Client(redis_url) as first, Client(redis_url) as second:
        a = first.submit(prompt="once only", session_id="dup", request_id="dup-1", temperature=0, max_tokens=40)
        b = second.submit(prompt="once only", session_id="dup", request_id="dup-1", temperature=0, max_tokens=40)
        assert (a.created, b.created) == (True, False)
        ra, rb = a.result(timeout=RESULT_TIMEOUT_S), b.result(timeout=RESULT_TIMEOUT_S)
    assert ra == rb and ra.attempt == 1


def past_its_deadline_mid_stream(client: Client, conn: redis.Redis, window_s: float, sampling: dict) -> tuple:
    """A job whose deadline passed while it streamed, seen so: ``(its handle, the tries that missed)``.

    A job is submitted with a deadline ``window_s`` away. It must be seen
    streaming before its deadline, and its log must not have ended at the
    deadline except by the deadline itself. A try whose deadline came before
    its first token is repeated with the window doubled; one that finished
    before its deadline, with the window halved: the window follows this
    machine's speed instead of assuming one.
    """
    missed = []
    for _ in range(8):
        late_at = time.time() + window_s
        handle = client.submit(prompt=f"late while running {len(missed)}", deadline_unix_s=late_at, **sampling)
        wait_until(lambda: log_tail(conn, handle.id)[0] > 0 or time.time() >= late_at, window_s + 5,
                   "the late job's first token or its deadline")
        streamed, end = log_tail(conn, handle.id)
        seen_running = time.time() < late_at and streamed > 0 and end is None
        wait_until(lambda: time.time() > late_at or log_tail(conn, handle.id)[1] is not None, window_s + 5,
                   "the late job's deadline or its end")
        _, end = log_tail(conn, handle.id)  # read after the deadline or the end, whichever came first
        if seen_running and (end is None or end.finish_reason == FinishReason.DEADLINE):
            return handle, missed
        missed.append(handle)
        window_s = window_s * 2 if not seen_running else window_s / 2
        wait_until(lambda: log_tail(conn, handle.id)[1] is not None, 60, "the missed try to end")
    pytest.fail(f"no deadline fell mid-stream in {len(missed)} tries (last window {window_s:.2f} s)")


def test_cancel_and_deadline_while_queued_and_while_running(start_stack, redis_url, tiny_llama_dir):
    """Every precondition is observed: the queued jobs wait behind three running ones (none of whose logs has
    ended) past their cancel or deadline; the late running job streams before its deadline and has not
    finished when it passes."""
    long = {"max_tokens": 480, "ignore_eos": True, "temperature": 0}  # about the tiny model's whole context
    stack = start_stack(groups=1, tp=1, model=str(tiny_llama_dir), extra=["--max-num-seqs", "3"])
    conn = redis.Redis.from_url(redis_url)
    with Client(redis_url) as client:
        submitted_at = time.monotonic()
        busy = [client.submit(prompt=f"busy {i}", session_id=f"busy-{i}", **long) for i in range(3)]
        wait_for_tokens(conn, busy, each=1)  # all three engine slots are taken
        first_token_s = time.monotonic() - submitted_at

        queued_cancel = client.submit(prompt="cancelled while queued", max_tokens=10)
        late_at = time.time() + 0.05
        queued_late = client.submit(prompt="late while queued", max_tokens=10, deadline_unix_s=late_at)
        wait_until(lambda: time.time() > late_at, 5, "the queued job's deadline")
        assert (queued_cancel.status(), queued_late.status()) == (JobState.QUEUED, JobState.QUEUED)
        assert queued_cancel.cancel() is True
        unfinished_streams(conn, busy, "while jobs were queued behind them")  # no slot was free up to here
        assert busy[0].cancel() is True  # running: frees a slot, so queued_late is admitted after its deadline
        with pytest.raises(JobCancelled):
            queued_cancel.result(timeout=30)
        late_result = queued_late.result(timeout=RESULT_TIMEOUT_S)
        wait_until(lambda: log_tail(conn, busy[0].id)[1] is not None, 60, "the cancelled job to end")

        late_running, missed = past_its_deadline_mid_stream(client, conn, 3 * first_token_s, long)
        outcomes = collect([busy[0], late_running, *missed])
        rest = collect(busy[1:])
    assert_streams_match_results({**outcomes, **rest})
    cancelled = outcomes[busy[0].id][1]
    assert cancelled.finish_reason == FinishReason.CANCELLED and 0 < cancelled.usage.generated_tokens < 480
    late = outcomes[late_running.id][1]
    assert late.finish_reason == FinishReason.DEADLINE and 0 < late.usage.generated_tokens < 480
    assert all(outcomes[h.id][1].finish_reason in (FinishReason.DEADLINE, FinishReason.LENGTH) for h in missed)
    assert late_result.finish_reason == FinishReason.DEADLINE and late_result.token_ids == []
    assert all(rest[h.id][1].usage.generated_tokens == 480 for h in busy[1:])
    assert stack.workers["g0"].poll() is None
