"""Checks shared by the tests that run the whole pipeline: every stream against its result, observed progress."""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis

from common import keys
from common.jobs import LOG_FIELD, decode_stream_message
from common.results import JobResult, StreamEnd, TokenEvent

RESULT_TIMEOUT_S = 240


def collect(handles, timeout: float = RESULT_TIMEOUT_S) -> dict[str, tuple[list[TokenEvent], JobResult]]:
    """Every handle's streamed events and result, read concurrently (one thread per stream)."""
    def one(handle):
        events = list(handle.stream(timeout=timeout))
        return handle.id, (events, handle.result(timeout=timeout))

    with ThreadPoolExecutor(max_workers=min(32, len(handles))) as pool:
        return dict(pool.map(one, handles))


def assert_streams_match_results(outcomes: dict[str, tuple[list[TokenEvent], JobResult]]) -> None:
    """Each stream is gap- and duplicate-free and equals its job's result, token for token."""
    for job_id, (events, result) in outcomes.items():
        assert [e.index for e in events] == list(range(len(events))), f"{job_id}: gap or duplicate in the stream"
        assert [e.token_id for e in events] == result.token_ids, f"{job_id}: streamed tokens differ from the result"
        assert "".join(e.text for e in events) == result.text, f"{job_id}: streamed text differs from the result"
        assert result.request_id == job_id


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str = "the condition") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s`` seconds, saying ``what`` was awaited."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.02)


def log_tail(conn: redis.Redis, job_id: str) -> tuple[int, StreamEnd | None]:
    """``(tokens job_id's log holds, its end record or None)``, from the log's last entry (one round trip).

    What a log held at some moment it still holds later (the worker only
    appends), so a log seen without an end had none at any earlier moment.
    """
    last = conn.xrevrange(keys.token_log(job_id), count=1)
    if not last:
        return 0, None
    fields = last[0][1]
    message = decode_stream_message(fields[LOG_FIELD.encode()] if LOG_FIELD.encode() in fields else fields[LOG_FIELD])
    if isinstance(message, StreamEnd):
        return message.num_tokens, message
    return message.index + 1, None
