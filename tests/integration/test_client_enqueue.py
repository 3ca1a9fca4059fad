"""producer.Client: submit and submit_batch against a real redis-server (the enqueue side only)."""
from __future__ import annotations

import json
import math
import threading
import time
import zlib

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from common import keys
from common.errors import InvalidConfigError, InvalidRequestError, QueueFull
from common.jobs import GENERATE_FUNC, request_from_job_kwargs
from common.schemas import GenerationRequest
from common.settings import get_settings
from producer import BatchHandle, Client, JobHandle


def make_client(url: str, **overrides) -> Client:
    return Client(settings=get_settings(redis_url=url, **overrides))


@pytest.fixture
def client(redis_url):
    with make_client(redis_url) as c:
        yield c


def raw_job(raw: redis.Redis, job_id: str) -> dict[str, bytes]:
    return {k.decode(): v for k, v in raw.hgetall(keys.rq_job_key(job_id)).items()}


def test_client_needs_a_url(monkeypatch):
    monkeypatch.delenv("TPQ_REDIS_URL", raising=False)
    with pytest.raises(InvalidConfigError, match="no Redis URL"):
        Client(settings=get_settings())


def test_url_argument_wins_and_repr_hides_password(redis_url):
    c = Client(redis_url, settings=get_settings(redis_url="redis://u:secret@nowhere:1/0"))
    try:
        assert c.redis.ping() and "secret" not in repr(c)
    finally:
        c.close()


def test_submit_without_session_goes_to_batch_queue(client, raw):
    handle = client.submit("Hello", max_tokens=8, temperature=0)
    assert isinstance(handle, JobHandle) and handle.created
    assert handle.queue_name == keys.BATCH_QUEUE
    assert len(handle.id) == 32 and handle.request.request_id == handle.id
    assert raw.lrange(keys.rq_queue_key(keys.BATCH_QUEUE), 0, -1) == [handle.id.encode()]
    assert handle.status() == "queued"
    assert handle.request.priority == "batch"


def test_submit_with_session_goes_to_its_shard(client, raw):
    handle = client.submit("Hi", session_id="alice")
    expected = keys.shard_queue_name(keys.shard_for_session("alice", client.settings.num_shards))
    assert handle.queue_name == expected
    assert raw.lrange(keys.rq_queue_key(expected), 0, -1) == [handle.id.encode()]
    assert handle.request.priority == "interactive"
    again = client.submit("More", session_id="alice")
    assert again.queue_name == expected and raw.llen(keys.rq_queue_key(expected)) == 2


def test_job_is_json_with_ttls_and_retries(client, raw):
    handle = client.submit(
        messages=[{"role": "user", "content": "hé"}], session_id="bob", request_id="req-1", seed=3,
    )
    fields = raw_job(raw, "req-1")
    data = zlib.decompress(fields["data"])
    assert not fields["data"].startswith(b"\x80") and not data.startswith(b"\x80")  # no pickle
    func, instance, args, kwargs = json.loads(data)
    assert (func, instance, args) == (GENERATE_FUNC, None, [])
    assert request_from_job_kwargs(kwargs) == handle.request
    assert kwargs["request"]["request_id"] == "req-1"
    assert int(fields["result_ttl"]) == client.settings.result_ttl_s
    assert int(fields["failure_ttl"]) == client.settings.failure_ttl_s
    assert int(fields["retries_left"]) == client.settings.job_retries
    assert int(fields["enqueue_at_front_on_retry"]) == 1
    assert fields["origin"].decode() == handle.queue_name
    assert len(fields["description"]) < 100  # not the whole prompt again
    job = Job.fetch("req-1", connection=raw, serializer=JSONSerializer)
    assert job.func_name == GENERATE_FUNC and job.retries_left == client.settings.job_retries


def test_a_sampled_request_without_a_seed_is_stored_with_one(client, raw):
    """So that a run after a crash draws the same tokens (the sampler keys draws by seed and index)."""
    sampled = [client.submit("a", request_id=f"sampled-{i}", temperature=0.7) for i in range(2)]
    seeds = [request_from_job_kwargs(json.loads(zlib.decompress(raw_job(raw, h.id)["data"]))[3]).sampling.seed
             for h in sampled]
    assert None not in seeds and seeds[0] != seeds[1]
    assert client.submit("b", temperature=0.7, seed=5).request.sampling.seed == 5  # a given seed is kept
    assert client.submit("c", temperature=0).request.sampling.seed is None  # greedy needs none
    [batched] = client.submit_batch([{"prompt": "d", "sampling": {"temperature": 1.0}}]).handles
    assert batched.request.sampling.seed is not None


def test_duplicate_request_id_gives_one_job(client, raw):
    first = client.submit("one", request_id="same", session_id="s1")
    second = client.submit("two", request_id="same", session_id="s1")
    assert first.created and not second.created
    assert second.id == "same" and second.queue_name == first.queue_name
    assert second.request.prompt == "one"  # the existing job's request
    assert raw.llen(keys.rq_queue_key(first.queue_name)) == 1


def test_concurrent_duplicates_give_one_job(redis_url, raw):
    clients = [make_client(redis_url) for _ in range(8)]
    results: list[JobHandle] = []
    barrier = threading.Barrier(len(clients))

    def go(c: Client) -> None:
        barrier.wait()
        results.append(c.submit("race", request_id="racy"))

    threads = [threading.Thread(target=go, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    assert sum(h.created for h in results) == 1
    assert raw.lrange(keys.rq_queue_key(keys.BATCH_QUEUE), 0, -1) == [b"racy"]


BAD_SUBMITS = [
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "not both", id="both"),
    pytest.param({}, "neither", id="neither"),
    pytest.param({"prompt": "a", "max_tokens": 0}, "max_tokens", id="max-tokens-0"),
    pytest.param({"prompt": "a", "max_tokens": 10**6}, "TPQ_MAX_TOKENS_LIMIT", id="max-tokens-over"),
    pytest.param({"prompt": "a", "temperature": math.nan}, "temperature", id="nan-temperature"),
    pytest.param({"prompt": "x" * 101}, "TPQ_MAX_PROMPT_CHARS", id="prompt-too-long"),
    pytest.param({"prompt": "a", "temprature": 0.5}, "sampling.temprature: unknown field", id="unknown-kwarg"),
    pytest.param({"prompt": "a", "request_id": "a/b"}, "request_id", id="bad-id-chars"),
    pytest.param({"prompt": "a", "request_id": "x" * 200}, "request_id", id="id-too-long"),
    pytest.param({"prompt": "a", "deadline_unix_s": 1.0}, "in the past", id="deadline-past"),
    pytest.param({"prompt": "a", "deadline_unix_s": math.inf}, "deadline_unix_s", id="deadline-inf"),
    pytest.param({"prompt": "a", "session_id": ""}, "session_id", id="empty-session"),
    pytest.param({"prompt": "a", "priority": "now"}, "priority", id="bad-priority"),
    pytest.param({"prompt": "a", "wait_s": -1}, "wait_s", id="negative-wait"),
]


@pytest.mark.parametrize(("kwargs", "needle"), BAD_SUBMITS)
def test_bad_submit_raises_before_writing(redis_url, raw, kwargs, needle):
    with make_client(redis_url, max_prompt_chars=100) as c:
        with pytest.raises(InvalidRequestError) as info:
            c.submit(**kwargs)
    assert needle in str(info.value)
    assert raw.dbsize() == 0


def test_queue_full_at_depth_limit(redis_url, raw):
    with make_client(redis_url, max_queue_depth=3) as c:
        for i in range(3):
            c.submit(f"p{i}")
        with pytest.raises(QueueFull, match="'batch' is full: 3 jobs queued, limit 3") as info:
            c.submit("one too many")
        assert (info.value.queue_name, info.value.depth, info.value.limit) == ("batch", 3, 3)
        assert c.submit("other queue", session_id="s").created  # another queue has room
    assert raw.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 3


def test_resubmitting_existing_id_is_fine_when_queue_full(redis_url):
    with make_client(redis_url, max_queue_depth=1) as c:
        c.submit("p", request_id="only")
        assert not c.submit("p", request_id="only").created


def test_wait_s_waits_then_raises(redis_url):
    with make_client(redis_url, max_queue_depth=1) as c:
        c.submit("p")
        started = time.monotonic()
        with pytest.raises(QueueFull, match="after waiting 0.3 s"):
            c.submit("q", wait_s=0.3)
        assert 0.3 <= time.monotonic() - started < 2.0


def test_wait_s_succeeds_when_room_appears(redis_url, raw):
    with make_client(redis_url, max_queue_depth=1) as c:
        c.submit("p")
        timer = threading.Timer(0.2, lambda: raw.lpop(keys.rq_queue_key(keys.BATCH_QUEUE)))
        timer.start()
        try:
            assert c.submit("q", wait_s=5).created
        finally:
            timer.join()


def test_submit_batch_of_1000(client, raw):
    requests = [
        {"prompt": f"p{i}", "session_id": f"s{i % 50}"} if i % 2 else GenerationRequest(prompt=f"b{i}")
        for i in range(1000)
    ]
    batch = client.submit_batch(requests)
    assert isinstance(batch, BatchHandle) and len(batch) == 1000 and len(set(batch.ids)) == 1000
    for i, handle in enumerate(batch.handles):
        assert handle.created
        if i % 2:
            assert handle.queue_name == keys.shard_queue_name(keys.shard_for_session(f"s{i % 50}", 64))
        else:
            assert handle.queue_name == keys.BATCH_QUEUE
    depths = {}
    for h in batch:
        depths[h.queue_name] = depths.get(h.queue_name, 0) + 1
    for queue_name, depth in depths.items():
        assert raw.llen(keys.rq_queue_key(queue_name)) == depth
    fields = raw_job(raw, batch.ids[1])
    assert int(fields["retries_left"]) == client.settings.job_retries
    assert int(fields["result_ttl"]) == client.settings.result_ttl_s
    assert Queue("batch", connection=raw, serializer=JSONSerializer).count == 500


def test_bad_request_in_batch_enqueues_nothing(client, raw):
    requests = [{"prompt": f"p{i}"} for i in range(10)]
    requests[7] = {"prompt": "x", "sampling": {"temperature": -1}}
    with pytest.raises(InvalidRequestError, match="batch request 7: .*sampling.temperature"):
        client.submit_batch(requests)
    requests[7] = {"prompt": "x", "request_id": "dup"}
    requests[3] = {"prompt": "y", "request_id": "dup"}
    with pytest.raises(InvalidRequestError, match="batch request 7: .*repeats that of request 3"):
        client.submit_batch(requests)
    assert raw.dbsize() == 0


def test_batch_size_limit(redis_url, raw):
    with make_client(redis_url, max_batch_size=5) as c:
        with pytest.raises(InvalidRequestError, match="at most 5 requests"):
            c.submit_batch({"prompt": "p"} for _ in range(6))
        assert len(c.submit_batch([{"prompt": "p"}] * 5)) == 5
    assert raw.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 5


def test_batch_skips_existing_ids(client, raw):
    client.submit("first", request_id="a")
    batch = client.submit_batch([{"prompt": "x", "request_id": "a"}, {"prompt": "y", "request_id": "b"}])
    assert batch.ids == ["a", "b"] and [h.created for h in batch] == [False, True]
    assert batch.handles[0].request.prompt == "first"
    assert raw.lrange(keys.rq_queue_key(keys.BATCH_QUEUE), 0, -1) == [b"a", b"b"]


def test_batch_queue_full_enqueues_nothing(redis_url, raw):
    with make_client(redis_url, max_queue_depth=4) as c:
        c.submit("p")
        with pytest.raises(QueueFull, match="1 jobs queued, adding 4, limit 4"):
            c.submit_batch([{"prompt": "q"}] * 4)
        assert len(c.submit_batch([{"prompt": "q"}] * 3)) == 3
    assert raw.llen(keys.rq_queue_key(keys.BATCH_QUEUE)) == 4


def test_empty_batch(client, raw):
    assert len(client.submit_batch([])) == 0 and raw.dbsize() == 0


def test_enqueue_rate_of_10k_batch(client, raw):
    requests = [{"prompt": f"prompt {i}", "session_id": f"s{i % 500}", "sampling": {"max_tokens": 64}}
                for i in range(10_000)]
    started = time.perf_counter()
    batch = client.submit_batch(requests)
    elapsed = time.perf_counter() - started
    assert len(batch) == 10_000
    assert sum(raw.llen(keys.rq_queue_key(q)) for q in keys.shard_queue_names(64)) == 10_000
    print(f"\nsubmit_batch of 10,000 requests: {elapsed:.2f} s, {10_000 / elapsed:,.0f} jobs/s")


def test_batch_of_only_existing_ids_enqueues_nothing(client, raw):
    client.submit_batch([{"prompt": "x", "request_id": "a"}, {"prompt": "y", "request_id": "b"}])
    again = client.submit_batch([{"prompt": "x", "request_id": "b"}, {"prompt": "y", "request_id": "a"}])
    assert again.ids == ["b", "a"] and not any(h.created for h in again)
    assert raw.lrange(keys.rq_queue_key(keys.BATCH_QUEUE), 0, -1) == [b"a", b"b"]


def test_batch_retries_when_an_id_is_created_concurrently(client, raw, monkeypatch):
    """A job created by another client between the existence check and EXEC aborts the
    transaction (WATCH); the retry sees it and skips it, so no id is enqueued twice."""
    real_wait = client._enqueuer.wait_for_room
    calls = []

    def racing_wait(needed, wait_s):
        if not calls:
            with make_client(client.url) as other:
                other.submit("theirs", request_id="b")
        calls.append(needed)
        real_wait(needed, wait_s)

    monkeypatch.setattr(client._enqueuer, "wait_for_room", racing_wait)
    batch = client.submit_batch([{"prompt": "x", "request_id": "a"}, {"prompt": "y", "request_id": "b"}])
    assert len(calls) == 2 and [h.created for h in batch] == [True, False]
    assert batch.handles[1].request.prompt == "theirs"
    assert raw.lrange(keys.rq_queue_key(keys.BATCH_QUEUE), 0, -1) == [b"b", b"a"]


def test_producer_never_imports_torch_or_the_worker():
    import subprocess
    import sys

    code = "import sys, producer; bad = {'torch', 'gpu_worker'} & set(sys.modules); assert not bad, bad"
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


def test_a_job_hash_without_job_data_gives_clear_errors_not_rqs(client, raw):
    """A stub: a few fields written into a hash that a crashed Redis lost (rq: 'Unexpected job format')."""
    raw.hset(keys.rq_job_key("stub"), mapping={keys.JOB_ATTEMPTS_FIELD: 1, keys.JOB_LOGGED_AT_START_FIELD: 0})
    with pytest.raises(InvalidRequestError, match="holds no readable tpqueue request"):
        client.job("stub")
    again = client.submit("hi", request_id="stub")
    assert not again.created and again.request.prompt == "hi"
    [batched] = client.submit_batch([{"prompt": "hi", "request_id": "stub"}]).handles
    assert not batched.created
