"""The client's Redis-free cores: StreamCursor ordering, JobState mapping, result entries, BatchWatch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rq.results import Result
from rq.serializers import JSONSerializer

from common import keys
from common.errors import InvalidRequestError, JobCancelled, JobFailed, JobNotFound
from common.results import FinishReason, JobResult, StreamEnd, Timings, TokenEvent, Usage
from producer.batches import BatchWatch
from producer.job_state import JobState, ResultWatch, decode_result_entry, job_state
from producer.stream_cursor import StreamCursor

JOB = "job-1"


def tokens(n: int, job_id: str = JOB) -> list[TokenEvent]:
    return [TokenEvent(request_id=job_id, index=i, token_id=i, text=f"t{i}") for i in range(n)]


def stream_of(n: int) -> list[TokenEvent | StreamEnd]:
    return [*tokens(n), StreamEnd(request_id=JOB, num_tokens=n, finish_reason=FinishReason.STOP)]


# ------------------------------------------------------------------ StreamCursor


def test_in_order_messages_pass_straight_through():
    cursor = StreamCursor(JOB)
    out = []
    for message in stream_of(3):
        out += cursor.offer(message)
    assert out == tokens(3) and cursor.end is not None and cursor.next_position == 3


def test_duplicates_and_stale_messages_are_dropped():
    cursor = StreamCursor(JOB)
    t = tokens(3)
    assert cursor.offer(t[0]) == [t[0]]
    assert cursor.offer(t[0]) == []
    assert cursor.offer(t[1]) == [t[1]]
    assert cursor.offer(t[0]) == [] and not cursor.waiting


def test_gap_waits_for_the_log_and_log_copy_wins():
    cursor = StreamCursor(JOB)
    t = tokens(4)
    cursor.offer(t[0])
    pubsub_copy = t[3].model_copy(update={"text": "from pubsub"})
    assert cursor.offer(pubsub_copy) == [] and cursor.waiting
    assert cursor.offer_all(t[1:4], from_log=True) == t[1:4]  # the log fills 1, 2 and brings 3 itself
    assert not cursor.waiting and cursor.next_position == 4


def test_held_message_is_released_when_the_gap_fills():
    cursor = StreamCursor(JOB)
    t = tokens(3)
    assert cursor.offer(t[2]) == [] and cursor.offer(t[1]) == [] and cursor.waiting
    assert cursor.offer(t[0]) == t  # 0 arrives: 1 and 2 follow from the held ones


def test_end_stops_everything_after_it():
    cursor = StreamCursor(JOB)
    end = StreamEnd(request_id=JOB, num_tokens=0, finish_reason=FinishReason.CANCELLED)
    assert cursor.offer(end) == [] and cursor.end == end
    assert cursor.offer(tokens(1)[0]) == [] and cursor.offer(end.model_copy(update={"num_tokens": 5})) == []
    assert not cursor.waiting


def test_other_jobs_messages_are_ignored():
    cursor = StreamCursor(JOB)
    assert cursor.offer(tokens(1, "other")[0]) == [] and cursor.next_position == 0


def test_start_skips_earlier_tokens():
    cursor = StreamCursor(JOB, start=2)
    assert cursor.offer_all(stream_of(4), from_log=True) == tokens(4)[2:]
    with pytest.raises(InvalidRequestError, match="start must be"):
        StreamCursor(JOB, start=-1)


@st.composite
def deliveries(draw):
    """A worker's writes (log first, then PUBLISH) with pub/sub losing, duplicating and replaying messages."""
    n = draw(st.integers(0, 25))
    messages = stream_of(n)
    schedule = []  # (what pub/sub delivers, how much of the log exists at that moment)
    for position, message in enumerate(messages):
        copies = draw(st.sampled_from([0, 1, 1, 1, 2]))
        schedule += [(message, position + 1)] * copies
        if position and draw(st.booleans()):
            stale = messages[draw(st.integers(0, position - 1))]
            schedule.append((stale, position + 1))
    return n, messages, schedule


@settings(max_examples=300, deadline=None)
@given(deliveries(), st.integers(0, 3))
def test_reader_algorithm_yields_every_token_once_in_order(case, start):
    """The readers' algorithm: offer each pub/sub message, fill a gap from the log, and re-read the log
    when idle. Whatever pub/sub does, the output is exactly the tokens from ``start`` on."""
    n, messages, schedule = case
    start = min(start, n)
    cursor = StreamCursor(JOB, start)
    out = cursor.offer_all(messages[start:1], from_log=True)  # the replay right after SUBSCRIBE
    for message, log_len in schedule:
        out += cursor.offer(message)
        if cursor.waiting:
            out += cursor.offer_all(messages[cursor.next_position:log_len], from_log=True)
    out += cursor.offer_all(messages[cursor.next_position:], from_log=True)  # the idle re-read
    assert out == tokens(n)[start:]
    assert cursor.end is not None and cursor.end.num_tokens == n


# ------------------------------------------------------------------ JobState


@pytest.mark.parametrize(("raw", "state"), [
    (b"queued", JobState.QUEUED), ("created", JobState.QUEUED), (b"deferred", JobState.QUEUED),
    (b"scheduled", JobState.QUEUED), (b"started", JobState.RUNNING), (b"finished", JobState.FINISHED),
    (b"failed", JobState.FAILED), (b"stopped", JobState.FAILED), (b"canceled", JobState.CANCELLED),
    (None, JobState.UNKNOWN), (b"weird", JobState.UNKNOWN),
])
def test_job_state_from_rq_status(raw, state):
    assert job_state(raw) is state


def test_job_state_is_a_str_enum():
    assert JobState.RUNNING == "running" and str(JobState.RUNNING) == "running" and f"{JobState.QUEUED}" == "queued"
    assert JobState.CANCELLED.is_terminal and not JobState.QUEUED.is_terminal


# ------------------------------------------------------------------ rq result entries


def job_result(job_id: str = JOB) -> JobResult:
    return JobResult(request_id=job_id, text="hi", token_ids=[1, 2], finish_reason=FinishReason.STOP,
                     usage=Usage(prompt_tokens=1, cached_tokens=0, generated_tokens=2),
                     timings=Timings(queue_s=0, time_to_first_token_s=0, total_s=0), group="g", attempt=1)


def save_result(conn, job_id: str, type_: Result.Type, return_value=None, exc_string=None) -> None:
    job = SimpleNamespace(id=job_id, connection=conn, serializer=JSONSerializer)
    Result.create(job, type_, ttl=60, return_value=return_value, exc_string=exc_string)


def entries(conn, job_id: str = JOB):
    return conn.xrange(keys.rq_result_key(job_id))


def test_result_entries_decode(fake_redis):
    save_result(fake_redis, JOB, Result.Type.SUCCESSFUL, job_result().model_dump(mode="json"))
    save_result(fake_redis, JOB, Result.Type.FAILED, exc_string="Traceback\n  ...\nValueError: no")
    save_result(fake_redis, JOB, Result.Type.RETRIED, return_value={"max": 1})
    save_result(fake_redis, JOB, Result.Type.SUCCESSFUL, {"not": "a result"})
    ok, failed, retried, foreign = (decode_result_entry(JOB, i, f) for i, f in entries(fake_redis))
    assert ok == job_result()  # rq's encoding of each entry type is pinned in test_rq_internals.py
    assert isinstance(failed, JobFailed) and str(failed) == f"job '{JOB}' failed: ValueError: no"
    assert failed.error.startswith("Traceback")
    assert retried is None
    assert isinstance(foreign, JobFailed) and "not a tpqueue JobResult" in str(foreign)


def test_result_watch_verdicts(fake_redis):
    watch = ResultWatch(JOB)
    assert watch.verdict(JobState.QUEUED) is None and watch.verdict(JobState.RUNNING) is None
    assert isinstance(watch.verdict(JobState.CANCELLED), JobCancelled)
    assert isinstance(watch.verdict(JobState.UNKNOWN), JobNotFound)
    assert isinstance(watch.verdict(JobState.FAILED), JobFailed)
    save_result(fake_redis, JOB, Result.Type.FAILED, exc_string="boom")
    watch.feed(entries(fake_redis))
    assert watch.verdict(JobState.QUEUED) is None  # failed once, but requeued: wait for the rerun
    assert isinstance(watch.verdict(JobState.FAILED), JobFailed) and isinstance(watch.verdict(), JobFailed)
    save_result(fake_redis, JOB, Result.Type.SUCCESSFUL, job_result().model_dump(mode="json"))
    watch.feed(fake_redis.xrange(keys.rq_result_key(JOB), min=f"({watch.last_id.decode()}"))
    assert watch.verdict(JobState.RUNNING) == job_result()


# ------------------------------------------------------------------ BatchWatch


def handles(n: int):
    return [SimpleNamespace(id=f"j{i}") for i in range(n)]


def test_batch_watch_chunks_500_keys():
    watch = BatchWatch(handles(1200), None)
    chunks = watch.chunks()
    assert [len(c) for c in chunks] == [500, 500, 200]
    assert set(chunks[0].values()) == {"0-0"} and keys.rq_result_key("j0") in chunks[0]


def test_batch_watch_settles_in_entry_order(fake_redis):
    hs = handles(3)
    watch = BatchWatch(hs, 10)
    for job_id in ("j2", "j0"):
        save_result(fake_redis, job_id, Result.Type.SUCCESSFUL, job_result(job_id).model_dump(mode="json"))
    reply = fake_redis.xread(watch.chunks()[0])
    reply.reverse()  # whatever order XREAD lists the keys in
    settled = watch.feed_xread([reply])
    assert [h.id for h, _ in settled] == ["j2", "j0"] and list(watch.pending) == ["j1"]
    settled = watch.feed_xread([[]], {"j1": JobState.CANCELLED})
    assert [(h.id, type(o)) for h, o in settled] == [("j1", JobCancelled)] and not watch.pending


def test_batch_watch_same_id_twice():
    h = SimpleNamespace(id="j")
    watch = BatchWatch([h, h], None)
    assert [x for x, _ in watch.feed_xread([], {"j": JobState.UNKNOWN})] == [h, h]
