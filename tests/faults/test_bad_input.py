"""Bad input, fuzzed: the client refuses it before Redis; a worker fails it cleanly and keeps serving.

Two doors, two kinds of test:

- The client (``parse_request``, ``Client.build_request/submit/submit_batch``):
  random and deliberately broken requests must be refused with
  :class:`InvalidRequestError` naming the field, and no command may reach
  Redis (the test server's command counters are compared).
- The queue, written to directly (as anyone who can write to Redis could):
  garbage job data, invalid JSON or UTF-8, wrong envelopes and types,
  unknown fields, NaN/negative/huge values, forbidden functions and
  callbacks, corrupt hash fields, missing hashes, ids that are not tpqueue
  ids. Rank 0's real admission path (``JobPump`` with its ``BatchWorker``)
  runs against the real redis-server; only the engine is replaced, by a
  stub that records the ``Admit`` commands. Every bad job must end FAILED
  with a short, clear message and an error ``StreamEnd``, every good one be
  admitted, the claimed list end empty, and nothing be imported or
  unpickled. The slow test then writes a sample of the same payloads into
  the queues of a real stack (tiny model) and checks the group fails them,
  keeps its incarnation (never crashed or restarted) and keeps serving.

The number of cases tried is printed at the end of the module ("bad-input
cases tried: ...").
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from threading import Thread
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq.job import Job
from rq.serializers import JSONSerializer

from common import keys
from common.errors import InvalidRequestError, JobFailed
from common.jobs import GENERATE_FUNC, LOG_FIELD, decode_stream_message, job_kwargs
from common.results import StreamEnd
from common.schemas import MAX_MESSAGES, GenerationRequest, check_limits, parse_request
from common.settings import Settings, get_settings
from gpu_worker.serve.job_pump import MAX_ERROR_CHARS
from producer import Client
from producer.job_state import JobState, ResultWatch
from tests.doubles import StubEngineLoop
from tests.pipeline_checks import wait_until

LIMITS = {"max_prompt_chars": 2000, "max_tokens_limit": 512, "max_batch_size": 8}
MAX_MESSAGE_CHARS = 600  # a refusal is one short message: it never echoes a prompt back
PLANTED_MODULE = "tests.faults.planted_module_never_imported"

CASES: Counter[str] = Counter()  # what was tried, by kind; printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_case_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if CASES:
        line = f"bad-input cases tried: {sum(CASES.values())} ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))})"
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        with capture.global_and_fixture_disabled():
            if reporter is not None:
                reporter.write_line(f"\n{line}")
            else:
                print(line)


def limited_settings(url: str | None = None) -> Settings:
    return get_settings(redis_url=url, **LIMITS)


# ------------------------------------------------------------------ strategies

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=40)
bad_floats = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-300, 1e300, -0.5])
json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
surrogate_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=5),
                           st.sampled_from(["\ud800", "\udfff", "\udc80", "\ud83d"]), st.text(max_size=5))


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A request dict the client and the worker both accept (within LIMITS)."""
    data: dict[str, Any] = {"request_id": draw(ids)}
    if draw(st.booleans()):
        data["prompt"] = draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60))
    else:
        data["messages"] = draw(st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["system", "user", "assistant"]),
            "content": st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
        }), min_size=1, max_size=4))
    if draw(st.booleans()):
        data["session_id"] = draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20))
    sampling = draw(st.fixed_dictionaries({}, optional={
        "temperature": st.sampled_from([0.0, 0.5, 1.0, 2.0]),
        "top_k": st.integers(0, 1000),
        "top_p": st.floats(0.01, 1.0),
        "seed": st.integers(0, 2**63 - 1),
        "max_tokens": st.integers(1, LIMITS["max_tokens_limit"]),
        "stop": st.lists(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8), max_size=3),
        "stop_token_ids": st.lists(st.integers(0, 100_000), max_size=3),
        "ignore_eos": st.booleans(),
    }))
    if sampling:
        data["sampling"] = sampling
    if draw(st.booleans()):
        data["priority"] = draw(st.sampled_from(["interactive", "batch"]))
    return data


# Each breaks one valid request in one way; the message must name ``field``.
Mutation = tuple[str, str, Callable[[dict[str, Any]], None]]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = data
        for part in parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[last] = value
    return apply


def _prompt(value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        data.pop("messages", None)
        data["prompt"] = value
    return apply


def _messages(value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(data: dict[str, Any]) -> None:
        data.pop("prompt", None)
        data["messages"] = value
    return apply


def _both(data: dict[str, Any]) -> None:
    data["prompt"], data["messages"] = "hi", [{"role": "user", "content": "hi"}]


def _neither(data: dict[str, Any]) -> None:
    data.pop("prompt", None)
    data.pop("messages", None)


@st.composite
def mutations(draw: st.DrawFn, client_side: bool = False) -> Mutation:
    """(name, field the error must name, how to break a request); ``client_side`` adds what only the client refuses."""
    huge = LIMITS["max_prompt_chars"] + draw(st.integers(1, 50_000))
    bad_id = draw(st.sampled_from(["", "a" * 129, "a:b", "a b", "a.b", "é", "a/b", "\x00"]) | surrogate_text)
    options: list[Mutation] = [
        ("unknown top-level field", draw(st.sampled_from(["foo", "func", "model", "__class__"])), None),
        ("unknown sampling field", "sampling", None),
        ("prompt of a wrong type", "prompt", _prompt(draw(st.integers() | st.lists(st.text(), max_size=2)
                                                          | st.dictionaries(st.text(max_size=3), st.text(), max_size=2)))),
        ("empty prompt", "prompt", _prompt("")),
        ("prompt with a lone surrogate", "prompt", _prompt(draw(surrogate_text))),
        ("prompt over the limit", "prompt", _prompt("x" * huge)),
        ("messages over the limit", "messages", _messages([{"role": "user", "content": "y" * huge}])),
        ("too many messages", "messages",
         _messages([{"role": "user", "content": ""}] * (MAX_MESSAGES + 1))),
        ("empty messages", "messages", _messages([])),
        ("message with a bad role", "messages", _messages([{"role": draw(st.sampled_from(["root", "", "tool", 1])),
                                                            "content": "x"}])),
        ("message without content", "messages", _messages([{"role": "user"}])),
        ("message with an extra key", "messages", _messages([{"role": "user", "content": "x", "name": "n"}])),
        ("message content with a surrogate", "messages",
         _messages([{"role": "user", "content": draw(surrogate_text)}])),
        ("message content of a wrong type", "messages", _messages([{"role": "user", "content": draw(st.integers())}])),
        ("messages not a list", "messages", _messages(draw(st.integers() | st.just({"role": "user"})))),
        ("both prompt and messages", "prompt", _both),
        ("neither prompt nor messages", "prompt", _neither),
        ("bad temperature", "temperature", _set("sampling.temperature", draw(bad_floats | st.just("hot")
                                                                           | st.floats(101, 1e6)))),
        ("underflowing temperature", "temperature", _set("sampling.temperature", draw(st.sampled_from(
            [1e-40, 5e-324, 1e-20, 1e-9])))),
        ("bad top_p", "top_p", _set("sampling.top_p", draw(st.sampled_from([0.0, 1.5, math.nan, -0.1, math.inf])))),
        ("negative top_k", "top_k", _set("sampling.top_k", draw(st.integers(max_value=-1)))),
        ("bad max_tokens", "max_tokens", _set("sampling.max_tokens", draw(st.sampled_from(
            [0, -1, -2**40, 1.5, math.nan, math.inf, "many", None, LIMITS["max_tokens_limit"] + 1, 2**64])))),
        ("bad seed", "seed", _set("sampling.seed", draw(st.sampled_from([-1, 2**63, 2**80, 1.5, math.nan])))),
        ("bad stop", "stop", _set("sampling.stop", draw(st.sampled_from(
            [[""], ["x" * 257], ["s"] * 17, [1], "stop"]) | st.lists(surrogate_text, min_size=1, max_size=2)))),
        ("negative stop_token_ids", "stop_token_ids", _set("sampling.stop_token_ids", [draw(st.integers(max_value=-1))])),
        ("bad ignore_eos", "ignore_eos", _set("sampling.ignore_eos", draw(st.sampled_from(["maybe", 2, [True]])))),
        ("sampling not a mapping", "sampling", _set("sampling", draw(st.sampled_from([[1], "greedy", 3])))),
        ("bad request_id", "request_id", _set("request_id", bad_id)),
        ("request_id of a wrong type", "request_id", _set("request_id", draw(st.integers() | st.lists(ids, max_size=1)))),
        ("bad session_id", "session_id", _set("session_id", draw(st.sampled_from(["", "s" * 1025]) | surrogate_text))),
        ("bad priority", "priority", _set("priority", draw(st.sampled_from(["urgent", "", 1, "INTERACTIVE"])))),
        ("bad deadline", "deadline_unix_s", _set("deadline_unix_s", draw(st.sampled_from(
            [math.nan, math.inf, -math.inf, "tomorrow", [1.0]])))),
    ]
    if client_side:  # refused by the client; a worker still decodes it (and ends the job "deadline")
        options.append(("deadline in the past", "deadline_unix_s",
                        _set("deadline_unix_s", draw(st.sampled_from([-1.0, 0.0, 1.0, time.time() - 1])))))
    name, field, apply = draw(st.sampled_from(options))
    if name == "unknown top-level field":
        apply = _set(field, draw(json_values))
    elif name == "unknown sampling field":
        unknown = draw(st.sampled_from(["temp", "max_new_tokens", "logits_processor"]))
        field, apply = f"sampling.{unknown}", _set(f"sampling.{unknown}", draw(json_values))
    return name, field, apply


@st.composite
def broken_requests(draw: st.DrawFn, client_side: bool = False) -> tuple[dict[str, Any], str, str]:
    data = draw(valid_requests())
    name, field, apply = draw(mutations(client_side))
    apply(data)
    return data, name, field


def assert_clear(message: str, field: str) -> None:
    assert field.split(".")[-1] in message, f"the message does not name {field!r}: {message}"
    assert len(message) <= MAX_MESSAGE_CHARS, f"the message is {len(message)} characters long: {message[:200]}..."


# ------------------------------------------------------------------ the client


class CommandCounter:
    """Counts the commands a redis-server has processed, from INFO commandstats (INFO itself excluded)."""

    def __init__(self, url: str) -> None:
        self.conn = redis.Redis.from_url(url)

    def snapshot(self) -> dict[str, int]:
        stats = self.conn.info("commandstats")
        return {name: value["calls"] for name, value in stats.items() if name != "cmdstat_info"}

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def quiet_client(redis_url: str) -> Iterator[tuple[Client, CommandCounter]]:
    client = Client(redis_url, settings=limited_settings(redis_url))
    counter = CommandCounter(redis_url)
    client.redis.ping()  # the client's lazy connection opens here, not inside a measured call
    yield client, counter
    client.close()
    counter.close()


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@FUZZ
@given(case=broken_requests())
def test_parse_request_refuses_every_broken_request_naming_the_field(case: tuple[dict[str, Any], str, str]) -> None:
    data, name, field = case
    CASES["client: parse_request + limits, broken on purpose"] += 1
    with pytest.raises(InvalidRequestError) as refused:
        check_limits(parse_request(data), limited_settings())
    assert_clear(str(refused.value), field)


@FUZZ
@given(data=st.dictionaries(st.sampled_from([*GenerationRequest.model_fields, "extra", "sampling"]), json_values,
                            max_size=6) | json_values)
def test_parse_request_on_random_data_accepts_or_refuses_clearly(data: Any) -> None:
    CASES["client: parse_request, random data"] += 1
    try:
        request = parse_request(data)
    except InvalidRequestError as refused:
        assert len(str(refused)) <= 4 * MAX_MESSAGE_CHARS
        return
    assert isinstance(request, GenerationRequest)
    assert GenerationRequest.model_validate_json(request.model_dump_json()) == request  # it survives the wire


@FUZZ
@given(case=broken_requests(client_side=True))
def test_submit_refuses_broken_requests_without_touching_redis(
    quiet_client: tuple[Client, CommandCounter], case: tuple[dict[str, Any], str, str]
) -> None:
    client, counter = quiet_client
    data, name, field = case
    CASES["client: submit, broken on purpose"] += 1
    kwargs = {k: v for k, v in data.items() if k != "sampling"}
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        kwargs["sampling"] = sampling  # reaches the schema as an unknown sampling field named "sampling"
        sampling = {}
    before = counter.snapshot()
    with pytest.raises(InvalidRequestError) as refused:
        client.submit(**kwargs, **sampling)
    assert counter.snapshot() == before, f"{name}: submit sent commands to Redis before refusing"
    assert_clear(str(refused.value), field)


@settings(FUZZ, max_examples=150)
@given(good=st.lists(valid_requests(), min_size=0, max_size=5), case=broken_requests(client_side=True), data=st.data())
def test_submit_batch_refuses_a_batch_with_one_broken_request(
    quiet_client: tuple[Client, CommandCounter], good: list[dict[str, Any]],
    case: tuple[dict[str, Any], str, str], data: st.DataObject,
) -> None:
    client, counter = quiet_client
    bad, name, field = case
    CASES["client: submit_batch, one broken request"] += 1
    position = data.draw(st.integers(0, len(good)))
    batch = [*good[:position], bad, *good[position:]]
    for i, item in enumerate(batch):
        item["request_id"] = item.get("request_id") if i == position else f"ok-{i}-{uuid.uuid4().hex}"
    before = counter.snapshot()
    with pytest.raises(InvalidRequestError) as refused:
        client.submit_batch(batch)
    assert counter.snapshot() == before, f"{name}: submit_batch sent commands to Redis before refusing"
    message = str(refused.value)
    assert f"batch request {position}" in message
    assert_clear(message.split(": ", 1)[1], field)


def test_submit_batch_refuses_too_many_and_non_lists_without_touching_redis(
    quiet_client: tuple[Client, CommandCounter]
) -> None:
    client, counter = quiet_client
    before = counter.snapshot()
    too_many = [{"prompt": f"p{i}"} for i in range(LIMITS["max_batch_size"] + 1)]
    for batch, words in [(too_many, "at most 8 requests"), ("a string", "iterable of requests"),
                         ({"prompt": "x"}, "iterable of requests"), ([42], "must be a mapping"),
                         ([{"prompt": "x", "request_id": "same"}, {"prompt": "y", "request_id": "same"}], "repeats")]:
        CASES["client: submit_batch, bad shape"] += 1
        with pytest.raises(InvalidRequestError, match=words):
            client.submit_batch(batch)  # type: ignore[arg-type]
    assert counter.snapshot() == before


# ------------------------------------------------------------------ the queue, written directly


class WebhookTrap(HTTPServer):
    """An HTTP server on a free local port that counts every request it gets (it should get none)."""

    def __init__(self) -> None:
        trap = self
        self.hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                trap.hits.append(self.path)
                self.send_response(200)
                self.end_headers()

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hook"
        Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def webhook_trap() -> Iterator[WebhookTrap]:
    trap = WebhookTrap()
    yield trap
    trap.shutdown()
    trap.server_close()


def job_fields(conn: redis.Redis, job_id: str, queue: str, data: bytes, **overrides: bytes | str) -> dict[str, Any]:
    """The hash rq writes for a tpqueue job, with ``data`` (and any field) replaced."""
    job = Job.create(GENERATE_FUNC, kwargs={}, connection=conn, serializer=JSONSerializer,
                     origin=queue, failure_ttl=3600, result_ttl=3600)  # any id: the hash does not hold it
    fields = job.to_dict()
    fields.update({"status": "queued", "data": data, "enqueued_at": fields["created_at"], **overrides})
    return fields


def envelope(kwargs: Any, func: Any = GENERATE_FUNC, instance: Any = None, args: Any = ()) -> bytes:
    """The JSON ``data`` of an rq job: ``[func, instance, args, kwargs]`` (compressed, as rq stores it)."""
    return zlib.compress(json.dumps([func, instance, list(args) if isinstance(args, tuple) else args, kwargs]).encode())


class Payload:
    """One raw job to plant: its id, its hash (None: no hash), and whether a worker should admit it (None: may)."""

    def __init__(self, kind: str, job_id: str, fields: dict[str, Any] | None, admit: bool | None,
                 raw_id: bytes | None = None, queue: str = keys.BATCH_QUEUE) -> None:
        self.kind, self.job_id, self.fields, self.admit, self.raw_id = kind, job_id, fields, admit, raw_id
        self.queue = queue

    def plant(self, conn: redis.Redis) -> None:
        queue = self.queue
        with conn.pipeline(transaction=False) as pipe:
            if self.fields is not None:
                pipe.hset(keys.RQ_JOB_PREFIX + self.job_id, mapping=self.fields)  # any id, valid or not
            pipe.rpush(keys.rq_queue_key(queue), self.raw_id if self.raw_id is not None else self.job_id)
            pipe.sadd("rq:queues", keys.rq_queue_key(queue))
            pipe.execute()


def expected_admission(job_id: str, kwargs: Any, settings_: Settings) -> bool:
    """What the client would say of these kwargs: the worker must admit exactly what the client accepts."""
    try:
        if not isinstance(kwargs, dict) or set(kwargs) != {"request"}:
            return False
        request = check_limits(parse_request(kwargs["request"]), settings_)
        return request.request_id == job_id
    except InvalidRequestError:
        return False


RAW_KINDS = (
    "garbage bytes", "compressed garbage", "invalid UTF-8 in JSON", "invalid JSON", "random JSON",
    "random envelope", "forbidden function", "bound instance", "positional args", "broken request",
    "random request", "request id differs", "valid request", "forbidden callback", "webhook",
    "corrupt hash field", "pickle payload", "missing hash", "not a tpqueue id", "undecodable id",
)


@st.composite
def raw_payloads(draw: st.DrawFn, conn: redis.Redis, queue: str, settings_: Settings,
                 webhook_url: str = "http://127.0.0.1:9/hook", kinds: tuple[str, ...] = RAW_KINDS) -> Payload:
    job_id = f"raw-{uuid.uuid4().hex}"
    kind = draw(st.sampled_from(kinds))
    fields = None
    admit = False
    raw_id = None
    if kind == "garbage bytes":
        data = draw(st.binary(max_size=200))
    elif kind == "compressed garbage":
        data = zlib.compress(draw(st.binary(max_size=200)))
    elif kind == "invalid UTF-8 in JSON":
        data = b'["' + GENERATE_FUNC.encode() + b'", null, [], {"request": {"prompt": "a\xff\xfe\xc3"}}]'
    elif kind == "invalid JSON":
        data = draw(st.sampled_from([b"{", b"[1,", b"NaNa", b"['single']", b'{"a": }', b"\x00"]))
    elif kind == "random JSON":
        data = json.dumps(draw(json_values)).encode()
    elif kind == "random envelope":
        data = envelope(draw(json_values), draw(json_values), draw(json_values), draw(json_values))
    elif kind == "forbidden function":
        request = {**draw(valid_requests()), "request_id": job_id}
        data = envelope(job_kwargs(GenerationRequest.model_validate(request)),
                        draw(st.sampled_from(["os.system", "builtins.eval", "subprocess.run", PLANTED_MODULE + ".run",
                                              "gpu_worker.serve.jobs.prompt_token_ids", ""])))
    elif kind == "bound instance":
        request = {**draw(valid_requests()), "request_id": job_id}
        data = envelope(job_kwargs(GenerationRequest.model_validate(request)), instance=draw(json_values.filter(
            lambda v: v is not None)))
    elif kind == "positional args":
        request = {**draw(valid_requests()), "request_id": job_id}
        data = envelope(job_kwargs(GenerationRequest.model_validate(request)),
                        args=draw(st.lists(json_values, min_size=1, max_size=3)))
    elif kind in ("broken request", "random request", "request id differs", "valid request"):
        if kind == "broken request":
            request, _, _ = draw(broken_requests())
            request = {**request, "request_id": job_id} if draw(st.booleans()) else request
        elif kind == "random request":
            request = draw(st.dictionaries(st.sampled_from([*GenerationRequest.model_fields, "x"]), json_values,
                                           max_size=6))
        else:
            request = {**draw(valid_requests()), "request_id": job_id if kind == "valid request" else draw(ids)}
        kwargs = draw(st.sampled_from([{"request": request}, {"request": request, "extra": 1}, request]))
        data = envelope(kwargs)
        admit = expected_admission(job_id, kwargs, settings_)
    elif kind == "forbidden callback":
        request = {**draw(valid_requests()), "request_id": job_id}
        data = envelope(job_kwargs(GenerationRequest.model_validate(request)))
        role = draw(st.sampled_from(["success", "failure", "stopped"]))
        fields = job_fields(conn, job_id, queue, data, **{f"{role}_callback_name": PLANTED_MODULE + ".callback"})
    elif kind == "webhook":
        request = draw(valid_requests() | st.just({"prompt": 42}))
        kwargs = {"request": {**request, "request_id": job_id}}
        data, admit = envelope(kwargs), expected_admission(job_id, kwargs, settings_)
        hooks = [{"url": webhook_url, "job_status": status, "method": "POST", "headers": None, "timeout": 3}
                 for status in ("finished", "failed")]
        fields = job_fields(conn, job_id, queue, data, webhooks=json.dumps(hooks))
    elif kind == "corrupt hash field":
        request = {**draw(valid_requests()), "request_id": job_id}
        data = envelope(job_kwargs(GenerationRequest.model_validate(request)))
        name = draw(st.sampled_from(["created_at", "enqueued_at", "status", "timeout", "result_ttl", "failure_ttl",
                                     "meta", "retries_left", "retry_intervals", "dependency_ids", "origin",
                                     "last_heartbeat", "started_at", "description", "webhooks"]))
        fields = job_fields(conn, job_id, queue, data, **{name: draw(st.binary(max_size=40))})
        admit = None  # a field the worker does not need (meta, description...) may stay corrupt
    elif kind == "pickle payload":
        import pickle
        data = pickle.dumps((GENERATE_FUNC, None, (), {"request": {"prompt": "x", "request_id": job_id}}))
    elif kind == "missing hash":
        data = b""
    elif kind == "not a tpqueue id":
        job_id = draw(st.sampled_from(["a:b", "a b", "x" * 300, "é", "rq:job:x", "../x", ""]))
        data = envelope({"request": {"prompt": "x", "request_id": "x"}})
        if job_id == "":
            raw_id = b""
    else:  # undecodable id: bytes that are not UTF-8 in the queue list
        raw_id = draw(st.sampled_from([b"\xff\xfe", b"ok\xc3", b"\x80" * 10]))
        job_id = raw_id.decode(errors="replace")
        data = b""
    if kind not in ("missing hash", "undecodable id") and fields is None:
        fields = job_fields(conn, job_id, queue, data)
    return Payload(kind, job_id, fields, admit, raw_id, queue)


@pytest.fixture
def pump(redis_url: str, tiny_llama_dir) -> Iterator[Any]:
    from gpu_worker.serve.job_pump import JobPump
    from gpu_worker.models.tokenizer import Tokenizer

    loop = StubEngineLoop()
    pump = JobPump(limited_settings(redis_url), redis_url, "fuzz", "inc-1", loop, Tokenizer(tiny_llama_dir),
                   max_in_flight=10**6)
    pump.worker.register()
    yield pump
    pump.worker.unregister()
    pump.conn.close()


def admit_all(pump: Any) -> None:
    """Run the pump's claim-and-admit step until the queues are empty (no thread: a crash raises here)."""
    while pump._claim_and_admit():
        pass


def check_outcome(conn: redis.Redis, pump: Any, payload: Payload) -> None:
    """Admitted (and started) if it should be, else FAILED with a short message in its result and stream."""
    if payload.fields is None or payload.raw_id is not None or not _is_tpq_id(payload.job_id):
        assert payload.job_id not in pump.loop.admitted
        return  # nothing rq could finish: the id is dropped (the caller checks that the claimed list is empty)
    job_key = keys.rq_job_key(payload.job_id)
    status = conn.hget(job_key, "status")
    if payload.job_id in pump.loop.admitted:
        assert payload.admit is not False, f"{payload.kind}: a bad job reached the engine"
        assert status == b"started"
        return
    assert not payload.admit, f"{payload.kind}: a valid job was not admitted"
    assert status == b"failed", f"{payload.kind}: ended {status!r}, not failed"
    watch = ResultWatch(payload.job_id)
    watch.feed(conn.xrange(keys.rq_result_key(payload.job_id)))
    failed = watch.verdict(JobState.FAILED)  # what a client's result() raises
    assert isinstance(failed, JobFailed) and failed.error, f"{payload.kind}: no failure message"
    assert len(failed.error) <= MAX_ERROR_CHARS + 40, f"{payload.kind}: message too long: {failed.error[:300]}"
    log = conn.xrange(keys.token_log(payload.job_id))
    assert log, f"{payload.kind}: no end record in the token log"
    end = decode_stream_message(log[-1][1][LOG_FIELD.encode()])
    assert isinstance(end, StreamEnd) and end.error, f"{payload.kind}: the stream did not end with an error"


def _is_tpq_id(job_id: str) -> bool:
    try:
        keys.validate_job_id(job_id)
    except InvalidRequestError:
        return False
    return True


def test_raw_payloads_fail_cleanly_and_good_jobs_are_admitted(
    redis_url: str, pump: Any, webhook_trap: WebhookTrap, caplog: pytest.LogCaptureFixture
) -> None:
    from common.pickle_guard import pickle_disabled

    conn = redis.Redis.from_url(redis_url)
    caplog.set_level(logging.ERROR)
    kinds: Counter[str] = Counter()

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        payloads = data.draw(st.lists(raw_payloads(conn, keys.BATCH_QUEUE, pump.settings, webhook_trap.url),
                                      min_size=1, max_size=6))
        conn.delete(pump.worker.claimed_key, keys.rq_queue_key(keys.BATCH_QUEUE))  # an earlier failure's leftovers
        for payload in payloads:
            payload.plant(conn)
        admit_all(pump)
        left = conn.lrange(pump.worker.claimed_key, 0, -1)
        assert left == [], f"claimed ids left behind: {left} (payloads: {[p.kind for p in payloads]})"
        for payload in payloads:
            check_outcome(conn, pump, payload)
            kinds[payload.kind] += 1

    with pickle_disabled():
        run()
    assert not any("refused pickle" in r.getMessage() for r in caplog.records), "something tried to unpickle"
    assert PLANTED_MODULE not in sys.modules
    assert webhook_trap.hits == [], "a job's webhook made the worker send an HTTP request"
    # The pump still serves: a job from the real client is admitted.
    with Client(redis_url, settings=pump.settings) as client:
        handle = client.submit(prompt="after the storm", max_tokens=4)
    admit_all(pump)
    assert handle.id in pump.loop.admitted
    CASES.update({f"raw: {kind}": n for kind, n in kinds.items()})
    assert len(kinds) >= 15, f"too few kinds of payload were drawn: {sorted(kinds)}"


# ------------------------------------------------------------------ the same, against a real stack


def draw_sample(strategy: st.SearchStrategy[Any]) -> Any:
    import warnings

    from hypothesis.errors import NonInteractiveExampleWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        return strategy.example()


@pytest.mark.slow
def test_a_real_group_fails_hostile_jobs_and_keeps_serving(
    start_stack, redis_url: str, tiny_llama_dir, webhook_trap: WebhookTrap
) -> None:
    from common.groups import read_groups
    from tests.pipeline_checks import assert_streams_match_results, collect

    start_stack(groups=1, tp=1, model=str(tiny_llama_dir))
    conn = redis.Redis.from_url(redis_url)
    stack_settings = get_settings()  # what the stack's processes read from the environment
    [before] = read_groups(conn).values()
    queues = [keys.BATCH_QUEUE, keys.shard_queue_name(3)]
    payloads: list[Payload] = []
    for i, kind in enumerate(RAW_KINDS * 3):
        payloads.append(draw_sample(raw_payloads(conn, queues[i % 2], stack_settings, webhook_trap.url, (kind,))))
    too_long = f"raw-{uuid.uuid4().hex}"  # fits TPQ_MAX_PROMPT_CHARS, not the tiny model's 512-token context
    payloads.append(Payload("longer than the model's context", too_long, job_fields(
        conn, too_long, keys.BATCH_QUEUE, envelope({"request": {"request_id": too_long, "prompt": "word " * 2000}})),
        False))
    with Client(redis_url) as client:
        before_jobs = [client.submit(prompt=f"good job {i}", temperature=0, max_tokens=8) for i in range(4)]
        for payload in payloads:
            payload.plant(conn)
        after_jobs = [client.submit(prompt=f"good job {i}", session_id=f"s{i}", temperature=0, max_tokens=8)
                      for i in range(4, 8)]
        outcomes = collect(before_jobs + after_jobs)
        readable = [p for p in payloads if p.fields is not None and p.raw_id is None and _is_tpq_id(p.job_id)]
        wait_until(lambda: all(conn.hget(keys.rq_job_key(p.job_id), "status") in (b"failed", b"finished")
                               for p in readable), 120, "every planted job to end")
        wait_until(lambda: all(conn.llen(keys.rq_queue_key(q)) == 0 for q in queues), 30, "the queues to empty")
        still_serving = client.submit(prompt="still serving?", temperature=0, max_tokens=4)
        assert still_serving.result(timeout=120).token_ids

    assert_streams_match_results(outcomes)
    [after] = read_groups(conn).values()
    assert after.incarnation == before.incarnation, "the group restarted: a bad job crashed it"
    assert conn.llen(keys.claimed_jobs("g0")) == 0
    failed = 0
    for payload in readable:
        status = conn.hget(keys.rq_job_key(payload.job_id), "status")
        if status == b"finished":
            assert payload.admit is not False, f"{payload.kind}: a bad job ran"
            continue
        assert not payload.admit, f"{payload.kind}: a valid job failed"
        watch = ResultWatch(payload.job_id)
        watch.feed(conn.xrange(keys.rq_result_key(payload.job_id)))
        verdict = watch.verdict(JobState.FAILED)
        assert isinstance(verdict, JobFailed) and 0 < len(verdict.error) <= MAX_ERROR_CHARS + 40, payload.kind
        end = decode_stream_message(conn.xrange(keys.token_log(payload.job_id))[-1][1][LOG_FIELD.encode()])
        assert isinstance(end, StreamEnd) and end.error, f"{payload.kind}: no error at the end of its stream"
        failed += 1
    too_long_error = conn.xrange(keys.rq_result_key(too_long))
    assert failed >= len(RAW_KINDS) * 2 and too_long_error
    assert webhook_trap.hits == []
    CASES["stack: planted jobs"] += len(payloads)
