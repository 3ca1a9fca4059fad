"""producer's consuming side against a real redis-server: stream(), result(), status(), cancel(), batches.

tests/doubles.py's ProtocolWorker plays the worker (rq dequeue, token log + pub/sub
through common.token_log, rq success/failure), so these tests pin the wire
protocol, not a particular worker.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common import keys
from common.errors import InvalidRequestError, JobCancelled, JobFailed, JobNotFound, ResultTimeout
from common.results import FinishReason, JobResult
from common.token_log import read_log
from producer import BatchHandle, Client, JobState, TokenStream

TEXTS = ["Hel", "lo", ",", " wor", "ld", "!"]


def indices(events):
    return [e.index for e in events]


# ------------------------------------------------------------------ stream and result


def test_stream_equals_result_tokens(client, worker):
    handle = client.submit("Say hello", max_tokens=16)
    thread = worker.run_in_thread(TEXTS, delay_s=0.005)
    stream = handle.stream(timeout=5)
    events = list(stream)
    result = handle.result(timeout=5)
    thread.join(5)
    assert not worker.errors
    assert indices(events) == list(range(len(TEXTS)))
    assert [e.text for e in events] == TEXTS
    assert [e.token_id for e in events] == result.token_ids
    assert "".join(e.text for e in events) == result.text == "Hello, world!"
    assert stream.end is not None and stream.end.num_tokens == len(TEXTS)
    assert stream.end.finish_reason == FinishReason.STOP == result.finish_reason
    assert isinstance(result, JobResult) and result.group == "proto-group"
    assert handle.status() == JobState.FINISHED == "finished"
    assert not stream.subscribed  # closed itself at the end
    assert list(stream) == []  # exhausted stays exhausted


def test_stream_started_after_the_job_finished_is_complete(client, worker):
    handle = client.submit("p")
    worker.run(TEXTS)
    assert handle.status() == JobState.FINISHED
    events = list(handle.stream(timeout=2))
    assert indices(events) == list(range(len(TEXTS))) and [e.text for e in events] == TEXTS
    assert [e.text for e in handle.stream(timeout=2, start=4)] == TEXTS[4:]  # resume from an index


def test_subscribe_before_enqueue(client, worker, raw):
    handle = client.submit("p", subscribe=True)
    channel = keys.token_channel(handle.id)
    assert dict(raw.pubsub_numsub(channel)) == {channel.encode(): 1}  # subscribed before any worker could start it
    worker.run(TEXTS)
    stream = handle.stream(timeout=5)
    assert [e.text for e in stream] == TEXTS
    give_up = time.monotonic() + 2  # the closed socket reaches the server a moment later
    while dict(raw.pubsub_numsub(channel))[channel.encode()] and time.monotonic() < give_up:
        time.sleep(0.01)
    assert dict(raw.pubsub_numsub(channel)) == {channel.encode(): 0}


def test_existing_job_by_id(client, worker):
    submitted = client.submit("p", request_id="known-1")
    worker.run(["x"])
    handle = client.job("known-1")
    assert handle.request == submitted.request and not handle.created
    assert handle.result(timeout=2).text == "x"
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        client.job("nope")


# ------------------------------------------------------------------ pub/sub faults


def _pubsub_client_ids(raw) -> set[str]:
    return {c["id"] for c in raw.client_list() if c.get("name") == "tpq-stream" and c.get("sub") != "0"}


def test_dropped_connection_resumes_without_gap_or_duplicate(client, worker, raw):
    handle = client.submit("p", subscribe=True)
    running = worker.take()
    worker.emit(running, TEXTS[:3])
    stream = handle.stream(timeout=5)
    got = [next(stream) for _ in range(3)]
    before = _pubsub_client_ids(raw)
    assert len(before) == 1
    assert raw.client_kill_filter(_type="pubsub") == 1
    worker.emit(running, TEXTS[3:5])  # published while the client has no subscription: only the log has them
    got.append(next(stream))
    worker.emit(running, TEXTS[5:])
    worker.succeed(running)
    got.extend(stream)
    assert indices(got) == list(range(len(TEXTS))) and [e.text for e in got] == TEXTS
    after = {c["id"] for c in raw.client_list() if c.get("name") == "tpq-stream"}
    assert not before & after  # it really reconnected


def test_reconnects_after_a_redis_restart(redis_server, client, worker):
    handle = client.submit("p", subscribe=True)
    running = worker.take()
    worker.emit(running, TEXTS[:2])
    stream = handle.stream(timeout=20)
    got = [next(stream), next(stream)]
    redis_server.restart()  # AOF on: the job, the log and the queue survive
    worker.conn.connection_pool.disconnect()
    worker.emit(running, TEXTS[2:])
    worker.succeed(running)
    got.extend(stream)
    assert [e.text for e in got] == TEXTS and indices(got) == list(range(len(TEXTS)))


def test_duplicated_pubsub_messages_are_dropped(client, worker):
    handle = client.submit("p", subscribe=True)
    running = worker.take()
    stream = handle.stream(timeout=5)
    worker.emit(running, TEXTS[:2])
    worker.publish_only(running.tokens)  # both again
    worker.emit(running, TEXTS[2:4])
    worker.publish_only(running.tokens[::-1])  # all four again, backwards
    worker.emit(running, TEXTS[4:])
    end = worker.end(running)
    worker.publish_only([end, running.tokens[0]])  # a second end and a stale token after it
    events = list(stream)
    assert indices(events) == list(range(len(TEXTS))) and [e.text for e in events] == TEXTS


def no_idle_reread_stream(client: Client, job_id: str) -> TokenStream:
    """A stream that never re-reads when idle: whatever it gets past a gap, the gap fill brought."""
    return TokenStream(client.redis, job_id, timeout=5, idle_s=3600).open()


def test_gap_in_pubsub_is_filled_from_the_log_at_once(client, worker):
    handle = client.submit("p")
    stream = no_idle_reread_stream(client, handle.id)
    running = worker.take()
    worker.emit(running, TEXTS[:1])
    assert next(stream).index == 0
    worker.emit(running, TEXTS[1:4], publish=False)  # lost on pub/sub, present in the log
    worker.emit(running, TEXTS[4:5])  # the next published one reveals the gap
    assert indices(next(stream) for _ in range(4)) == [1, 2, 3, 4]
    worker.emit(running, TEXTS[5:])
    worker.succeed(running)
    assert indices(stream) == [5]


def test_end_missed_on_pubsub_is_found_by_the_idle_reread(client, worker):
    handle = client.submit("p", subscribe=True)
    running = worker.take()
    stream = handle.stream(timeout=5)
    worker.emit(running, TEXTS[:2])
    worker.end(running, publish=False)
    started = time.monotonic()
    assert indices(stream) == [0, 1]
    assert stream.end is not None and time.monotonic() - started >= 0.9  # found by the re-read after ~1 s idle


# ------------------------------------------------------------------ failures


def test_failed_job_raises_in_stream_and_result(client, worker):
    handle = client.submit("p")
    running = worker.take()
    worker.emit(running, TEXTS[:2])
    worker.fail(running, "Traceback ...\nRuntimeError: CUDA out of memory while decoding")
    stream = handle.stream(timeout=5)
    assert indices([next(stream), next(stream)]) == [0, 1]  # the tokens before the failure still arrive
    with pytest.raises(JobFailed, match=f"job '{handle.id}' failed: RuntimeError: CUDA out of memory") as info:
        next(stream)
    assert info.value.job_id == handle.id
    with pytest.raises(JobFailed, match="CUDA out of memory") as info:
        handle.result(timeout=5)
    assert "Traceback" in info.value.error
    assert handle.status() == JobState.FAILED


def test_failed_job_without_end_record_is_caught_by_status(client, worker):
    handle = client.submit("p")
    running = worker.take()
    worker.emit(running, TEXTS[:1])
    stream = handle.stream(timeout=5)
    assert next(stream).index == 0
    worker.fail(running, "worker lost its GPU", write_end=False)
    with pytest.raises(JobFailed, match="worker lost its GPU"):
        next(stream)


# ------------------------------------------------------------------ cancel


def test_cancel_while_queued(client, raw):
    handle = client.submit("p", session_id="s")
    assert handle.cancel() is True
    assert handle.status() == JobState.CANCELLED
    assert raw.llen(keys.rq_queue_key(handle.queue_name)) == 0
    assert raw.get(keys.cancel_flag(handle.id)) == b"1"
    assert 0 < raw.ttl(keys.rq_job_key(handle.id)) <= client.settings.failure_ttl_s
    with pytest.raises(JobCancelled, match="cancelled before a worker started it"):
        handle.result(timeout=2)
    stream = handle.stream(timeout=2)
    assert list(stream) == [] and stream.end.finish_reason == FinishReason.CANCELLED and stream.end.num_tokens == 0
    assert handle.cancel() is False  # already over


def test_cancel_running_job_is_ended_by_its_worker(client, worker, raw):
    handle = client.submit("p")
    running = worker.take()
    worker.emit(running, TEXTS[:2])
    assert handle.status() == JobState.RUNNING
    assert handle.cancel() is True
    assert raw.exists(keys.rq_queue_key(keys.BATCH_QUEUE)) == 0 and handle.status() == JobState.RUNNING
    assert worker.emit(running, TEXTS[2:]) is False  # the worker sees the flag
    worker.succeed(running, FinishReason.CANCELLED)
    stream = handle.stream(timeout=2)
    assert indices(stream) == [0, 1] and stream.end.finish_reason == FinishReason.CANCELLED
    result = handle.result(timeout=2)
    assert result.finish_reason == FinishReason.CANCELLED and result.text == "Hello"
    assert handle.cancel() is False


def test_cancel_when_a_worker_already_took_the_job(client, worker, raw):
    """Taken off the queue but not started yet: rq still says queued. The client leaves the job to
    the worker, which sees the flag when it starts: one cancelled end, no JobCancelled."""
    handle = client.submit("p")
    job, queue = worker.dequeue()
    assert handle.status() == JobState.QUEUED
    assert handle.cancel() is True
    assert handle.status() == JobState.QUEUED  # not cancelled by the client: a worker holds it
    running = worker.start(job, queue)
    assert worker.emit(running, TEXTS) is False
    worker.succeed(running, FinishReason.CANCELLED)
    stream = handle.stream(timeout=2)
    assert list(stream) == [] and stream.end.finish_reason == FinishReason.CANCELLED
    assert [m.kind for m in read_log(raw, handle.id)] == ["end"]
    assert handle.result(timeout=2).finish_reason == FinishReason.CANCELLED


def test_cancel_of_requeued_job_ends_after_its_logged_tokens(client, worker, raw):
    """A job requeued after a worker died already has tokens in its log: the client's end follows them."""
    handle = client.submit("p")
    running = worker.take()
    worker.emit(running, TEXTS[:3])
    worker.requeue(running)
    assert handle.status() == JobState.QUEUED
    assert handle.cancel() is True and handle.status() == JobState.CANCELLED
    stream = handle.stream(timeout=2)
    assert [e.text for e in stream] == TEXTS[:3]
    assert stream.end.num_tokens == 3 and stream.end.finish_reason == FinishReason.CANCELLED


def test_cancel_unknown_job(client):
    assert client.submit("p").cancel() is True
    from producer.handles import JobHandle
    ghost = JobHandle(client, "ghost", keys.BATCH_QUEUE, client.build_request("p", request_id="ghost"))
    assert ghost.cancel() is False and ghost.status() == JobState.UNKNOWN
    with pytest.raises(JobNotFound):
        ghost.result(timeout=1)


# ------------------------------------------------------------------ timeouts


def test_result_timeout_names_job_and_status(client):
    handle = client.submit("p")
    started = time.monotonic()
    with pytest.raises(ResultTimeout, match=f"job '{handle.id}' has no result after 0.3 s \\(status: queued\\)") as info:
        handle.result(timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert info.value.job_id == handle.id and info.value.status == "queued"


def test_stream_timeout_and_keep_waiting(client, worker):
    handle = client.submit("p")
    stream = handle.stream(timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ResultTimeout, match="no token event from job .* within 0.3 s \\(status: queued, 0 tokens"):
        next(stream)
    assert time.monotonic() - started >= 0.3
    worker.run(TEXTS)
    assert [e.text for e in stream] == TEXTS  # the same stream carries on


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "1", True])
def test_bad_timeouts(client, bad):
    handle = client.submit("p")
    with pytest.raises(InvalidRequestError, match="timeout must be"):
        handle.result(timeout=bad)
    with pytest.raises(InvalidRequestError, match="timeout must be"):
        handle.stream(timeout=bad)


# ------------------------------------------------------------------ batches


class CountingXread:
    """Wraps a client's blocking XREAD to record how many keys each call waits on."""

    def __init__(self, conn) -> None:
        self.real = conn.xread
        self.calls: list[int] = []

    def __call__(self, streams, *args, **kwargs):
        self.calls.append(len(streams))
        return self.real(streams, *args, **kwargs)


def test_batch_results_in_completion_order(client, worker, monkeypatch):
    batch = client.submit_batch([{"prompt": f"p{i}", "request_id": f"job-{i}"} for i in range(7)])
    taken = {r.id: r for r in (worker.take() for _ in range(6))}
    assert batch.handles[6].cancel() is True  # still queued: cancelled by the client
    counting = CountingXread(client.redis)
    monkeypatch.setattr(client.redis, "xread", counting)
    order = ["job-3", "job-0", "job-5", "job-1", "job-4", "job-2"]

    def finish() -> None:
        for job_id in order:
            time.sleep(0.02)
            running = taken[job_id]
            worker.emit(running, [job_id])
            if job_id == "job-4":
                worker.fail(running, "ValueError: prompt too long for the model")
            else:
                worker.succeed(running)

    thread = threading.Thread(target=finish)
    thread.start()
    seen = list(batch.results(timeout=10))
    thread.join()
    ids = [h.id for h, _ in seen]
    assert ids[0] == "job-6" and ids[1:] == order  # the cancelled one is known at once
    outcomes = {h.id: o for h, o in seen}
    assert isinstance(outcomes["job-6"], JobCancelled)
    assert isinstance(outcomes["job-4"], JobFailed) and "prompt too long" in str(outcomes["job-4"])
    assert outcomes["job-3"].text == "job-3"
    assert counting.calls and max(counting.calls) > 1  # one XREAD waits on many result streams
    assert len(counting.calls) < 40  # not a poll per job
    pairs = batch.wait(timeout=2)  # all settled: returns at once, submission order
    assert [h.id for h, _ in pairs] == batch.ids
    progress = batch.progress()
    assert progress[JobState.FINISHED] == 5 and progress[JobState.FAILED] == 1
    assert progress[JobState.CANCELLED] == 1 and sum(progress.values()) == 7


def test_batch_of_1200_reads_results_in_chunks(client, worker, monkeypatch):
    batch = client.submit_batch([{"prompt": f"p{i}"} for i in range(1200)])
    counting = CountingXread(client.redis)
    monkeypatch.setattr(client.redis, "xread", counting)
    thread = worker.run_in_thread(["t"], count=1200)
    started = time.perf_counter()
    seen = list(batch.results(timeout=60))
    elapsed = time.perf_counter() - started
    thread.join()
    assert not worker.errors
    assert len(seen) == 1200 and {h.id for h, _ in seen} == set(batch.ids)
    assert all(isinstance(o, JobResult) for _, o in seen)
    assert max(counting.calls, default=0) <= 500
    started = time.perf_counter()
    assert len(batch.wait(timeout=10)) == 1200
    again = time.perf_counter() - started
    print(f"\nbatch of 1200: all results in {elapsed:.2f} s while one protocol worker finished them "
          f"({len(counting.calls)} blocking XREADs); wait() on the finished batch: {again * 1e3:.0f} ms")


def test_batch_timeout_and_progress(client):
    batch = client.submit_batch([{"prompt": "a"}, {"prompt": "b"}])
    assert batch.progress()[JobState.QUEUED] == 2
    with pytest.raises(ResultTimeout, match="2 of 2 jobs have no result after 0.2 s"):
        list(batch.results(timeout=0.2))
    assert list(BatchHandle(()).results()) == [] and BatchHandle(()).wait() == []


# ------------------------------------------------------------------ figures and hygiene


def test_stream_delivery_latency_on_loopback(client, worker):
    handle = client.submit("p", subscribe=True)
    sent_at: dict[int, float] = {}
    thread = worker.run_in_thread(["x"] * 300, delay_s=0.002, sent_at=sent_at)
    latencies = []
    for event in handle.stream(timeout=5):
        latencies.append(time.perf_counter() - sent_at[event.index])
    thread.join()
    assert len(latencies) == 300
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies)) - 1]
    print(f"\nstream delivery worker pipeline -> client event, 300 tokens at ~2 ms pacing: "
          f"p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms, max {latencies[-1] * 1e3:.3f} ms")


def test_producer_modules_never_import_torch():
    code = ("import sys, producer, producer.stream, producer.async_client, producer.session; "
            "bad = {'torch', 'gpu_worker'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
