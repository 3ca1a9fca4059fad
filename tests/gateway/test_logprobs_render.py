"""OpenAI's logprobs and echo shapes built from tpqueue's results, chunks and stream events (no I/O)."""
from __future__ import annotations


import pytest

from common.results import FinishReason, JobResult, StreamEnd, Timings, TokenEvent, TokenLogprob, Usage
from producer.gateway.logprobs import chat_logprobs, text_choice_logprobs
from producer.gateway.records import CompletionRecord
from producer.gateway.responses import chunk, completion_response
from producer.gateway.vocab import Vocabulary

# ids: 0 "<|im_end|>" (special), 1 " caf", 2 and 3 the two bytes of "é", 4 "Hello", 5 " world", 6 "!"
VOCAB = Vocabulary("m", [b"<|im_end|>", b" caf", b"\xc3", b"\xa9", b"Hello", b" world", b"!"], special_ids=[0])
PROMPT = [TokenLogprob(token_id=4), TokenLogprob(token_id=5, logprob=-1.25, top_logprobs=[(6, -0.5), (5, -1.25)])]
GENERATED = [TokenLogprob(token_id=1, logprob=-0.75, top_logprobs=[(1, -0.75), (6, -2.0)]),
             TokenLogprob(token_id=2, logprob=-0.125, top_logprobs=[(2, -0.125), (3, -3.0)]),
             TokenLogprob(token_id=3, logprob=-0.0625, top_logprobs=[(3, -0.0625), (2, -4.0)]),
             TokenLogprob(token_id=0, logprob=-1.5, top_logprobs=[(6, -0.25), (0, -1.5)])]


def result(**fields) -> JobResult:
    return JobResult(request_id="j", text=" café", token_ids=[1, 2, 3, 0], finish_reason=FinishReason.STOP,
                     usage=Usage(prompt_tokens=2, cached_tokens=0, generated_tokens=4),
                     timings=Timings(queue_s=0, time_to_first_token_s=0, total_s=0), group="g", **fields)


def record(kind: str = "text", **fields) -> CompletionRecord:
    return CompletionRecord(id="cmpl-1", kind=kind, model="m", created=1, num_jobs=1, n=1, **fields)


def test_chat_logprobs_name_each_token_its_bytes_and_alternatives() -> None:
    answer = completion_response(record("chat", logprobs=2), [result(logprobs=GENERATED)], vocab=VOCAB)
    content = answer["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [" caf", "bytes:\\xc3", "bytes:\\xa9", "<|im_end|>"]
    assert [c["logprob"] for c in content] == [-0.75, -0.125, -0.0625, -1.5]
    assert content[1]["bytes"] == [0xC3] and bytes(sum((c["bytes"] for c in content[:3]), [])).decode() == " café"
    assert content[3]["top_logprobs"] == [{"token": "!", "logprob": -0.25, "bytes": [33]},
                                          {"token": "<|im_end|>", "logprob": -1.5, "bytes": list(b"<|im_end|>")}]
    assert completion_response(record("chat"), [result()])["choices"][0]["logprobs"] is None


def test_completions_logprobs_are_four_lists_and_include_the_chosen_token() -> None:
    answer = completion_response(record(logprobs=1), [result(logprobs=GENERATED)], vocab=VOCAB)
    choice = answer["choices"][0]
    assert choice["text"] == " café"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [" caf", "bytes:\\xc3", "bytes:\\xa9", "<|im_end|>"]
    assert logprobs["token_logprobs"] == [-0.75, -0.125, -0.0625, -1.5]
    assert logprobs["top_logprobs"][0] == {" caf": -0.75, "!": -2.0}
    assert logprobs["top_logprobs"][3] == {"!": -0.25, "<|im_end|>": -1.5}
    assert logprobs["text_offset"] == [0, 4, 4, 5]  # "é" starts at 4; the special token has no text


def test_echo_puts_the_prompt_and_its_logprobs_first() -> None:
    answer = completion_response(record(logprobs=1, echo=True), [result(logprobs=GENERATED, prompt_logprobs=PROMPT)],
                                 vocab=VOCAB, echoes=["Hello world"])
    choice = answer["choices"][0]
    assert choice["text"] == "Hello world café"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"][:3] == ["Hello", " world", " caf"]
    assert logprobs["token_logprobs"][:2] == [None, -1.25] and logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1] == {"!": -0.5, " world": -1.25}
    assert logprobs["text_offset"] == [0, 5, 11, 15, 15, 16]
    for token, offset in zip(logprobs["tokens"][:3], logprobs["text_offset"]):
        assert choice["text"][offset:].startswith(token)
    echoed_only = completion_response(record(echo=True), [result()], echoes=["Hello world"])
    assert echoed_only["choices"][0]["text"] == "Hello world café" and echoed_only["choices"][0]["logprobs"] is None


def test_max_tokens_zero_answers_the_prompt_alone() -> None:
    answer = completion_response(record(logprobs=0, echo=True, prompt_only=True),
                                 [result(logprobs=GENERATED[:1], prompt_logprobs=PROMPT)], vocab=VOCAB,
                                 echoes=["Hello world"])
    choice = answer["choices"][0]
    assert choice["text"] == "Hello world"
    assert choice["logprobs"]["tokens"] == ["Hello", " world"] and choice["logprobs"]["text_offset"] == [0, 5]
    assert answer["usage"]["completion_tokens"] == 0 and answer["usage"]["prompt_tokens"] == 2


def test_rendering_logprobs_without_the_vocabulary_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        completion_response(record(logprobs=1), [result(logprobs=GENERATED)])
    with pytest.raises(ValueError, match="echo"):
        completion_response(record(echo=True), [result()])


def test_chunks_carry_the_logprobs_of_their_tokens() -> None:
    chat = chunk(record("chat", logprobs=0), 0, text=" café", logprobs=chat_logprobs(VOCAB, GENERATED[:3]))
    assert [c["token"] for c in chat["choices"][0]["logprobs"]["content"]] == [" caf", "bytes:\\xc3", "bytes:\\xa9"]
    text = chunk(record(logprobs=0), 0, text="!", logprobs=text_choice_logprobs(VOCAB, GENERATED[:1]))
    assert text["choices"][0]["logprobs"]["tokens"] == [" caf"]
    assert chunk(record(), 0, text="x")["choices"][0]["logprobs"] is None


def stream_events(stream_record: CompletionRecord, items: list[tuple[int, object]], *, starts: list[int],
                  echoes: list[str] | None = None) -> list[tuple[str, dict]]:
    """``(id, chunk)`` of each event :class:`CompletionStream` makes of ``items`` (choice, event), in that order."""
    import asyncio
    from types import SimpleNamespace

    from common.settings import get_settings
    from producer.gateway.streaming import CompletionStream, event_id

    client = SimpleNamespace(settings=get_settings(), redis=None)  # the core below touches neither Redis nor jobs
    stream = CompletionStream(client, stream_record, [None] * len(starts), starts, grace_s=0, spawn=lambda c: None,
                              vocab=VOCAB, echoes=echoes)

    async def run() -> list[tuple[str, dict]]:
        queue: asyncio.Queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        last = [s - 1 for s in starts]
        return [(last_id, data) async for data, last_id in stream._tokens_and_ends(queue, last)]

    return asyncio.run(run())


def token(index: int, token_id: int, text: str) -> TokenEvent:
    return TokenEvent(request_id="j", index=index, token_id=token_id, text=text, logprob=-1.0 - index,
                      top_logprobs=[(token_id, -1.0 - index)])


def test_an_event_id_never_covers_a_token_whose_logprobs_were_not_sent() -> None:
    items = [(1, token(0, 2, "")), (0, token(0, 4, "x")), (1, token(1, 3, "é")),
             (0, StreamEnd(request_id="a", num_tokens=1, finish_reason=FinishReason.STOP)),
             (1, StreamEnd(request_id="b", num_tokens=2, finish_reason=FinishReason.STOP))]
    events = stream_events(record("chat", logprobs=0).model_copy(update={"num_jobs": 2}), items, starts=[0, 0])
    assert [event_id for event_id, _ in events] == ["0,-1", "0,1", "0,1", "0,1"]
    sent = [[e["logprob"] for e in c["choices"][0]["logprobs"]["content"]] for _, c in events[:2]]
    assert sent == [[-1.0], [-1.0, -2.0]]  # choice 1's first token rides with its second, once


def test_a_resumed_text_stream_counts_offsets_over_the_replayed_tokens_and_drops_them() -> None:
    items = [(0, token(0, 4, "Hello")), (0, token(1, 2, "")), (0, token(2, 3, "é")),
             (0, StreamEnd(request_id="j", num_tokens=3, finish_reason=FinishReason.LENGTH))]
    events = stream_events(record(logprobs=0, echo=True), items, starts=[1], echoes=["Say hi"])
    assert [e[0] for e in events] == ["2", "2"]
    logprobs = events[0][1]["choices"][0]["logprobs"]
    assert events[0][1]["choices"][0]["text"] == "é" and logprobs["text_offset"] == [11, 11]  # 6 + len("Hello")
    assert logprobs["tokens"] == ["bytes:\\xc3", "bytes:\\xa9"]


def test_echo_texts_are_the_prompts_or_the_token_ids_text() -> None:
    from common.schemas import GenerationRequest
    from producer.gateway.logprobs import echo_texts

    requests = [GenerationRequest(prompt="Say"), GenerationRequest(prompt_token_ids=[4, 1, 2, 3]), None]
    assert echo_texts(requests, VOCAB) == ["Say", "Hello café", ""]
    with pytest.raises(ValueError, match="vocabulary"):
        echo_texts(requests, None)
