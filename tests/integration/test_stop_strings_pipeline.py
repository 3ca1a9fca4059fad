"""Stop strings through Redis: a real worker group (in this process, tiny model) and the test's redis-server.

The stop string is picked from a greedy output the group streamed first, so
that it spans two tokens. No text past it may reach the stream, the token
log or the result, also when the engine ran on past it before the stop
reached it (made certain here by slowing the publisher's text stage down).
A text stage that fails stops the group rather than leaving its jobs unwritten.
"""
from __future__ import annotations

import threading
import time

import pytest
import redis

from common.results import FinishReason, StreamEnd, TokenEvent
from common.token_log import read_log
from gpu_worker.engine.llm_engine import SampledToken
from gpu_worker.engine.text_stage import TextStage
from gpu_worker.serve.engine_loop import StepReport
from gpu_worker.serve.publisher import Publisher
from producer import Client
from tests.text_checks import spanning_stop

PROMPT = "Once upon a time"
GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}


@pytest.fixture
def slow_text_stage(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each text-stage pass takes 20 ms more, so the engine samples past a stop string; returns the
    stage's count of dropped tokens after each pass."""
    dropped: list[int] = []
    process = TextStage.process

    def slow_process(self, tokens, finished):
        tokens = list(tokens)
        if tokens:
            time.sleep(0.02)
        output = process(self, tokens, finished)
        dropped.append(self.dropped_tokens)
        return output

    monkeypatch.setattr(TextStage, "process", slow_process)
    return dropped


def test_no_text_past_a_stop_string_reaches_the_stream_the_log_or_the_result(
        start_group, client: Client, raw: redis.Redis, slow_text_stage: list[int]):
    start_group()
    free = client.submit(PROMPT, **GREEDY)
    free_events = list(free.stream())
    free.result(timeout=120)
    stop, k = spanning_stop([e.text for e in free_events])
    full = "".join(e.text for e in free_events)
    expected = full[:full.index(stop)]

    job = client.submit(PROMPT, stop=[stop], **GREEDY)
    events = list(job.stream())
    result = job.result(timeout=120)
    logged = read_log(raw, job.id)

    assert max(slow_text_stage) > 0, "the engine should have sampled past the stop string before it stopped"
    kept = [e.token_id for e in free_events[:k + 2]]  # up to the token that completed the stop string
    assert "".join(e.text for e in events) == expected == result.text
    assert [e.token_id for e in events] == kept == result.token_ids
    assert result.finish_reason is FinishReason.STOP and result.usage.generated_tokens == len(kept)
    *log_events, end = logged
    assert all(isinstance(m, TokenEvent) for m in log_events) and isinstance(end, StreamEnd)
    assert "".join(m.text for m in log_events) == expected
    assert [m.token_id for m in log_events] == kept
    assert (end.num_tokens, end.finish_reason) == (len(kept), FinishReason.STOP)
    assert log_events[-1].finish_reason is FinishReason.STOP


def test_a_text_stage_failure_stops_the_group_instead_of_stalling_its_jobs(redis_url: str):
    class BrokenStage:
        def process(self, tokens, finished):
            raise RuntimeError("detokenizer bug")

    failed = threading.Event()
    publisher = Publisher(redis_url, 100, 60, on_written=lambda report: None, texts=BrokenStage(),
                          on_failed=failed.set)
    publisher.start()
    publisher.put(StepReport(tokens=[SampledToken("j", 0, 5, sampled_at=0.0)]))
    assert failed.wait(10)
    assert isinstance(publisher.error, RuntimeError)
    publisher.close()
