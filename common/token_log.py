"""A job's token stream in Redis: the writer's commands and the reader's replay.

The format is described in :mod:`common.jobs`: every message is PUBLISHed on
``keys.token_channel(job_id)`` and appended to the stream
``keys.token_log(job_id)`` under the explicit entry id
``jobs.log_entry_id(position)``. Redis refuses an entry id that is not above
the stream's last one, so a message written twice (a retried pipeline, a
fenced worker still running) is refused by the log instead of stored twice;
the writer therefore sends each XADD without raising on that error.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from common import keys
from common.jobs import LOG_FIELD, StreamMessage, decode_stream_message, encode_stream_message, log_entry_id
from common.results import StreamEnd, TokenEvent


def position_of(message: StreamMessage) -> int:
    """The stream position of a message: a token's index, or the end record's token count."""
    return message.index if isinstance(message, TokenEvent) else message.num_tokens


def queue_messages(pipe: Any, messages: Iterable[StreamMessage], maxlen: int, ttl_s: int) -> int:
    """Add the commands that write ``messages`` to ``pipe`` (a non-transactional pipeline).

    Per message: XADD to the job's log with its explicit entry id and an
    approximate ``MAXLEN``, then PUBLISH on the job's channel; per job, one
    EXPIRE of the log. Returns the number of commands added. Execute the
    pipeline with ``raise_on_error=False``: an XADD refused as a duplicate is
    expected after a retry and harmless.
    """
    count = 0
    expiring: set[str] = set()
    for message in messages:
        data = encode_stream_message(message)
        log_key = keys.token_log(message.request_id)
        pipe.xadd(log_key, {LOG_FIELD: data}, id=log_entry_id(position_of(message)), maxlen=maxlen, approximate=True)
        pipe.publish(keys.token_channel(message.request_id), data)
        count += 2
        expiring.add(log_key)
    for log_key in expiring:
        pipe.expire(log_key, ttl_s)
        count += 1
    return count


def read_log(conn: redis.Redis, job_id: str, start: int = 0, count: int | None = None) -> list[StreamMessage]:
    """The messages of ``job_id``'s log from position ``start`` on, in order (at most ``count``)."""
    entries = conn.xrange(keys.token_log(job_id), min=log_entry_id(start), max="+", count=count)
    return [decode_stream_message(fields[LOG_FIELD.encode()] if LOG_FIELD.encode() in fields else fields[LOG_FIELD])
            for _entry_id, fields in entries]


def resume_point(conn: redis.Redis, job_id: str) -> tuple[list[TokenEvent], StreamEnd | None]:
    """What an earlier run of ``job_id`` already streamed: its token events and, if it got that far, its end."""
    tokens: list[TokenEvent] = []
    end = None
    for message in read_log(conn, job_id):
        if isinstance(message, StreamEnd):
            end = message
            break
        tokens.append(message)
    return tokens, end
