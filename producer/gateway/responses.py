"""OpenAI's response objects and stream chunks, built from tpqueue's results and token events (no I/O).

Choice ``i`` of a completion is job ``i`` (:func:`producer.gateway.records.job_ids`);
with several prompts, prompt ``p``'s choices are ``p * n .. p * n + n - 1``,
as OpenAI numbers them. ``finish_reason`` is tpqueue's own: ``stop`` and
``length`` as OpenAI's, ``cancelled`` and ``deadline`` for jobs that were
stopped. Server-sent events are framed by :func:`sse`.
"""
from __future__ import annotations

import json
from typing import Any

from common.results import JobResult
from producer.gateway.records import CompletionRecord

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
    completion = sum(r.usage.generated_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.usage.cached_tokens for r in firsts)}}


def _head(record: CompletionRecord, object_name: str) -> dict[str, Any]:
    return {"id": record.id, "object": object_name, "created": record.created, "model": record.model}


def completion_response(record: CompletionRecord, results: list[JobResult]) -> dict[str, Any]:
    """The whole (non-streamed) answer: a ``chat.completion`` or a ``text_completion``."""
    if record.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                    "finish_reason": r.finish_reason.value} for i, r in enumerate(results)]
        return {**_head(record, "chat.completion"), "choices": choices, "usage": usage(record, results)}
    choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason.value}
               for i, r in enumerate(results)]
    return {**_head(record, "text_completion"), "choices": choices, "usage": usage(record, results)}


def chunk(record: CompletionRecord, index: int, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None) -> dict[str, Any]:
    """One stream chunk of choice ``index``: a text delta, the chat's opening role delta, or its finish."""
    if record.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**_head(record, "chat.completion.chunk"), "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**_head(record, "text_completion"), "choices": [choice]}


def usage_chunk(record: CompletionRecord, results: list[JobResult]) -> dict[str, Any]:
    """The chunk ``stream_options.include_usage`` adds before ``[DONE]``: no choices, the usage."""
    object_name = "chat.completion.chunk" if record.kind == "chat" else "text_completion"
    return {**_head(record, object_name), "choices": [], "usage": usage(record, results)}
