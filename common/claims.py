"""Returning the jobs a worker group claimed but never started to the front of their queues.

A group's job pump moves job ids from the queues into the group's claimed
list (``keys.claimed_jobs``) and out of it once rq records the job as
started, so an id is always in a queue, claimed, or started. Ids left in
the list belong to an incarnation that died in between: the group returns
them when it starts again, and the supervisor when it fences an
incarnation. Both go through :func:`return_claimed`.
"""
from __future__ import annotations

import redis

from common import keys
from common.errors import TpqError
from common.groups import FENCED_FIELD
from common.rq_internals import job_origins
from common.text import as_text

# KEYS[1]: the claimed list, KEYS[2]: the group's hash, KEYS[2 + i]: the queue of the i-th id to return.
# ARGV[1]: the fenced incarnation ('' for none), ARGV[2]: the fence field, ARGV[3]: n, the number of ids to
# return, ARGV[3 + i] (i = 1..n): those ids in claim order, ARGV[3 + n + 1..]: ids to drop (no job hash or no
# job id). With an incarnation, nothing happens unless it is still the fenced one (a restarted group clears
# the fence and returns its claims itself): returns -1. Each id is taken out of the claimed list first and
# pushed back only if it was still there, so a concurrent start or return cannot push it twice; the last
# claimed is pushed first, so the ids end at the front of their queues in the order they were claimed.
_RETURN_SCRIPT = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[1] then return -1 end
local n = tonumber(ARGV[3])
local moved = 0
for i = n, 1, -1 do
  if redis.call('LREM', KEYS[1], 1, ARGV[3 + i]) == 1 then
    redis.call('LPUSH', KEYS[2 + i], ARGV[3 + i])
    moved = moved + 1
  end
end
for i = 4 + n, #ARGV do
  redis.call('LREM', KEYS[1], 1, ARGV[i])
end
return moved
"""


def return_claimed(conn: redis.Redis, group: str, fenced_incarnation: str | None = None) -> int:
    """Put every id in ``group``'s claimed list back at the front of its queue; how many went back.

    Reads the list and the jobs' queues (two round trips), then moves them
    in one script whose KEYS name every key it touches. Ids with no job
    hash, or that are no job id, are dropped from the list. With
    ``fenced_incarnation`` (the supervisor) nothing is moved, and 0
    returned, unless that incarnation is still the group's fenced one.
    """
    claimed_key = keys.claimed_jobs(group)
    raw_ids = conn.lrange(claimed_key, 0, -1)
    if not raw_ids:
        return 0
    ids = [claimed_job_id(raw) for raw in raw_ids]
    valid = [job_id for job_id in ids if job_id is not None]
    origin_of = dict(zip(valid, job_origins(conn, valid)))
    returned = [job_id for job_id in ids if job_id is not None and origin_of[job_id] is not None]
    dropped = [raw for raw, job_id in zip(raw_ids, ids) if job_id is None or origin_of[job_id] is None]
    script = conn.register_script(_RETURN_SCRIPT)
    moved = script(
        keys=[claimed_key, keys.group_info(group), *(keys.rq_queue_key(origin_of[i]) for i in returned)],
        args=[fenced_incarnation or "", FENCED_FIELD, len(returned), *returned, *dropped],
    )
    return max(0, int(moved))


def claimed_job_id(raw: bytes | str) -> str | None:
    """``raw`` (an id read from a queue or a claimed list) as a str if it is a valid tpqueue job id, else None."""
    try:
        return keys.validate_job_id(as_text(raw))
    except (UnicodeDecodeError, TpqError):
        return None
