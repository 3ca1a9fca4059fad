"""The whole pipeline: client -> Redis -> supervisor + worker-group processes -> token streams and results.

Everything here is real: the test redis-server, `tpq supervisor` and `tpq
worker` processes (ranks over gloo), the client. The quick test uses a tiny
random Llama; the slow ones use SmolLM2.
"""
from __future__ import annotations

import signal

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import DefaultSerializer, JSONSerializer

from common import keys
from common.groups import read_groups
from common.sampling import SamplingParams
from producer import Client
from tests.pipeline_checks import RESULT_TIMEOUT_S, assert_streams_match_results, collect


def offline_greedy(model: str, prompts: list[str], max_tokens: int, tp: int = 1) -> list[list[int]]:
    from gpu_worker.llm import Engine

    with Engine(model, tp=tp) as engine:
        results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [r.token_ids for r in results]


def write_raw_job(conn: redis.Redis, queue_name: str, job_id: str, func: str, serializer=JSONSerializer) -> None:
    """A job written straight into a queue, as an attacker with Redis access could (not via tpqueue's client)."""
    queue = Queue(queue_name, connection=conn, serializer=serializer)
    job = Job.create(func, kwargs={}, id=job_id, connection=conn, serializer=serializer, origin=queue_name,
                     failure_ttl=3600)
    queue.enqueue_job(job)


def test_pipeline_end_to_end_on_a_tiny_model(start_stack, redis_url, tiny_llama_dir):
    model = str(tiny_llama_dir)
    stack = start_stack(groups=1, tp=1, model=model)
    conn = redis.Redis.from_url(redis_url)
    prompts = [f"hello {i} world" for i in range(12)]
    with Client(redis_url) as client:
        interactive = [client.submit(prompt=p, session_id=f"s{i % 3}", temperature=0, max_tokens=12)
                       for i, p in enumerate(prompts[:6])]
        batch = client.submit_batch([{"prompt": p, "sampling": {"temperature": 0, "max_tokens": 12}}
                                     for p in prompts[6:]])
        write_raw_job(conn, keys.BATCH_QUEUE, "forbidden-func", "os.getcwd")
        write_raw_job(conn, keys.BATCH_QUEUE, "pickled-job", "gpu_worker.serve.jobs.generate", DefaultSerializer)
        handles = interactive + list(batch)
        outcomes = collect(handles)
        after = client.submit(prompt="still serving?", temperature=0, max_tokens=4)
        assert after.result(timeout=60).finish_reason is not None  # the worker survived the hostile jobs

    assert_streams_match_results(outcomes)
    results = [outcomes[h.id][1] for h in handles]
    assert {r.group for r in results} == {"g0"}
    assert [r.token_ids for r in results] == offline_greedy(model, prompts, max_tokens=12)

    forbidden = Job.fetch("forbidden-func", connection=conn, serializer=JSONSerializer)
    assert forbidden.get_status() == "failed"
    assert "not on the allow-list" in forbidden.latest_result().exc_string
    pickled = Job.fetch("pickled-job", connection=conn, serializer=JSONSerializer)
    assert pickled.get_status() == "failed"
    assert "cannot be read" in pickled.latest_result().exc_string

    # rq tells the truth: the group's worker, and the finished and failed counts.
    [info] = read_groups(conn).values()
    workers = Worker.all(connection=conn)
    assert info.worker_name in {w.name for w in workers}
    queue_names = keys.shard_queue_names(16) + [keys.BATCH_QUEUE]
    finished = sum(FinishedJobRegistry(q, connection=conn).count for q in queue_names)
    failed = sum(FailedJobRegistry(q, connection=conn).count for q in queue_names)
    assert (finished, failed) == (len(handles) + 1, 2)
    assert stack.workers["g0"].poll() is None


@pytest.mark.slow
def test_smollm2_tp3_interactive_sessions_and_batch(start_stack, redis_url):
    start_stack(groups=1, tp=3)
    max_tokens = 16
    questions = [f"In one sentence, what is {topic}?" for topic in (
        "a queue", "a GPU", "Redis", "a token", "a session", "tensor parallelism", "a heartbeat", "a shard")]
    batch_prompts = [f"Write the number {i} in words:" for i in range(64)]
    with Client(redis_url) as client:
        interactive = [client.submit(messages=[{"role": "user", "content": questions[i % 8]}], session_id=f"user-{i % 8}",
                                     temperature=0, max_tokens=max_tokens) for i in range(24)]
        batch = client.submit_batch([{"prompt": p, "sampling": {"temperature": 0, "max_tokens": max_tokens}}
                                     for p in batch_prompts])
        outcomes = collect(interactive + list(batch))
    assert len(outcomes) == 24 + 64
    assert_streams_match_results(outcomes)
    from gpu_worker.llm import Engine

    with Engine("smollm2-135m-instruct", tp=1) as engine:
        chats = [[{"role": "user", "content": q}] for q in questions]
        expected_chat = [r.token_ids for r in engine.generate(chats, SamplingParams(temperature=0, max_tokens=max_tokens))]
        expected_batch = [r.token_ids for r in engine.generate(batch_prompts, SamplingParams(temperature=0, max_tokens=max_tokens))]
    assert [outcomes[h.id][1].token_ids for h in interactive] == [expected_chat[i % 8] for i in range(24)]
    assert [outcomes[h.id][1].token_ids for h in batch] == expected_batch


@pytest.mark.slow
def test_sessions_stick_to_a_group_and_move_when_it_stops(start_stack, redis_url, tiny_llama_dir):
    stack = start_stack(groups=2, tp=1, model=str(tiny_llama_dir))
    sessions = [f"session-{i}" for i in range(12)]
    with Client(redis_url) as client:
        first = {s: [client.submit(prompt=f"{s} turn {t}", session_id=s, temperature=0, max_tokens=6) for t in range(3)]
                 for s in sessions}
        groups_of = {s: {h.result(timeout=RESULT_TIMEOUT_S).group for h in hs} for s, hs in first.items()}
        assert all(len(g) == 1 for g in groups_of.values()), groups_of  # every job of a session on one group
        used = {g for gs in groups_of.values() for g in gs}
        assert used == {"g0", "g1"}, f"12 sessions over 16 shards should reach both groups, got {used}"

        stack.workers["g1"].send_signal(signal.SIGTERM)  # a clean stop of group g1
        stack.workers["g1"].wait(timeout=60)
        moved = [s for s in sessions if groups_of[s] == {"g1"}]
        later = {s: client.submit(prompt=f"{s} after the stop", session_id=s, temperature=0, max_tokens=6)
                 for s in moved}
        outcomes = collect(list(later.values()))
    assert_streams_match_results(outcomes)
    assert {outcomes[h.id][1].group for h in later.values()} == {"g0"}
