"""OpenAI's response objects and stream chunks, built from tpqueue's results and token events (no I/O).

Choice ``i`` of a completion is job ``i`` (:func:`producer.gateway.records.job_ids`);
with several prompts, prompt ``p``'s choices are ``p * n .. p * n + n - 1``,
as OpenAI numbers them. ``finish_reason`` is tpqueue's own: ``stop`` and
``length`` as OpenAI's, ``cancelled`` and ``deadline`` for jobs that were
stopped. Server-sent events are framed by :func:`sse`.

A completion that asked for logprobs (``record.logprobs``) is rendered with
its model's :class:`~producer.gateway.vocab.Vocabulary` (``vocab``); one
with ``echo`` puts each choice's prompt text (``echoes[i]``) first.
"""
from __future__ import annotations

import json
from typing import Any

from common.results import JobResult
from producer.gateway.logprobs import chat_logprobs, text_choice_logprobs
from producer.gateway.records import CompletionRecord
from producer.gateway.vocab import Vocabulary

DONE = "[DONE]"
"""The ``data:`` of a stream's last event."""


def sse(data: dict[str, Any] | str, event_id: str | None = None) -> bytes:
    """One server-sent event: an ``id:`` line (when given) and a ``data:`` line (JSON, or :data:`DONE`)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"{head}data: {text}\n\n".encode()


def usage(record: CompletionRecord, results: list[JobResult]) -> dict[str, Any]:
    """OpenAI's ``usage``: each prompt's tokens counted once (not once per choice), every choice's output tokens."""
    firsts = results[::record.n]
    prompt = sum(r.usage.prompt_tokens for r in firsts)
    completion = 0 if record.prompt_only else sum(r.usage.generated_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.usage.cached_tokens for r in firsts)}}


def _head(record: CompletionRecord, object_name: str) -> dict[str, Any]:
    return {"id": record.id, "object": object_name, "created": record.created, "model": record.model}


def completion_response(record: CompletionRecord, results: list[JobResult], *, vocab: Vocabulary | None = None,
                        echoes: list[str] | None = None) -> dict[str, Any]:
    """The whole (non-streamed) answer: a ``chat.completion`` or a ``text_completion``.

    ``vocab`` is needed when ``record.logprobs`` is set, ``echoes`` (the
    prompt text of each choice) when ``record.echo`` is.
    """
    if record.logprobs is not None and vocab is None:
        raise ValueError(f"completion {record.id} asked for logprobs: rendering them needs its model's vocabulary")
    if record.echo and (echoes is None or len(echoes) != len(results)):
        raise ValueError(f"completion {record.id} echoes its prompts: give one echo text per choice")
    if record.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                    "logprobs": _chat_choice_logprobs(record, r, vocab), "finish_reason": r.finish_reason.value}
                   for i, r in enumerate(results)]
        return {**_head(record, "chat.completion"), "choices": choices, "usage": usage(record, results)}
    choices = [_text_choice(record, i, r, vocab, echoes[i] if echoes else "") for i, r in enumerate(results)]
    return {**_head(record, "text_completion"), "choices": choices, "usage": usage(record, results)}


def _chat_choice_logprobs(record: CompletionRecord, result: JobResult, vocab: Vocabulary | None) -> Any:
    if vocab is None or record.logprobs is None:
        return None
    return chat_logprobs(vocab, result.logprobs or [])


def _text_choice(record: CompletionRecord, index: int, result: JobResult, vocab: Vocabulary | None,
                 echo: str) -> dict[str, Any]:
    generated = [] if record.prompt_only else result.logprobs or []
    logprobs = None
    if vocab is not None and record.logprobs is not None:
        prompt = (result.prompt_logprobs or []) if record.echo else None
        logprobs = text_choice_logprobs(vocab, generated, prompt, echo)
    text = echo + ("" if record.prompt_only else result.text)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason.value}


def chunk(record: CompletionRecord, index: int, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stream chunk of choice ``index``: a text delta, the chat's opening role delta, or its finish.

    ``logprobs``: those of the chunk's tokens (:mod:`producer.gateway.logprobs`), or None.
    """
    if record.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**_head(record, "chat.completion.chunk"), "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_head(record, "text_completion"), "choices": [choice]}


def usage_chunk(record: CompletionRecord, results: list[JobResult]) -> dict[str, Any]:
    """The chunk ``stream_options.include_usage`` adds before ``[DONE]``: no choices, the usage."""
    object_name = "chat.completion.chunk" if record.kind == "chat" else "text_completion"
    return {**_head(record, object_name), "choices": [], "usage": usage(record, results)}
