"""A job's token stream in Redis: the writer's commands and the reader's replay.

The format is described in :mod:`common.jobs`: every message is PUBLISHed on
``keys.token_channel(job_id)`` and appended to the stream
``keys.token_log(job_id)`` under the explicit entry id
``jobs.log_entry_id(position)``. Redis refuses an entry id that is not above
the stream's last one, so a message written twice (a retried pipeline, a
fenced worker still running) is refused by the log instead of stored twice;
the writer therefore sends each XADD without raising on that error.

Rank 0's publisher appends through :func:`append_messages` instead, a Lua
script that also refuses to leave a *hole*: a Redis that crashed can come
back without its last writes (``appendfsync everysec`` loses up to about a
second), and a writer that kept running would otherwise append past the
missing entries, a gap no reader can cross. The script tells the writer
where the log really ends, so that it writes the missing messages again.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import redis

from common import keys
from common.errors import TpqError
from common.jobs import (
    LOG_FIELD, StreamMessage, decode_stream_message, encode_stream_message, log_entry_id, log_entry_position,
)
from common.results import StreamEnd, TokenEvent

_LOG_FIELD_B = LOG_FIELD.encode()


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


# KEYS[1]: a job's log. ARGV[1]: its channel, ARGV[2]: MAXLEN (approximate), ARGV[3]: TTL in seconds, ARGV[4]: the
# position of the first message, ARGV[5..]: messages at consecutive positions from there. The log's next position
# is its top entry's sequence number (entry 0-<p+1> holds position p). If it is short of the first message, entries
# went missing: nothing is written, and the next position is returned so the writer can send from there. If the
# first message's position is missing below the top (a hole left by an earlier writer that could not fill it), the
# entries above the hole are dropped so that the log can continue gap-free from this writer's messages. Then every
# message at or past the next position is appended (XADD under its explicit id, PUBLISH) and the rest skipped, as
# already logged (a retried write, or another writer first); returns -1.
_APPEND_SCRIPT = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local next_position = 0
if top[1] then next_position = tonumber(string.match(top[1][1], '^0%-(%d+)$') or '0') end
local first = tonumber(ARGV[4])
if next_position < first then return next_position end
local first_id = '0-' .. (first + 1)
if next_position > first and not redis.call('XRANGE', KEYS[1], first_id, first_id)[1] then
  local kept = redis.call('XRANGE', KEYS[1], '-', '0-' .. first)
  redis.call('DEL', KEYS[1])
  for _, entry in ipairs(kept) do
    redis.call('XADD', KEYS[1], entry[1], unpack(entry[2]))
  end
  next_position = first
end
for i = 5, #ARGV do
  local position = first + i - 5
  if position >= next_position then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '0-' .. (position + 1), 'LOG_FIELD', ARGV[i])
    redis.call('PUBLISH', ARGV[1], ARGV[i])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return -1
""".replace("LOG_FIELD", LOG_FIELD)
_APPEND_SHA = hashlib.sha1(_APPEND_SCRIPT.encode()).hexdigest()


def message_runs(messages: Iterable[StreamMessage]) -> list[list[StreamMessage]]:
    """``messages`` cut into runs of one job's messages at consecutive positions, in order."""
    runs: list[list[StreamMessage]] = []
    last: dict[str, list[StreamMessage]] = {}
    for message in messages:
        run = last.get(message.request_id)
        if run is not None and position_of(message) == position_of(run[-1]) + 1:
            run.append(message)
        else:
            last[message.request_id] = [message]
            runs.append(last[message.request_id])
    return runs


def append_messages(conn: redis.Redis, runs: list[list[StreamMessage]], maxlen: int, ttl_s: int) -> dict[str, int]:
    """Append each run (from :func:`message_runs`) to its job's log and publish it, in one round trip.

    Returns ``{job_id: next position}`` for the runs that were not written
    because their log ends short of them (entries went missing): write those
    again from that position. A message the log already holds is skipped. A
    connection error raises (the caller retries: it is safe to write a run
    twice); a command refused by Redis is ignored, as with :func:`queue_messages`.
    """
    for _ in range(2):
        with conn.pipeline(transaction=False) as pipe:
            for run in runs:
                job_id = run[0].request_id
                pipe.evalsha(_APPEND_SHA, 1, keys.token_log(job_id), keys.token_channel(job_id), maxlen, ttl_s,
                             position_of(run[0]), *(encode_stream_message(m) for m in run))
            replies = pipe.execute(raise_on_error=False)
        if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            break
        conn.script_load(_APPEND_SCRIPT)  # a new or restarted Redis: load it and write again (runs are idempotent)
    return {run[0].request_id: int(reply) for run, reply in zip(runs, replies)
            if isinstance(reply, int) and reply >= 0}


def decode_log(entries: Iterable[tuple[Any, dict[Any, Any]]]) -> list[StreamMessage]:
    """The messages of a token log's entries (an XRANGE or XREVRANGE reply), in the entries' order.

    The one decoder of the log: its readers (:func:`read_log`, the client's
    token-stream reader) all go through it.
    """
    return [decode_stream_message(fields[_LOG_FIELD_B] if _LOG_FIELD_B in fields else fields[LOG_FIELD])
            for _entry_id, fields in entries]


def read_log(conn: redis.Redis, job_id: str, start: int = 0, count: int | None = None) -> list[StreamMessage]:
    """The messages of ``job_id``'s log from position ``start`` on, in order (at most ``count``)."""
    return decode_log(conn.xrange(keys.token_log(job_id), min=log_entry_id(start), max="+", count=count))


def resume_point(conn: redis.Redis, job_id: str) -> tuple[list[TokenEvent], StreamEnd | None]:
    """What an earlier run of ``job_id`` already streamed: its token events and, if it got that far, its end.

    Only the log's gap-free beginning counts: after a hole (entries a crashed
    Redis lost) the job resumes at the hole, and its writer's first append
    drops the entries above it (see :func:`append_messages`).
    """
    return resume_point_from(conn.xrange(keys.token_log(job_id)))


def logged_count(conn: redis.Redis, job_id: str) -> int:
    """How many stream positions ``job_id``'s log reaches: its last entry's position + 1 (0 when it is empty)."""
    last = conn.xrevrange(keys.token_log(job_id), count=1)
    try:
        return log_entry_position(last[0][0]) + 1 if last else 0
    except TpqError:
        return 0  # an entry id tpqueue never writes


def log_is_whole(conn: redis.Redis, job_id: str, num_tokens: int) -> bool:
    """Whether ``job_id``'s log holds every position from 0 to its end record at ``num_tokens``. One round trip.

    Positions are distinct and the log is never trimmed below ``token_log_maxlen``
    (which exceeds any job's length), so ``num_tokens + 1`` entries whose last
    is at ``num_tokens`` are every position.
    """
    with conn.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.token_log(job_id))
        pipe.xrevrange(keys.token_log(job_id), count=1)
        length, last = pipe.execute()
    try:
        return length == num_tokens + 1 and bool(last) and log_entry_position(last[0][0]) == num_tokens
    except TpqError:
        return False


def attempt_made_progress(conn: redis.Redis, job_id: str) -> bool:
    """Whether the latest attempt at ``job_id`` logged a message: its log holds the position that attempt began at.

    That position is the job hash's ``keys.JOB_LOGGED_AT_START_FIELD``
    (written by the worker when it starts the job: the log's gap-free
    length). Only the entry there counts, not the log's top: entries an
    earlier writer stranded above a hole (see :func:`append_messages`) are no
    progress of this attempt. False when the field is absent or unreadable.
    """
    try:
        position = int(conn.hget(keys.rq_job_key(job_id), keys.JOB_LOGGED_AT_START_FIELD))
    except (TypeError, ValueError):
        return False
    if position < 0:
        return False
    entry_id = log_entry_id(position)
    return bool(conn.xrange(keys.token_log(job_id), min=entry_id, max=entry_id, count=1))


def queue_resume_read(pipe: Any, job_id: str) -> None:
    """Queue into ``pipe`` the read :func:`resume_point_from` takes: ``job_id``'s whole log.

    For a caller that reads many jobs' resume points (and other keys) in one round trip.
    """
    pipe.xrange(keys.token_log(job_id))


def resume_point_from(entries: list[tuple[Any, dict[Any, Any]]]) -> tuple[list[TokenEvent], StreamEnd | None]:
    """:func:`resume_point` from the reply of the read :func:`queue_resume_read` queued (the log's entries)."""
    tokens: list[TokenEvent] = []
    end = None
    for message in decode_log(entries):
        if position_of(message) != len(tokens):
            break
        if isinstance(message, StreamEnd):
            end = message
            break
        tokens.append(message)
    return tokens, end
