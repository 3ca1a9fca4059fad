"""gpu_worker.serve.admission: every verdict of decide, without Redis; the batch read it takes, on fakeredis.

Jobs are real ``AllowListedJob`` objects built in memory (their connection
points at a port nothing listens on, and is never used).
"""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import redis
from rq.serializers import JSONSerializer

from common import keys
from common.jobs import GENERATE_FUNC
from common.results import FinishReason, StreamEnd, TokenEvent
from common.settings import get_settings
from common.token_log import queue_messages, resume_point
from gpu_worker.serve.admission import (
    Fail, FinishWithoutEngine, Generate, LogState, Resume, decide, read_log_states,
)
from gpu_worker.serve.allow_list import AllowListedJob

NOW = 1_700_000_000.0
SETTINGS = get_settings(max_prompt_chars=100)
NOWHERE = redis.Redis(port=1)  # never contacted: decide has no side effects


def job(job_id: str = "j1", func: str = GENERATE_FUNC, args: tuple = (), enqueued_s_ago: float | None = 2.0,
        **request) -> AllowListedJob:
    request = {"request_id": job_id, "prompt": "hello", **request}
    made = AllowListedJob.create(func, args=args, kwargs={"request": request}, id=job_id, connection=NOWHERE,
                                 serializer=JSONSerializer)
    if enqueued_s_ago is not None:
        made.enqueued_at = datetime.fromtimestamp(NOW - enqueued_s_ago, tz=timezone.utc)
    return made


def tokens(job_id: str, n: int, last_reason: FinishReason | None = None) -> tuple[TokenEvent, ...]:
    return tuple(TokenEvent(request_id=job_id, index=i, token_id=10 + i, text="t",
                            finish_reason=last_reason if i == n - 1 else None) for i in range(n))


def test_a_fresh_job_is_generated_with_its_time_in_the_queue() -> None:
    verdict = decide(job(), LogState(), NOW, SETTINGS)
    assert isinstance(verdict, Generate) and verdict.request.prompt == "hello"
    assert verdict.queued_before_s == pytest.approx(2.0)


def test_a_job_without_an_enqueue_time_counts_no_time_in_the_queue() -> None:
    verdict = decide(job(enqueued_s_ago=None), LogState(), NOW, SETTINGS)
    assert isinstance(verdict, Generate) and verdict.queued_before_s == 0.0


def test_a_job_an_earlier_attempt_streamed_part_of_resumes_after_those_tokens() -> None:
    logged = tokens("j1", 3)
    verdict = decide(job(), LogState(tokens=logged), NOW, SETTINGS)
    assert isinstance(verdict, Resume) and verdict.tokens == logged and verdict.queued_before_s == pytest.approx(2.0)


@pytest.mark.parametrize(("made", "fragment"), [
    (lambda: job(func="os.system"), "ForbiddenJobFunction: refusing job function 'os.system'"),
    (lambda: job(args=("x",)), "InvalidRequestError: a tpqueue job takes no positional arguments (got 1)"),
    (lambda: job(prompt="x" * 101), "InvalidRequestError: the prompt total 101 characters; at most 100"),
    (lambda: job(sampling={"temperature": -1}), "InvalidRequestError: invalid job request: sampling.temperature"),
    (lambda: job(request_id="other"), "the request id 'other' differs from the job id 'j1'"),
], ids=["forbidden function", "positional args", "over the limits", "invalid request", "id mismatch"])
def test_an_invalid_job_fails_as_claimed(made, fragment: str) -> None:
    verdict = decide(made(), LogState(), NOW, SETTINGS)
    assert isinstance(verdict, Fail) and fragment in verdict.message and not verdict.end_written


def test_a_forbidden_callback_fails_the_job() -> None:
    bad = job()
    bad._success_callback_name = "os.system"
    verdict = decide(bad, LogState(), NOW, SETTINGS)
    assert isinstance(verdict, Fail) and "success callback 'os.system'" in verdict.message


def test_undecodable_data_fails_the_job_without_raising() -> None:
    bad = AllowListedJob("j1", connection=NOWHERE, serializer=JSONSerializer)
    bad.data = b"\x00 not json"
    verdict = decide(bad, LogState(), NOW, SETTINGS)
    assert isinstance(verdict, Fail) and verdict.message.startswith("the job's data cannot be read: Deserialization")


def test_an_invalid_job_fails_even_when_cancelled() -> None:
    assert isinstance(decide(job(func="os.system"), LogState(cancelled=True), NOW, SETTINGS), Fail)


def test_a_cancelled_job_finishes_without_the_engine_before_anything_else() -> None:
    end = StreamEnd(request_id="j1", num_tokens=2, finish_reason=FinishReason.STOP)
    verdict = decide(job(), LogState(tokens=tokens("j1", 2), end=end, cancelled=True), NOW, SETTINGS)
    assert verdict == FinishWithoutEngine(verdict.request, tokens("j1", 2), FinishReason.CANCELLED, end_written=False)


def test_a_log_that_ended_with_an_error_fails_the_job_with_that_error() -> None:
    end = StreamEnd(request_id="j1", num_tokens=1, error="the engine refused it")
    verdict = decide(job(), LogState(tokens=tokens("j1", 1), end=end), NOW, SETTINGS)
    assert verdict == Fail("the engine refused it", end_written=True)


def test_a_log_that_ended_with_a_finish_completes_the_job_from_the_log() -> None:
    end = StreamEnd(request_id="j1", num_tokens=2, finish_reason=FinishReason.LENGTH)
    verdict = decide(job(), LogState(tokens=tokens("j1", 2), end=end), NOW, SETTINGS)
    assert isinstance(verdict, FinishWithoutEngine)
    assert (verdict.reason, verdict.end_written, verdict.tokens) == (FinishReason.LENGTH, True, tokens("j1", 2))


def test_a_log_whose_last_token_finished_but_has_no_end_record_completes_and_writes_the_end() -> None:
    verdict = decide(job(), LogState(tokens=tokens("j1", 2, FinishReason.STOP)), NOW, SETTINGS)
    assert isinstance(verdict, FinishWithoutEngine)
    assert (verdict.reason, verdict.end_written) == (FinishReason.STOP, False)


def test_a_job_past_its_deadline_finishes_without_the_engine() -> None:
    verdict = decide(job(deadline_unix_s=NOW - 1), LogState(tokens=tokens("j1", 1)), NOW, SETTINGS)
    assert isinstance(verdict, FinishWithoutEngine) and verdict.reason == FinishReason.DEADLINE
    assert not verdict.end_written and verdict.tokens == tokens("j1", 1)
    assert isinstance(decide(job(deadline_unix_s=NOW + 1), LogState(), NOW, SETTINGS), Generate)


def test_a_finished_log_wins_over_a_passed_deadline() -> None:
    end = StreamEnd(request_id="j1", num_tokens=0, finish_reason=FinishReason.STOP)
    verdict = decide(job(deadline_unix_s=NOW - 1), LogState(end=end), NOW, SETTINGS)
    assert isinstance(verdict, FinishWithoutEngine) and verdict.reason == FinishReason.STOP


def test_the_result_of_a_job_finished_from_its_log_is_what_the_log_holds() -> None:
    verdict = FinishWithoutEngine(decide(job(), LogState(), NOW, SETTINGS).request, tokens("j1", 2),
                                  FinishReason.LENGTH)
    result = verdict.job_result("j1", prompt_tokens=5, group="g0", attempt=2)
    assert (result.text, result.token_ids, result.finish_reason) == ("tt", [10, 11], FinishReason.LENGTH)
    assert (result.usage.prompt_tokens, result.usage.generated_tokens, result.group, result.attempt) == (5, 2, "g0", 2)
    assert result.timings.total_s == 0.0


def test_the_log_states_of_a_batch_are_its_resume_points_and_cancel_flags(fake_redis: redis.Redis) -> None:
    """One pipeline for the batch, read the way resume_point reads one log: only its gap-free start counts."""
    holed = [*tokens("holed", 3), TokenEvent(request_id="holed", index=5, token_id=1, text="x")]  # a hole at 3
    ended = [*tokens("ended", 2), StreamEnd(request_id="ended", num_tokens=2, finish_reason=FinishReason.STOP)]
    with fake_redis.pipeline(transaction=False) as pipe:
        queue_messages(pipe, [*holed, *ended], maxlen=100, ttl_s=60)
        pipe.execute()
    fake_redis.set(keys.cancel_flag("ended"), 1)
    states = read_log_states(fake_redis, ["holed", "ended", "fresh"])
    for job_id in ("holed", "ended", "fresh"):
        logged, end = resume_point(fake_redis, job_id)
        assert states[job_id] == LogState(tuple(logged), end, cancelled=job_id == "ended")
    assert len(states["holed"].tokens) == 3 and states["ended"].end is not None and states["fresh"] == LogState()
    assert read_log_states(fake_redis, []) == {}
