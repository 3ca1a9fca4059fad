"""producer.gateway.params and records: OpenAI bodies into tpqueue's request fields, and the 400s (no I/O)."""
from __future__ import annotations

import pytest

from common.settings import get_settings
from producer.client import Client
from producer.gateway.errors import APIError
from producer.gateway.params import MAX_N, UNSUPPORTED, parse_chat, parse_completion
from producer.gateway.records import completion_id, job_ids
from producer.gateway.streaming import echoes_sent, event_id, resume_points

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(parse, body: dict) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(body)
    assert caught.value.status == 400
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}
    return caught.value


def test_a_chat_body_becomes_the_clients_fields() -> None:
    completion = parse_chat({**CHAT, "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5,
                             "seed": 3, "stop": "\n", "n": 2, "user": "u1", "top_k": 4, "ignore_eos": True,
                             "priority": "batch", "request_id": "r1", "stream": True,
                             "stream_options": {"include_usage": True}})
    assert completion.kind == "chat" and completion.model == "m" and completion.n == 2
    assert completion.inputs == [{"messages": [{"role": "user", "content": "hi"}]}]
    assert completion.sampling == {"max_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3, "top_k": 4,
                                   "ignore_eos": True, "stop": ["\n"]}
    assert (completion.session_id, completion.priority, completion.request_id) == ("u1", "batch", "r1")
    assert completion.stream and completion.include_usage and completion.num_jobs == 2


def test_session_id_wins_over_user_and_content_parts_join() -> None:
    completion = parse_chat({**CHAT, "user": "u", "session_id": "s", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "hi", "name": "ignored"}]})
    assert completion.session_id == "s"
    assert completion.inputs[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_completions_take_one_prompt_or_a_list_and_default_to_16_tokens() -> None:
    one = parse_completion({"model": "m", "prompt": "Once"})
    assert one.inputs == [{"prompt": "Once"}] and one.sampling == {"max_tokens": 16} and one.kind == "text"
    many = parse_completion({"model": "m", "prompt": ["a", "b"], "n": 3, "max_tokens": 5})
    assert many.inputs == [{"prompt": "a"}, {"prompt": "b"}] and many.num_jobs == 6


@pytest.mark.parametrize("param, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("response_format", {"type": "json_object"}), ("logit_bias", {"1": 5}),
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("prompt_logprobs", 1),
    ("best_of", 3), ("min_p", 0.1), ("suffix", "end"),
])
def test_each_unsupported_parameter_is_refused_by_name(param: str, value: object) -> None:
    assert param in UNSUPPORTED
    error = refused(parse_chat, {**CHAT, param: value})
    assert error.param == param and error.code == "unsupported_parameter" and param in error.message


@pytest.mark.parametrize("param, harmless", [
    ("tools", []), ("tool_choice", "none"), ("response_format", {"type": "text"}), ("logit_bias", {}),
    ("presence_penalty", 0), ("frequency_penalty", 0.0), ("logprobs", False), ("echo", False), ("best_of", 1),
    ("parallel_tool_calls", True), ("metadata", {"k": "v"}), ("store", False), ("some_future_field", 1),
])
def test_values_that_change_nothing_and_unknown_fields_are_ignored(param: str, harmless: object) -> None:
    assert parse_chat({**CHAT, param: harmless}).sampling == {}


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "max_tokens": "5"}, "max_tokens"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "n": MAX_N + 1}, "n"),
    ({**CHAT, "n": True}, "n"),
    ({**CHAT, "messages": []}, "messages"),
    ({"model": "m"}, "messages"),
    ({**CHAT, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "priority": "urgent"}, "priority"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": CHAT["messages"]}, "model"),
])
def test_bad_types_and_bounds_name_the_parameter(body: dict, param: str) -> None:
    assert refused(parse_chat, body).param == param


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": 7}, "prompt"),
    ({"model": "m"}, "prompt"),
])
def test_bad_completion_prompts_are_refused(body: dict, param: str) -> None:
    assert refused(parse_completion, body).param == param


def test_a_body_that_is_not_an_object_is_refused() -> None:
    refused(parse_chat, [CHAT])  # type: ignore[arg-type]


def test_the_clients_own_checks_apply_to_what_the_gateway_builds() -> None:
    from common.errors import InvalidRequestError

    completion = parse_chat({**CHAT, "max_tokens": 10**6})
    with Client(settings=get_settings(redis_url="redis://localhost:1/0")) as client:  # build_request: no I/O
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            client.build_request(**completion.inputs[0], **completion.sampling)


def test_completion_and_job_ids() -> None:
    assert completion_id("chat", None, None).startswith("chatcmpl-")
    assert completion_id("text", None, None).startswith("cmpl-")
    assert completion_id("chat", "key-1", "ignored") == "key-1"
    hashed = completion_id("chat", "a key: with spaces", None)
    assert hashed == completion_id("chat", "a key: with spaces", None) and hashed.startswith("idem-")
    assert completion_id("chat", None, "mine") == "mine"
    with pytest.raises(APIError) as caught:
        completion_id("chat", None, "not ok!")
    assert caught.value.param == "request_id"
    assert job_ids("c", 1) == ["c"] and job_ids("c", 3) == ["c-0", "c-1", "c-2"]


def test_event_ids_and_resume_points() -> None:
    assert event_id([7]) == "7" and event_id([2, -1]) == "2,-1"
    assert resume_points(None, 2) == [0, 0]
    assert resume_points("7", 1) == [8]
    assert resume_points("2,-1", 2) == [3, 0]
    assert resume_points("-2,4", 2) == [0, 5]  # -2: an echoed job whose echo was not sent yet
    assert echoes_sent("-2,-1", 2) == [False, True] and echoes_sent(None, 1) == [False]
    for bad in ("x", "1,2", "-3", "1.5"):
        with pytest.raises(APIError) as caught:
            resume_points(bad, 1)
        assert caught.value.param == "Last-Event-ID"


def test_a_chat_body_becomes_the_request_the_python_client_builds() -> None:
    from producer.async_client import AsyncClient
    from producer.gateway.completions import Completions

    settings = get_settings(redis_url="redis://localhost:1/0")
    client = AsyncClient(settings=settings)  # connects lazily: nothing here touches Redis
    try:
        service = Completions(client, None, settings)  # type: ignore[arg-type]
        completion = parse_chat({**CHAT, "n": 2, "seed": 5, "temperature": 0.5, "max_tokens": 8, "user": "u",
                                 "stop": ["END"]})
        built = [service._build(completion, i, f"c-{i}", completion.session_id) for i in range(2)]
        expected = client.build_request(messages=CHAT["messages"], session_id="u", request_id="c-0",
                                        temperature=0.5, seed=5, max_tokens=8, stop=["END"])
        assert built[0] == expected and built[0].priority == "interactive"
        assert built[1].sampling.seed == 6 and built[1].request_id == "c-1"  # n seeded choices differ, reproducibly
    finally:
        client._sync.close()


# ------------------------------------------------------------------ logprobs, echo and token-id prompts


def test_chat_logprobs_ask_the_jobs_for_top_logprobs() -> None:
    assert parse_chat({**CHAT, "logprobs": True, "top_logprobs": 5}).sampling == {"logprobs": 5}
    plain = parse_chat({**CHAT, "logprobs": True})
    assert plain.sampling == {"logprobs": 0} and plain.logprobs == 0
    off = parse_chat({**CHAT, "logprobs": False, "top_logprobs": 0})
    assert off.sampling == {} and off.logprobs is None


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 3}, "top_logprobs"),                       # without logprobs: true (as OpenAI)
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": 2}, "logprobs"),                               # chat's logprobs is a bool
    ({"echo": True}, "echo"),                                    # a completions parameter
])
def test_bad_chat_logprobs_are_refused(extra: dict, param: str) -> None:
    assert refused(parse_chat, {**CHAT, **extra}).param == param


def test_completions_logprobs_and_echo_ask_for_prompt_logprobs() -> None:
    text = parse_completion({"model": "m", "prompt": "Once", "logprobs": 20})
    assert text.sampling == {"max_tokens": 16, "logprobs": 20} and (text.logprobs, text.echo) == (20, False)
    echoed = parse_completion({"model": "m", "prompt": "Once", "logprobs": 1, "echo": True, "max_tokens": 1})
    assert echoed.sampling == {"max_tokens": 1, "logprobs": 1, "prompt_logprobs": 1} and echoed.echo
    assert parse_completion({"model": "m", "prompt": "Once", "echo": True}).sampling == {"max_tokens": 16}


def test_max_tokens_zero_with_echo_runs_one_token_and_shows_none() -> None:
    zero = parse_completion({"model": "m", "prompt": "Once", "logprobs": 0, "echo": True, "max_tokens": 0})
    assert zero.prompt_only and zero.sampling["max_tokens"] == 1 and zero.sampling["prompt_logprobs"] == 0
    assert refused(parse_completion, {"model": "m", "prompt": "Once", "max_tokens": 0}).param == "max_tokens"


def test_token_id_prompts_become_prompt_token_ids() -> None:
    one = parse_completion({"model": "m", "prompt": list(range(200))})  # one prompt, however many ids
    assert one.inputs == [{"prompt_token_ids": list(range(200))}]
    many = parse_completion({"model": "m", "prompt": [[1, 2], [3]], "n": 2})
    assert many.inputs == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}] and many.num_jobs == 4
    with Client(settings=get_settings(redis_url="redis://localhost:1/0")) as client:  # build_request: no I/O
        request = client.build_request(**many.inputs[0], temperature=0)
    assert request.prompt_token_ids == (1, 2) and request.prompt is None


@pytest.mark.parametrize("extra, param", [
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [True, 2]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [[1]] * 65}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "top_logprobs": 2}, "top_logprobs"),        # a chat parameter
    ({"prompt": "x", "prompt_logprobs": 2}, "prompt_logprobs"),  # vLLM's: use echo + logprobs
    ({"prompt": "x", "echo": "yes"}, "echo"),
])
def test_bad_completions_logprobs_and_token_prompts_are_refused(extra: dict, param: str) -> None:
    assert refused(parse_completion, {"model": "m", **extra}).param == param
