"""Logprobs through Redis: a real worker group (in this process, tiny model) serves jobs that ask for them.

The group is :func:`gpu_worker.serve.group.serve` on a thread (engine loop,
job pump, publisher, heartbeat) against the test's real redis-server; the
client is :class:`producer.Client`. The stream's events and the rq result
must carry the engine's logprobs unchanged, and a resumed job must keep the
logprobs its earlier attempt logged.
"""
from __future__ import annotations

from common.results import TokenEvent
from common.sampling import SamplingParams
from producer import Client
from tests.doubles import ProtocolWorker
from tests.parity import assert_logprobs_match_transformers

ASKING = {"temperature": 0, "max_tokens": 6, "ignore_eos": True, "logprobs": 3, "prompt_logprobs": 2}


def test_a_job_with_logprobs_carries_them_in_its_stream_and_result(start_group, client: Client, tiny_llama_dir):
    start_group()
    job = client.submit("The quick brown fox", **ASKING)
    events = list(job.stream())
    result = job.result(timeout=120)
    assert [e.index for e in events] == list(range(6))
    assert all(e.logprob is not None and len(e.top_logprobs) == 3 for e in events)
    assert result.logprobs == [e.token_logprob() for e in events]          # stream and result agree exactly
    assert len(result.prompt_logprobs) == result.usage.prompt_tokens
    prompt = [p.token_id for p in result.prompt_logprobs]
    assert_logprobs_match_transformers(tiny_llama_dir, prompt, result, SamplingParams(**ASKING))

    plain = client.submit("The quick brown fox", temperature=0, max_tokens=6, ignore_eos=True)
    assert all(e.logprob is None and e.top_logprobs is None for e in plain.stream())
    plain_result = plain.result(timeout=120)
    assert plain_result.logprobs is None and plain_result.prompt_logprobs is None
    assert plain_result.token_ids == result.token_ids


def test_a_resumed_job_keeps_the_logprobs_its_earlier_attempt_logged(start_group, client: Client, redis_url: str):
    job = client.submit("Resume me", **ASKING)
    earlier = ProtocolWorker(redis_url)
    try:
        running = earlier.take()
        logged = [TokenEvent(request_id=job.id, index=i, token_id=100 + i, text=f"<{i}>", logprob=-1.5 - i,
                             top_logprobs=[(7, -0.5), (100 + i, -1.5 - i), (9, -2.75)]) for i in range(2)]
        earlier.write(logged)
        earlier.requeue(running)                      # the attempt died; recovery put the job back
    finally:
        earlier.close()
    start_group()
    events = list(job.stream())
    result = job.result(timeout=120)
    assert events[:2] == logged                       # replayed from the log as written
    assert [e.index for e in events] == list(range(6))
    assert result.token_ids[:2] == [100, 101]
    assert result.logprobs[:2] == [e.token_logprob() for e in logged]   # not recomputed: the logged values
    assert result.logprobs == [e.token_logprob() for e in events]
    assert len(result.prompt_logprobs) == result.usage.prompt_tokens    # the resumed run computed them again
