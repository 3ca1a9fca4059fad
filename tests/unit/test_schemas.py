"""common.schemas and common.jobs: request validation, limits, the client/worker wire protocol."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings as hyp_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common import keys
from common.errors import InvalidRequestError
from common.jobs import (
    GENERATE_FUNC,
    decode_stream_message,
    encode_stream_message,
    job_kwargs,
    queue_for,
    request_from_job_kwargs,
)
from common.results import ChatMessage, FinishReason, StreamEnd, TokenEvent
from common.sampling import SamplingParams
from common.schemas import GenerationRequest, check_limits, parse_request
from common.settings import get_settings


def test_prompt_request_defaults_to_batch_priority():
    r = GenerationRequest(prompt="hi")
    assert r.priority == "batch" and r.sampling == SamplingParams() and r.request_id is None


def test_session_request_defaults_to_interactive_priority():
    assert GenerationRequest(prompt="hi", session_id="s").priority == "interactive"
    assert GenerationRequest(prompt="hi", session_id="s", priority="batch").priority == "batch"


def test_messages_request():
    r = parse_request({"messages": [{"role": "user", "content": "hello"}]})
    assert r.messages == (ChatMessage(role="user", content="hello"),)
    assert r.input_chars == 5


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "not both"),
        ({}, "neither"),
        ({"prompt": ""}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"prompt": "a", "request_id": "bad id!"}, "request_id"),
        ({"prompt": "a", "session_id": ""}, "session_id"),
        ({"prompt": "a", "priority": "urgent"}, "priority"),
        ({"prompt": "a", "sampling": {"temperature": math.nan}}, "sampling.temperature"),
        ({"prompt": "a", "sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"prompt": "a", "sampling": {"tempurature": 1}}, "accepted: temperature"),
        ({"prompt": "a", "deadline_unix_s": math.inf}, "deadline_unix_s"),
        ({"prompt": "a", "colour": "red"}, "colour: unknown field"),
    ],
)
def test_bad_requests_get_clear_errors(data, needle):
    with pytest.raises(InvalidRequestError, match="invalid request") as info:
        parse_request(data)
    assert needle in str(info.value)


def test_parse_request_does_not_echo_values():
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": "a", "session_id": 12345678})
    assert "12345678" not in str(info.value)


def test_request_is_frozen():
    r = GenerationRequest(prompt="hi")
    with pytest.raises(ValidationError):
        r.prompt = "changed"  # type: ignore[misc]


def test_check_limits():
    s = get_settings(max_prompt_chars=10, max_tokens_limit=5)
    check_limits(GenerationRequest(prompt="x" * 10, sampling={"max_tokens": 5}), s)
    with pytest.raises(InvalidRequestError, match="11 characters; at most 10"):
        check_limits(GenerationRequest(prompt="x" * 11), s)
    msgs = [{"role": "user", "content": "x" * 6}, {"role": "assistant", "content": "y" * 6}]
    with pytest.raises(InvalidRequestError, match="messages total 12"):
        check_limits(GenerationRequest(messages=msgs), s)
    with pytest.raises(InvalidRequestError, match="max_tokens is 6; at most 5"):
        check_limits(GenerationRequest(prompt="x", sampling={"max_tokens": 6}), s)


def test_a_default_max_tokens_over_the_limit_becomes_the_limit():
    s = get_settings(max_tokens_limit=100)
    capped = check_limits(GenerationRequest(prompt="x"), s)
    assert capped.sampling.max_tokens == 100
    assert parse_request(capped.model_dump(mode="json")).sampling.max_tokens == 100  # what the worker reads
    assert check_limits(GenerationRequest(prompt="x"), get_settings()).sampling.max_tokens == 256
    with pytest.raises(InvalidRequestError, match="max_tokens is 256; at most 100"):
        check_limits(GenerationRequest(prompt="x", sampling={"max_tokens": 256}), s)  # asked for: refused


# ---------------------------------------------------------------- hypothesis: garbage in, clean errors out

_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)
)
_json = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_field_names = st.sampled_from(
    ["request_id", "prompt", "messages", "session_id", "sampling", "priority", "deadline_unix_s", "extra"]
)
_sampling_names = st.sampled_from(list(SamplingParams.model_fields) + ["bogus"])
_near_valid = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(max_size=30), _json),
        "messages": st.one_of(
            st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "x"]), "content": st.text()}), max_size=3),
            _json,
        ),
        "session_id": st.one_of(st.text(max_size=30), _json),
        "request_id": st.one_of(st.text(max_size=30), _json),
        "priority": st.one_of(st.sampled_from(["interactive", "batch", "x"]), _json),
        "sampling": st.one_of(st.dictionaries(_sampling_names, _json, max_size=4), _json),
        "deadline_unix_s": _json,
    },
)


@hyp_settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.dictionaries(_field_names, _json, max_size=6), _near_valid))
def test_garbage_never_crashes(data):
    limits = get_settings(max_prompt_chars=50, max_tokens_limit=100)
    try:
        request = parse_request(data)
        check_limits(request, limits)
    except InvalidRequestError:
        return
    # Whatever validates survives the wire.
    assert request_from_job_kwargs(json.loads(json.dumps(job_kwargs(request)))) == request


@hyp_settings(max_examples=200, deadline=None)
@given(st.one_of(_json, st.dictionaries(_field_names, _json, max_size=6), _near_valid))
def test_model_validate_raises_only_validation_error(data):
    try:
        GenerationRequest.model_validate(data)
    except ValidationError:
        pass


# ---------------------------------------------------------------- the wire protocol (common.jobs)


def test_generate_func_is_a_dotted_worker_name():
    assert GENERATE_FUNC == "gpu_worker.serve.jobs.generate"


def test_job_kwargs_round_trip_through_json():
    r = GenerationRequest(
        request_id="abc", messages=[{"role": "user", "content": "héllo"}], session_id="s",
        sampling={"temperature": 0, "stop": ["\n"], "seed": 7}, deadline_unix_s=2e9,
    )
    kwargs = job_kwargs(r)
    assert set(kwargs) == {"request"}
    wire = json.loads(json.dumps(kwargs))
    assert request_from_job_kwargs(wire) == r


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (None, "mapping"),
        ([], "mapping"),
        ({}, "got keys: none"),
        ({"request": {"prompt": "x"}, "evil": 1}, "evil"),
        ({"request": "x"}, "must be a mapping"),
        ({"request": {"prompt": ""}}, "invalid job request"),
    ],
)
def test_malformed_job_kwargs(kwargs, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        request_from_job_kwargs(kwargs)


def test_queue_for():
    assert queue_for(GenerationRequest(prompt="x"), 64) == keys.BATCH_QUEUE
    r = GenerationRequest(prompt="x", session_id="alice")
    assert queue_for(r, 64) == keys.shard_queue_name(keys.shard_for_session("alice", 64))
    assert queue_for(r, 1) == "gen.0"


def test_stream_messages_round_trip():
    e = TokenEvent(request_id="j1", index=3, token_id=42, text="é", finish_reason=FinishReason.STOP)
    data = encode_stream_message(e)
    assert isinstance(data, bytes) and json.loads(data)["finish_reason"] == "stop"
    assert decode_stream_message(data) == e
    assert decode_stream_message(data.decode()) == e
    end = StreamEnd(request_id="j1", num_tokens=4, finish_reason=FinishReason.STOP)
    assert decode_stream_message(encode_stream_message(end)) == end


@pytest.mark.parametrize("data", [b"", b"not json", b"{}", b'{"request_id":"j","index":-1,"token_id":1,"text":""}',
                                  b'{"kind":"end","request_id":"j","num_tokens":-1}', 5])
def test_bad_stream_messages_raise_clearly(data):
    with pytest.raises(InvalidRequestError, match="stream message"):
        decode_stream_message(data)
