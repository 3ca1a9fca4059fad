"""What the parts of tpqueue's Redis keys may be: job, batch and file ids, group names, sessions, shards, ranks.

:mod:`common.keys` builds every key from these parts and re-exports the
``validate_*`` functions; a bad part fails here with a clear
:class:`InvalidRequestError` instead of writing a surprising key.
"""
from __future__ import annotations

import re

from common.errors import InvalidRequestError

MAX_NUM_SHARDS = 4096
MAX_JOB_ID_CHARS = 128
MAX_SESSION_ID_CHARS = 1024
MAX_GROUP_NAME_CHARS = 64
MAX_RANK = 4095
MAX_MODEL_NAME_CHARS = 1024

# rq 2.12 accepts only [A-Za-z0-9_-] in job ids (rq.job.JOB_ID_PATTERN) and
# splits execution ids on ':', so tpqueue ids use that same alphabet.
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_GROUP_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")



def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is a usable job id, else raise :class:`InvalidRequestError`.

    A job id is 1 to 128 characters from ``[A-Za-z0-9_-]`` (the alphabet rq
    accepts; no ``:`` or ``.``, which rq and key patterns give meaning to).
    """
    _check_name("job id", job_id, _JOB_ID_RE, MAX_JOB_ID_CHARS, "letters, digits, '_' and '-'")
    return job_id


def validate_batch_id(batch_id: str) -> str:
    """Return ``batch_id`` if usable (same rules as :func:`validate_job_id`), else raise."""
    _check_name("batch id", batch_id, _JOB_ID_RE, MAX_JOB_ID_CHARS, "letters, digits, '_' and '-'")
    return batch_id


def validate_group_name(group: str) -> str:
    """Return ``group`` if it is a usable worker-group name, else raise :class:`InvalidRequestError`.

    A group name is 1 to 64 characters from ``[A-Za-z0-9_.-]`` (no ``:``,
    which separates it from the rank in heartbeat keys, and no glob characters).
    """
    _check_name("group name", group, _GROUP_NAME_RE, MAX_GROUP_NAME_CHARS, "letters, digits, '_', '.' and '-'")
    return group


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if usable, else raise :class:`InvalidRequestError`.

    A session id is any non-empty string of at most 1024 characters; it is
    only hashed, never written into a key, so any characters are fine.
    """
    if not isinstance(session_id, str):
        raise InvalidRequestError(f"session id must be a string, got {type(session_id).__name__}")
    if not session_id:
        raise InvalidRequestError("session id must be non-empty (leave it out for a session-less job)")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidRequestError(
            f"session id is {len(session_id)} characters; at most {MAX_SESSION_ID_CHARS} are allowed"
        )
    return session_id


def validate_num_shards(num_shards: int) -> int:
    """Return ``num_shards`` if it is an int in ``[1, 4096]``, else raise :class:`InvalidRequestError`."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int):
        raise InvalidRequestError(f"num_shards must be an int, got {type(num_shards).__name__}")
    if not 1 <= num_shards <= MAX_NUM_SHARDS:
        raise InvalidRequestError(f"num_shards must be in [1, {MAX_NUM_SHARDS}], got {num_shards}")
    return num_shards


def _check_name(what: str, value: str, pattern: re.Pattern[str], max_chars: int, alphabet: str) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidRequestError(f"{what} must be non-empty")
    if len(value) > max_chars:
        raise InvalidRequestError(f"{what} is {len(value)} characters; at most {max_chars} are allowed")
    if not pattern.fullmatch(value):
        bad = sorted({c for c in value if not pattern.fullmatch(c)})
        raise InvalidRequestError(
            f"{what} {value!r} contains {''.join(bad)!r}; use only {alphabet}"
        )


def _check_shard(shard: int) -> int:
    if isinstance(shard, bool) or not isinstance(shard, int):
        raise InvalidRequestError(f"shard must be an int, got {type(shard).__name__}")
    if not 0 <= shard < MAX_NUM_SHARDS:
        raise InvalidRequestError(f"shard must be in [0, {MAX_NUM_SHARDS}), got {shard}")
    return shard


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise InvalidRequestError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank <= MAX_RANK:
        raise InvalidRequestError(f"rank must be in [0, {MAX_RANK}], got {rank}")
    return rank


def validate_file_id(file_id: str) -> str:
    """Return ``file_id`` if usable (same rules as :func:`validate_job_id`), else raise."""
    _check_name("file id", file_id, _JOB_ID_RE, MAX_JOB_ID_CHARS, "letters, digits, '_' and '-'")
    return file_id
