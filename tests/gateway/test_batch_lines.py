"""The Batch API's line checks and output lines (producer.gateway.batch_lines): pure, no Redis."""
from __future__ import annotations

import json

from common.errors import JobFailed
from common.results import FinishReason, JobResult, Timings, Usage
from producer.gateway.batch_lines import (
    MAX_ERRORS, MAX_LINES, BatchLine, LineError, capped, is_openai_line, line_from_json, output_line, parse_lines,
    request_line_id, unrun_line, vocabulary_error,
)
from producer.gateway.errors import APIError
from producer.gateway.vocab import Vocabulary, prompt_ids_refusal

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def line(custom_id: str, url: str = CHAT, **body: object) -> str:
    fields = {"messages": [{"role": "user", "content": "hi"}]} if url == CHAT else {"prompt": "once"}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", **fields, **body}})


def data(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def result(job_id: str, text: str) -> JobResult:
    return JobResult(request_id=job_id, text=text, token_ids=[1, 2], finish_reason=FinishReason.LENGTH,
                     usage=Usage(prompt_tokens=5, cached_tokens=1, generated_tokens=2),
                     timings=Timings(queue_s=0.0, time_to_first_token_s=0.0, total_s=0.0), group="g", attempt=1)


def test_good_lines_parse_with_their_numbers_and_blank_lines_skipped():
    lines, errors = parse_lines(data(line("a", max_tokens=3), "", line("b", n=2)), CHAT, {"m"})
    assert errors == []
    assert [(b.number, b.custom_id, b.kind, b.completion.num_jobs) for b in lines] == [(1, "a", "chat", 1),
                                                                                        (3, "b", "chat", 2)]
    assert lines[0].completion.sampling == {"max_tokens": 3}
    assert lines[1].job_ids("x-3") == ["x-3-0", "x-3-1"]
    again = line_from_json(lines[1].as_json())
    assert again == lines[1]


def test_every_bad_line_is_reported_with_its_reason():
    lines, errors = parse_lines(data(line("a"), "[1]", line(""), line("a"), line("t", url=TEXT),
                                     line("big", max_tokens="5"), line("s", stream=True)), CHAT, {"m"})
    assert [b.custom_id for b in lines] == ["a"]
    assert [(e.line, e.code, e.param) for e in errors] == [
        (2, "invalid_request", None), (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"), (5, "invalid_url", "url"), (6, "invalid_value", "body.max_tokens"),
        (7, "invalid_value", "body.stream")]
    assert "line 1" in errors[2].message  # where the custom_id was first used


def test_without_an_endpoint_the_first_line_sets_it_and_models_are_checked_only_when_known():
    lines, errors = parse_lines(data(line("a", url=TEXT), line("b", url=CHAT)), None)
    assert [b.kind for b in lines] == ["text"] and [e.line for e in errors] == [2]
    _, unknown = parse_lines(data(line("a")), CHAT, {"other"})
    assert unknown[0].code == "model_not_found" and "other" in unknown[0].message


def test_file_level_errors():
    assert parse_lines(b"\xff\xfe", CHAT)[1][0].code == "invalid_file"
    assert parse_lines(b"\n\n", CHAT)[1][0].code == "empty_file"
    many = data(*[line("c")] * (MAX_LINES + 1))
    lines, errors = parse_lines(many, CHAT)
    assert lines == [] and [e.code for e in errors] == ["too_many_lines"]


def test_output_lines_are_the_endpoints_answers_and_failures_its_errors():
    [chat] = parse_lines(data(line("a", n=2)), CHAT)[0]
    out, failed = output_line(chat, "b1-1", 123, [result("b1-1-0", "x"), result("b1-1-1", "y")])
    assert not failed and out["custom_id"] == "a" and out["id"] == request_line_id("b1-1") and out["error"] is None
    body = out["response"]["body"]
    assert out["response"]["status_code"] == 200 and out["response"]["request_id"] == "b1-1"
    assert [c["message"]["content"] for c in body["choices"]] == ["x", "y"] and body["created"] == 123
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 1}}
    [text] = parse_lines(data(line("t", url=TEXT)), TEXT)[0]
    out, _ = output_line(text, "b1-2", 1, [result("b1-2", "z")])
    body = out["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "z"
    out, failed = output_line(text, "b1-2", 1, [JobFailed("job failed: boom", job_id="b1-2", error="boom")])
    assert failed and out["response"]["status_code"] == 500 and "boom" in out["response"]["body"]["error"]["message"]
    unrun = unrun_line("t", "b1-2", "batch_expired", "too late")
    assert unrun["response"] is None and unrun["error"] == {"code": "batch_expired", "message": "too late"}


def test_openai_lines_are_told_from_tpq_batch_lines():
    assert is_openai_line(json.loads(line("a")))
    assert not is_openai_line({"prompt": "x", "request_id": "r"})
    assert not is_openai_line([1])
    assert isinstance(parse_lines(data(line("a")), CHAT)[0][0], BatchLine)


def test_logprobs_and_echo_are_refused_by_name_where_they_are_not_rendered():
    _, chat_errors = parse_lines(data(line("l", logprobs=True, top_logprobs=2)), CHAT)  # as tpq batch parses
    assert [(e.line, e.code, e.param) for e in chat_errors] == [(1, "unsupported_parameter", "body.logprobs")]
    _, text_errors = parse_lines(data(line("e", url=TEXT, echo=True), line("k", url=TEXT, logprobs=1)), TEXT)
    assert [(e.line, e.code, e.param) for e in text_errors] == [
        (1, "unsupported_parameter", "body.echo"), (2, "unsupported_parameter", "body.logprobs")]
    assert "not served in local batches" in text_errors[0].message
    lines, errors = parse_lines(data(line("e", url=TEXT, echo=True), line("k", url=TEXT, logprobs=1)), TEXT,
                                rendering=True)  # as the gateway parses
    assert errors == [] and [(b.completion.echo, b.completion.logprobs) for b in lines] == [(True, None), (False, 1)]
    assert [b.renders_more for b in lines] == [True, True]
    assert [(r.echo, r.logprobs) for r in (b.record("b1-1", 0) for b in lines)] == [(True, None), (False, 1)]


VOCAB = Vocabulary("m", [f"<{i}>".encode() for i in range(100)])
UNPUBLISHED = APIError(503, "no vocabulary of m is published", code="vocabulary_unavailable")


def test_token_ids_past_the_vocabulary_are_a_line_error_naming_the_prompt():
    lines, errors = parse_lines(data(line("ok", url=TEXT, prompt=[1, 99]), line("one", url=TEXT, prompt=[5, 100]),
                                     line("many", url=TEXT, prompt=[[3], [4, 250, 100, 101, 102, 103, 104]]),
                                     line("text", url=TEXT)), TEXT, rendering=True)
    assert errors == [] and [b.reads_vocabulary for b in lines] == [True, True, True, False]
    found = [vocabulary_error(b, VOCAB) for b in lines]
    assert found[0] is None and found[3] is None
    assert [(e.line, e.code, e.param) for e in found[1:3]] == [(2, "invalid_value", "body.prompt"),
                                                                 (3, "invalid_value", "body.prompt")]
    assert found[1].message == f"line 2: {prompt_ids_refusal(VOCAB, [[5, 100]])}"
    assert "[0, 100): [100]" in found[1].message
    assert "[100, 101, 102, 103, 104] ..." in found[2].message  # the first five of six, sorted


def test_without_a_published_vocabulary_only_lines_that_render_with_it_are_refused():
    lines, errors = parse_lines(data(line("ids", url=TEXT, prompt=[5, 100]),
                                     line("echo", url=TEXT, prompt=[5], echo=True),
                                     line("lp", url=TEXT, logprobs=1), line("text-echo", url=TEXT, echo=True)),
                                TEXT, rendering=True)
    assert errors == []
    found = [vocabulary_error(b, UNPUBLISHED) for b in lines]
    assert found[0] is None  # the worker checks the ids when the line runs
    assert [(e.line, e.code, e.param) for e in found[1:3]] == [(2, "vocabulary_unavailable", "body.echo"),
                                                                 (3, "vocabulary_unavailable", "body.logprobs")]
    assert found[1].message == "line 2: no vocabulary of m is published"
    assert found[3] is None and not lines[3].reads_vocabulary  # a text prompt echoes as its own text


def test_errors_are_capped_with_a_count_of_the_rest():
    many = [LineError("invalid_value", f"line {i}", i) for i in range(1, MAX_ERRORS + 6)]
    kept = capped(many)
    assert len(kept) == MAX_ERRORS and kept[:-1] == many[:MAX_ERRORS - 1]
    assert (kept[-1].code, kept[-1].message) == ("too_many_errors", "6 more lines have errors")
    assert capped(many[:3]) == many[:3]
